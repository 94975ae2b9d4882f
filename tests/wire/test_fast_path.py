"""The wire fast path: one-way frames in order on one task, parked request tasks that a
CANCEL does not outlive, byte counts from the connection, and LocalConnection keeping the
TCP connection's semantics without a socket."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from p2pllm.wire.connection import (
    Connection,
    ConnectionClosed,
    RemoteError,
    Reply,
    Request,
    connect,
    serve,
)
from p2pllm.wire.frame import HEADER_SIZE, Limits, ProtocolError, encode_frame
from p2pllm.wire.local import LocalConnection
from p2pllm.wire.messages import ErrorCode, MsgType
from p2pllm.wire.tensors import tensor_meta, unpack_tensors


class Recorder:
    """A handler that logs what it sees, and the task each message ran on."""

    def __init__(self) -> None:
        self.oneway: list[int] = []
        self.oneway_tasks: set[int] = set()
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, conn: Connection, req: Request) -> Reply | None:
        t = req.frame.msg_type
        if not req.wants_reply:
            self.oneway_tasks.add(id(asyncio.current_task()))
            if req.meta.get("wait"):
                await self.release.wait()  # holds the later one-way frames, not requests
            self.oneway.append(req.meta["i"])
            return None
        if t == MsgType.ASSIGN:  # runs until cancelled
            self.started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if t == MsgType.STATUS:
            await asyncio.sleep(req.meta.get("delay", 0))
            return Reply(MsgType.STATUS, {"n": req.meta.get("n"), "in": req.wire_bytes})
        if t == MsgType.GENERATE:
            for i in range(req.meta["count"]):
                await req.partial(MsgType.GENERATE, {"i": i})
            return Reply(MsgType.GENERATE, {"done": True})
        if t == MsgType.SHARD_FORWARD:
            x = unpack_tensors(req.meta["tensors"], req.frame.payload)["x"]
            x.add_(1)  # the handler may write into what it received
            m, bufs = tensor_meta({"x": x})
            return Reply(MsgType.SHARD_RESULT, m, bufs)
        if t == MsgType.JOBS:
            raise ProtocolError(ErrorCode.UNKNOWN_JOB, "no such job")
        if t == MsgType.JOB_STOP:
            raise RuntimeError("boom")
        return None


@pytest.fixture(params=["tcp", "local"])
async def link(request: Any) -> Any:
    """(client, handler): a client whose requests reach a Recorder, over TCP or in-process."""
    rec = Recorder()
    if request.param == "local":
        conn = LocalConnection(rec, Limits(max_meta=4096, max_payload=64 << 20))
        yield conn, rec
        conn.close()
        return
    accepted: list[Connection] = []
    server = await serve("127.0.0.1", 0, rec, accepted.append, limits=Limits(max_meta=4096, max_payload=64 << 20))

    async def no(conn: Connection, req: Request) -> None:
        return None

    client = await connect("127.0.0.1", server.sockets[0].getsockname()[1], no, limits=Limits(max_payload=64 << 20))
    yield client, rec
    client.close()
    for c in accepted:
        c.close()
    server.close()
    await server.wait_closed()


async def test_one_way_frames_are_handled_in_order_on_one_task(link: Any) -> None:
    conn, rec = link
    await conn.notify(MsgType.ROLE_CALL, {"i": 0, "wait": True})
    for i in range(1, 200):
        await conn.notify(MsgType.ROLE_CALL, {"i": i})
    # The first one-way handler waits: requests are still answered meanwhile...
    assert (await conn.request(MsgType.STATUS, {"n": 1}, timeout=5)).meta["n"] == 1
    assert rec.oneway == []  # ...and the later one-way frames wait their turn
    rec.release.set()
    for _ in range(200):
        if len(rec.oneway) == 200:
            break
        await asyncio.sleep(0.01)
    assert rec.oneway == list(range(200))
    assert len(rec.oneway_tasks) == 1  # no task per frame


async def test_notify_nowait_writes_before_it_returns_in_order_with_notify(link: Any) -> None:
    conn, rec = link
    sent = [conn.notify_nowait(MsgType.ROLE_CALL, {"i": i}) for i in range(3)]  # plain code
    if isinstance(conn, LocalConnection):
        assert sent == [0, 0, 0]  # nothing crosses a socket
    else:
        assert all(n > HEADER_SIZE for n in sent) and conn.bytes_out >= sum(sent)
        assert conn.frames_out == 3 and conn._transport.get_write_buffer_size() == 0
    await conn.notify(MsgType.ROLE_CALL, {"i": 3})
    for _ in range(200):
        if len(rec.oneway) == 4:
            break
        await asyncio.sleep(0.01)
    assert rec.oneway == [0, 1, 2, 3]
    conn.close()
    with pytest.raises(ConnectionClosed):
        conn.notify_nowait(MsgType.ROLE_CALL, {"i": 4})


async def test_cancel_ends_one_request_and_the_parked_task_serves_the_next(link: Any) -> None:
    conn, rec = link
    for round_ in range(3):
        rec.started.clear()
        rec.cancelled.clear()
        task = asyncio.create_task(conn.request(MsgType.ASSIGN, {}, timeout=10))
        await asyncio.wait_for(rec.started.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(rec.cancelled.wait(), 5)
        # The next requests (on parked tasks, one of which was just cancelled) run whole.
        answers = await asyncio.gather(*(conn.request(MsgType.STATUS, {"n": i, "delay": 0.05}, timeout=5)
                                         for i in range(20)))
        assert [a.meta["n"] for a in answers] == list(range(20)), round_


async def test_streams_errors_late_responses(link: Any) -> None:
    conn, rec = link
    frames = [f async for f in conn.stream(MsgType.GENERATE, {"count": 4}, idle_timeout=5)]
    assert [f.meta.get("i") for f in frames] == [0, 1, 2, 3, None] and frames[-1].meta["done"]
    with pytest.raises(RemoteError) as ei:
        await conn.request(MsgType.JOBS, {}, timeout=5)
    assert ei.value.code == ErrorCode.UNKNOWN_JOB
    with pytest.raises(RemoteError) as ei:
        await conn.request(MsgType.JOB_STOP, {}, timeout=5)
    assert ei.value.code == ErrorCode.INTERNAL and "boom" in ei.value.message
    with pytest.raises(TimeoutError):
        await conn.request(MsgType.STATUS, {"n": 1, "delay": 0.3}, timeout=0.05)
    await asyncio.sleep(0.4)
    assert (await conn.request(MsgType.STATUS, {"n": 2}, timeout=5)).meta["n"] == 2
    assert not conn._pending


async def test_payloads_and_byte_counts(link: Any) -> None:
    conn, rec = link
    x = torch.arange(300_000, dtype=torch.float32)
    meta, bufs = tensor_meta({"x": x})
    frame = await conn.request(MsgType.SHARD_FORWARD, meta, bufs, timeout=10)
    out = unpack_tensors(frame.meta["tensors"], frame.payload)["x"]
    assert torch.equal(out, torch.arange(300_000, dtype=torch.float32) + 1)
    assert torch.equal(x, torch.arange(300_000, dtype=torch.float32))  # the sender's tensor is untouched
    assert out.data_ptr() % 64 == 0
    sent = sum(memoryview(b).nbytes for b in encode_frame(MsgType.SHARD_FORWARD, meta, bufs, request_id=1))
    got = sum(memoryview(b).nbytes for b in encode_frame(MsgType.SHARD_RESULT, frame.meta, [frame.payload],
                                                          request_id=1, flags=1))
    small = await conn.request(MsgType.STATUS, {"n": 7}, timeout=5)
    if isinstance(conn, LocalConnection):
        assert frame.sent_bytes == frame.wire_bytes == 0 and small.meta["in"] == 0
        assert conn.bytes_in == conn.bytes_out == 0 and conn.frames_out >= 4
    else:
        # Counted by the connection, equal to the frames' encoded sizes.
        assert frame.sent_bytes == sent and frame.wire_bytes == got
        assert small.meta["in"] == small.sent_bytes > HEADER_SIZE
        assert conn.bytes_out >= sent + small.sent_bytes and conn.bytes_in >= got + small.wire_bytes


async def test_local_limits_and_close() -> None:
    rec = Recorder()
    conn = LocalConnection(rec, Limits(max_meta=64, max_payload=10))
    with pytest.raises(RemoteError) as ei:
        await conn.request(MsgType.STATUS, {"n": "x" * 100}, timeout=5)
    assert ei.value.code == ErrorCode.FRAME_TOO_LARGE
    with pytest.raises(RemoteError) as ei:
        await conn.request(MsgType.STATUS, {}, [b"y" * 11], timeout=5)
    assert ei.value.code == ErrorCode.FRAME_TOO_LARGE
    task = asyncio.create_task(conn.request(MsgType.ASSIGN, {}, timeout=10))
    await asyncio.wait_for(rec.started.wait(), 5)
    conn.close("test")
    with pytest.raises(ConnectionClosed):
        await task
    await asyncio.wait_for(rec.cancelled.wait(), 5)
    with pytest.raises(ConnectionClosed):
        await conn.request(MsgType.STATUS, {}, timeout=5)
