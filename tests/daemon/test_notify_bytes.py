"""The daemon's Cluster.notify returns the bytes the connection wrote: 0 to itself (handed
over in-process), the frame's size on the wire to a peer. Roles count with it (a shard's
bytes_out) instead of re-encoding the frame.

Two real Daemons run in this process on loopback; b dials a (static peer).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from p2pllm.config import DaemonConfig
from p2pllm.daemon.daemon import Daemon
from p2pllm.wire.frame import HEADER_SIZE
from p2pllm.wire.messages import MsgType


def _config(name: str, tmp: Any, peers: tuple[str, ...] = ()) -> DaemonConfig:
    return DaemonConfig(name=name, host="127.0.0.1", port=0, mdns=False, state_dir=str(tmp / name),
                        threads=1, compute_bench_seconds=0.01, peers=peers)


@pytest.fixture
async def pair(tmp_path: Any) -> AsyncIterator[tuple[Daemon, Daemon]]:
    a = Daemon(_config("a", tmp_path))
    ta = asyncio.create_task(a.run())
    await asyncio.wait_for(a.wait_ready(), 60)
    b = Daemon(_config("b", tmp_path, (f"127.0.0.1:{a.port}",)))
    tb = asyncio.create_task(b.run())
    try:
        await asyncio.wait_for(b.wait_ready(), 60)
        for _ in range(300):
            if a.peers.conn(b.node_id) is not None and b.peers.conn(a.node_id) is not None:
                break
            await asyncio.sleep(0.05)
        yield a, b
    finally:
        b.stop()
        a.stop()
        await asyncio.wait_for(asyncio.gather(ta, tb), 30)


async def test_notify_returns_the_bytes_on_the_wire(pair: Any) -> None:
    a, b = pair
    conn = a.peers.conn(b.node_id)
    assert conn is not None, "b never connected to a"
    meta: dict[str, Any] = {"job": "no-such-job", "pad": "x" * 300}
    payload = [bytes(1000), memoryview(bytearray(24))]
    before = conn.bytes_out
    n = await a.notify(b.node_id, MsgType.ROLE_CALL, meta, payload)
    # header + metadata + payload, as the connection wrote it (keepalive PINGs may add more)
    assert HEADER_SIZE + 300 + 1024 < n < HEADER_SIZE + 400 + 1024
    assert conn.bytes_out - before >= n
    local = a.local_connection()
    frames, out = local.frames_out, local.bytes_out
    assert await a.notify(a.node_id, MsgType.ROLE_CALL, meta, payload) == 0  # in-process
    assert local.frames_out == frames + 1 and local.bytes_out == out == 0
