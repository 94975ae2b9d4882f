"""bench/linkproxy.py on 127.0.0.1: the bytes arrive intact and in order, never before the
configured delay (lower bounds only: a busy machine can make things slower, never faster)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from tests.conftest import bench_module

linkproxy = bench_module("linkproxy")
Link, LinkProxy = linkproxy.Link, linkproxy.LinkProxy

LOOPBACK = "127.0.0.1"


async def _echo_server() -> asyncio.base_events.Server:
    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(1 << 16):
            w.write(data)
            await w.drain()
        w.close()

    return await asyncio.start_server(echo, LOOPBACK, 0)


def _port(server: asyncio.base_events.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


async def test_round_trip_takes_at_least_both_latencies_and_bytes_are_intact() -> None:
    server = await _echo_server()
    up, down = Link(latency=0.030), Link(latency=0.020, jitter=0.010)
    async with server, LinkProxy((LOOPBACK, 0), (LOOPBACK, _port(server)), up, down, seed=1) as px:
        r, w = await asyncio.open_connection(LOOPBACK, px.port)
        for _ in range(3):
            t0 = time.perf_counter()
            w.write(b"ping")
            await w.drain()
            assert await asyncio.wait_for(r.readexactly(4), 30) == b"ping"
            assert time.perf_counter() - t0 >= 0.050  # 30 ms up + >= 20 ms down
        # many small writes with jitter: the order holds
        payload = os.urandom(200_000)
        for i in range(0, len(payload), 997):
            w.write(payload[i:i + 997])
        await w.drain()
        got = await asyncio.wait_for(r.readexactly(len(payload)), 60)
        assert got == payload
        w.write_eof()
        assert await asyncio.wait_for(r.read(), 30) == b""  # EOF forwarded both ways
        w.close()
    assert px.bytes_up == px.bytes_down == 12 + len(payload)


async def test_bandwidth_cap_is_a_lower_bound_on_transfer_time() -> None:
    server = await _echo_server()
    cap = Link(rate=2_000_000)  # 2 MB/s each way
    async with server, LinkProxy((LOOPBACK, 0), (LOOPBACK, _port(server)), cap) as px:
        r, w = await asyncio.open_connection(LOOPBACK, px.port)
        payload = os.urandom(400_000)
        t0 = time.perf_counter()
        w.write(payload)
        await w.drain()
        got = await asyncio.wait_for(r.readexactly(len(payload)), 60)
        elapsed = time.perf_counter() - t0
        w.close()
    assert got == payload
    # 0.4 MB at 2 MB/s is 0.2 s one way; the echo pipelines, so at least that (minus the
    # first and last chunk's share, which may overlap the other direction)
    assert elapsed >= 0.2 - 2 * (1 << 16) / 2_000_000


def test_link_rejects_negative_values_and_rtt_halves() -> None:
    with pytest.raises(ValueError):
        Link(latency=-1)
    link = Link.rtt(20, jitter_ms=2, mbps=8)
    assert link.latency == pytest.approx(0.010)
    assert link.jitter == pytest.approx(0.002)
    assert link.rate == pytest.approx(1e6)
