"""Roles on the same daemon call each other without a socket.

A real Daemon runs in this process (real listening socket, real roles, the bundled
shakespeare pair). A client asks it for a speculative job; the drafter and the verifier both
land on it (the only node), so every ASSIGN, every draft window and every RELEASE goes
through the daemon's LocalConnection: the one TCP connection it accepts is the client's, and
nothing is ever written to a socket for the roles.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from p2pllm.cli.client import open_daemon
from p2pllm.config import DaemonConfig
from p2pllm.daemon.daemon import Daemon
from p2pllm.wire import connection as wire_connection
from p2pllm.wire.connection import RemoteError
from p2pllm.wire.local import LocalConnection
from p2pllm.wire.messages import ErrorCode, MsgType

PROMPT_IDS = [1, 5, 9, 13, 17, 21, 25, 29]


@pytest.fixture
async def daemon(tmp_path: Any) -> Any:
    config = DaemonConfig(name="solo", host="127.0.0.1", port=0, mdns=False, state_dir=str(tmp_path),
                          threads=1, compute_bench_seconds=0.01, test_roles=True)
    d = Daemon(config)
    task = asyncio.create_task(d.run())
    await asyncio.wait_for(d.wait_ready(), 60)
    yield d
    d.stop()
    await asyncio.wait_for(task, 30)


async def test_a_spec_job_with_both_roles_on_one_daemon_uses_no_socket(daemon: Daemon, monkeypatch: Any) -> None:
    dialed: list[tuple[str, int]] = []
    real_connect = wire_connection.connect

    async def counting_connect(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        dialed.append((host, port))
        return await real_connect(host, port, *args, **kwargs)

    monkeypatch.setattr("p2pllm.daemon.dialing.connect", counting_connect)
    client = await open_daemon(f"127.0.0.1:{daemon.port}")
    try:
        meta = {"mode": "spec", "prompt": "", "prompt_ids": PROMPT_IDS, "model": "shakespeare",
                "draft_model": "shakespeare-draft", "draft_tokens": 4, "max_tokens": 24,
                "temperature": 0.0, "seed": 1}
        frames = [f async for f in client.stream(MsgType.GENERATE, meta, idle_timeout=120)]
    finally:
        client.close()
    result = frames[-1].meta
    assert result["mode"] == "spec" and result["generated_tokens"] > 0
    local = daemon.local_connection()
    assert isinstance(local, LocalConnection)
    # Drafter and verifier were assigned, talked for several rounds and were released, all
    # handed over in-process: frames went through the local connection, no byte through a
    # socket, and the daemon accepted one TCP connection (the client's) and dialed none.
    assert local.frames_out >= 6 and local.frames_in == local.frames_out
    assert local.bytes_in == local.bytes_out == 0
    assert daemon.handshake.accepted == 1
    assert dialed == []
    snap = daemon.snapshot()
    assert [j["state"] for j in snap["jobs"] if j["pillar"] == "spec"] == ["done"]
    assert snap["node"]["roles"] == []


async def test_local_requests_keep_wire_semantics(daemon: Daemon) -> None:
    """Through the daemon's own Cluster interface: typed errors come back as RemoteError,
    payloads arrive as one contiguous writable buffer, streams end, an echo role answers."""
    me = daemon.node_id
    with pytest.raises(RemoteError) as ei:
        await daemon.request(me, MsgType.ROLE_CALL, {"job": "nope"}, timeout=5)
    assert ei.value.code == ErrorCode.UNKNOWN_JOB
    await daemon.request(me, MsgType.ASSIGN, {"job": "j", "rid": "echo", "role": "echo", "params": {}}, timeout=10)
    payload = [b"ab", memoryview(bytearray(b"cd")), bytes(100_000)]
    reply = await daemon.request(me, MsgType.ROLE_CALL, {"job": "j", "data": (1, 2)}, payload, timeout=10)
    assert reply.meta["echo"] == [1, 2]  # a tuple comes back a list, as over the wire
    assert bytes(reply.payload[:4]) == b"abcd" and reply.payload.nbytes == 100_004
    assert not reply.payload.readonly and reply.wire_bytes == 0 and reply.sent_bytes == 0
    frames = [f async for f in daemon.stream(me, MsgType.SUBSCRIBE, {"interval": 0.05, "count": 2})]
    assert [f.is_partial for f in frames] == [True, True, False]
    await daemon.request(me, MsgType.RELEASE, {"job": "j"}, timeout=10)
    assert daemon.local_connection().bytes_out == 0
