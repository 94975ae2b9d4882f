"""Connection over real loopback sockets: multiplexing, streams, cancellation, bad input."""

from __future__ import annotations

import asyncio
import socket

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
from p2pllm.wire.frame import HEADER, MAGIC, PROTOCOL_VERSION, Limits, ProtocolError
from p2pllm.wire.messages import ErrorCode, Flags, MsgType
from p2pllm.wire.tensors import tensor_meta, unpack_tensors


async def server_handler(conn: Connection, req: Request) -> Reply | None:
    meta = req.meta
    if req.frame.msg_type == MsgType.STATUS:
        await asyncio.sleep(meta.get("delay", 0))
        return Reply(MsgType.STATUS, {"echo": meta.get("n")})
    if req.frame.msg_type == MsgType.SHARD_FORWARD:
        tensors = unpack_tensors(meta["tensors"], req.frame.payload)
        out = {k: v * 2 for k, v in tensors.items()}
        m, bufs = tensor_meta(out)
        return Reply(MsgType.SHARD_RESULT, m, bufs)
    if req.frame.msg_type == MsgType.GENERATE:
        for i in range(meta["count"]):
            await req.partial(MsgType.GENERATE, {"i": i})
        return Reply(MsgType.GENERATE, {"done": True})
    if req.frame.msg_type == MsgType.JOBS:
        raise ProtocolError(ErrorCode.UNKNOWN_JOB, "no such job")
    if req.frame.msg_type == MsgType.JOB_STOP:
        raise RuntimeError("boom")
    if req.frame.msg_type == MsgType.ASSIGN:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
    return None


started = asyncio.Event()
cancelled = asyncio.Event()


@pytest.fixture
async def pair():
    global started, cancelled
    started, cancelled = asyncio.Event(), asyncio.Event()
    conns: list[Connection] = []
    server = await serve(
        "127.0.0.1", 0, server_handler, conns.append, limits=Limits(max_meta=4096, max_payload=64 << 20)
    )
    port = server.sockets[0].getsockname()[1]

    async def no_handler(conn, req):
        return None

    client = await connect("127.0.0.1", port, no_handler, limits=Limits(max_payload=64 << 20))
    yield client, server, port, conns
    client.close()
    for c in conns:
        c.close()
    server.close()
    await server.wait_closed()


async def test_many_requests_in_flight_answer_out_of_order(pair) -> None:
    client, *_ = pair
    delays = [0.05 * (10 - i) for i in range(10)]
    order: list[int] = []

    async def one(i: int) -> int:
        frame = await client.request(MsgType.STATUS, {"n": i, "delay": delays[i]}, timeout=5)
        order.append(i)
        return frame.meta["echo"]

    results = await asyncio.gather(*(one(i) for i in range(10)))
    assert results == list(range(10))
    assert order != sorted(order)  # the slow first requests finished last


async def test_tensor_payload_4mib(pair) -> None:
    client, *_ = pair
    x = torch.randn(1024, 1024)
    bf = torch.randn(7, 3).to(torch.bfloat16)
    meta, bufs = tensor_meta({"x": x, "bf": bf})
    frame = await client.request(MsgType.SHARD_FORWARD, meta, bufs, timeout=10)
    out = unpack_tensors(frame.meta["tensors"], frame.payload)
    assert torch.equal(out["x"], x * 2)
    assert torch.equal(out["bf"], bf * 2)
    assert out["x"].data_ptr() % 64 == 0  # large payloads land in an aligned buffer


async def test_stream_partials_then_final(pair) -> None:
    client, *_ = pair
    frames = [f async for f in client.stream(MsgType.GENERATE, {"count": 5}, idle_timeout=5)]
    assert [f.meta.get("i") for f in frames[:-1]] == [0, 1, 2, 3, 4]
    assert all(f.is_partial for f in frames[:-1])
    assert frames[-1].meta == {"done": True} and not frames[-1].is_partial


async def test_typed_errors_are_raised_as_remote_error(pair) -> None:
    client, *_ = pair
    with pytest.raises(RemoteError) as ei:
        await client.request(MsgType.JOBS, {}, timeout=5)
    assert ei.value.code == ErrorCode.UNKNOWN_JOB
    with pytest.raises(RemoteError) as ei:
        await client.request(MsgType.JOB_STOP, {}, timeout=5)
    assert ei.value.code == ErrorCode.INTERNAL and "boom" in ei.value.message
    # The connection still works.
    assert (await client.request(MsgType.STATUS, {"n": 1}, timeout=5)).meta["echo"] == 1


async def test_cancel_reaches_the_handler_and_late_response_is_dropped(pair) -> None:
    client, *_ = pair
    task = asyncio.create_task(client.request(MsgType.ASSIGN, {}, timeout=10))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(cancelled.wait(), 5)
    # A timed-out request whose response comes late: dropped, no error, the next one works.
    with pytest.raises(TimeoutError):
        await client.request(MsgType.STATUS, {"n": 1, "delay": 0.3}, timeout=0.05)
    await asyncio.sleep(0.4)
    assert (await client.request(MsgType.STATUS, {"n": 2}, timeout=5)).meta["echo"] == 2
    assert not client._pending


async def test_ping_and_keepalive_rtt(pair) -> None:
    client, *_ = pair
    frame = await client.request(MsgType.PING, {"t": 1.0}, timeout=5)
    assert frame.msg_type == MsgType.PONG and frame.meta["t"] == 1.0
    rtts: list[float] = []
    client.start_keepalive(0.05, 2.0, rtts.append)
    for _ in range(100):
        if len(rtts) >= 2:
            break
        await asyncio.sleep(0.02)
    assert len(rtts) >= 2 and client.rtt is not None and 0 < client.rtt < 1


async def test_keepalive_notices_a_silent_peer() -> None:
    # A raw socket server that accepts and never answers.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]

    async def h(conn, req):
        return None

    conn = await connect("127.0.0.1", port, h)
    conn.start_keepalive(0.05, 0.4)
    await asyncio.wait_for(conn.wait_closed(), 3)
    assert "keepalive" in conn.close_reason
    srv.close()


async def test_peer_closing_fails_pending_requests(pair) -> None:
    client, server, port, conns = pair
    task = asyncio.create_task(client.request(MsgType.STATUS, {"n": 1, "delay": 5}, timeout=10))
    await asyncio.sleep(0.1)
    conns[0].abort("test")
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(task, 5)


async def raw_exchange(port: int, data: bytes, expect_close: bool) -> list[tuple]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    frames = []
    try:
        while True:
            head = await asyncio.wait_for(reader.readexactly(32), 2)
            magic, ver, mtype, flags, _, rid, mlen, plen = HEADER.unpack(head)
            body = await reader.readexactly(mlen + plen)
            import msgpack

            frames.append((mtype, flags, rid, msgpack.unpackb(body[:mlen]) if mlen else {}))
            if not expect_close:
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    except TimeoutError:
        if expect_close:
            raise AssertionError("connection was not closed") from None
    writer.close()
    return frames


def header(mtype=MsgType.STATUS, rid=7, mlen=0, plen=0, magic=MAGIC, version=PROTOCOL_VERSION):
    return HEADER.pack(magic, version, mtype, 0, 0, rid, mlen, plen)


@pytest.mark.parametrize(
    ("data", "code", "closes"),
    [
        (header(magic=b"HTTP"), ErrorCode.BAD_MAGIC, True),
        (header(version=99), ErrorCode.BAD_VERSION, True),
        (header(plen=2**62), ErrorCode.FRAME_TOO_LARGE, True),
        (header(mlen=10**6), ErrorCode.FRAME_TOO_LARGE, True),
        (header(mlen=1) + b"\xc1", ErrorCode.BAD_META, False),
        (header(mtype=0x7777), ErrorCode.UNKNOWN_TYPE, False),
    ],
)
async def test_bad_input_gets_documented_reaction_and_server_keeps_serving(pair, data, code, closes) -> None:
    client, server, port, conns = pair
    frames = await raw_exchange(port, data, closes)
    assert frames, "expected an ERROR frame"
    mtype, flags, rid, meta = frames[0]
    assert mtype == MsgType.ERROR and flags & Flags.RESPONSE and meta["code"] == code
    if code not in (ErrorCode.BAD_MAGIC,):
        assert rid == 7
    # The server and its other connection carry on.
    assert (await client.request(MsgType.STATUS, {"n": 3}, timeout=5)).meta["echo"] == 3


async def test_truncated_frame_then_disconnect_leaves_server_healthy(pair) -> None:
    client, server, port, conns = pair
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(header(mlen=100)[:20])
    await writer.drain()
    writer.close()
    reader2, writer2 = await asyncio.open_connection("127.0.0.1", port)
    writer2.write(header(mlen=100) + b"\x80" * 10)  # body never completes
    await writer2.drain()
    await asyncio.sleep(0.1)
    writer2.close()
    assert (await client.request(MsgType.STATUS, {"n": 4}, timeout=5)).meta["echo"] == 4


async def test_frames_split_across_many_small_writes(pair) -> None:
    client, server, port, conns = pair
    import msgpack

    meta = msgpack.packb({"n": 9})
    data = header(mlen=len(meta)) + meta
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for b in data:
        writer.write(bytes([b]))
        await writer.drain()
    head = await asyncio.wait_for(reader.readexactly(32), 3)
    _, _, mtype, flags, _, rid, mlen, _ = HEADER.unpack(head)
    body = msgpack.unpackb(await reader.readexactly(mlen))
    assert mtype == MsgType.STATUS and rid == 7 and body == {"echo": 9}
    writer.close()


async def error_of_one_request(handler) -> RemoteError:
    """Serve `handler`, send it one request, and return the ERROR it answers with."""
    server = await serve("127.0.0.1", 0, handler, lambda c: None)

    async def no(conn, req):
        return None

    client = await connect("127.0.0.1", server.sockets[0].getsockname()[1], no)
    try:
        with pytest.raises(RemoteError) as ei:
            await client.request(MsgType.STATUS, {}, timeout=5)
        return ei.value
    finally:
        client.close()
        server.close()


async def test_handler_losing_another_peer_answers_peer_down() -> None:
    async def handler(conn: Connection, req: Request) -> Reply:
        raise ConnectionClosed("connection to shard-1 closed: peer closed the connection")

    err = await error_of_one_request(handler)
    assert err.code == ErrorCode.PEER_DOWN and "shard-1" in err.message


async def test_stray_cancelled_error_in_a_handler_still_answers() -> None:
    async def handler(conn: Connection, req: Request) -> Reply:
        raise asyncio.CancelledError()  # nobody cancelled this task

    err = await error_of_one_request(handler)
    assert err.code == ErrorCode.INTERNAL
