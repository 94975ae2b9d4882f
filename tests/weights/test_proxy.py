"""The test proxy (tests/weights/proxy.py) against a plain echo server and a real daemon:
bytes forwarded both ways unchanged, half-close, bandwidth and latency floors, frames followed
across any chunk boundaries (plain and through a sealed handshake), one byte flipped in the
payload of WEIGHTS_READ responses only, pause/resume, drop, an unreachable upstream."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from p2pllm.wire.frame import HEADER_SIZE, encode_frame
from p2pllm.wire.messages import Flags, MsgType
from tests.conftest import DaemonProc
from tests.weights.proxy import C2S, S2C, TAG, WEIGHTS_READ, FrameParser, Proxy, ProxyThread

RESP = int(Flags.RESPONSE)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo every byte back until EOF, then close."""
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def echo() -> AsyncIterator[int]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


def frame(msg_type: int, meta: dict | None = None, payload: bytes = b"", flags: int = 0, rid: int = 1) -> bytes:
    return b"".join(bytes(b) for b in encode_frame(msg_type, meta, [payload] if payload else [],
                                                   flags=flags, request_id=rid))


async def roundtrip(port: int, data: bytes, timeout: float = 20.0) -> bytes:
    """Send `data`, half-close, read everything echoed until EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async def send() -> None:
            writer.write(data)
            await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        got = await asyncio.wait_for(reader.read(-1), timeout)
        await sender
        return got
    finally:
        writer.close()


async def test_forwards_both_ways_unchanged(echo: int) -> None:
    data = random.Random(1).randbytes(3 << 20)
    async with Proxy(echo) as proxy:
        assert await roundtrip(proxy.port, data) == data
        await proxy.wait(lambda p: p.open_connections == 0, what="the connection closed")
        assert proxy.bytes[C2S] == proxy.bytes[S2C] == len(data)
        assert proxy.accepted == 1
        # Not p2pllm frames: followed no further, nothing flipped even with corruption on.
        assert proxy.unparsed == 2 and proxy.flips == []


async def test_corrupt_flag_never_touches_non_p2pllm_bytes(echo: int) -> None:
    data = b"\x00" * 100_000
    async with Proxy(echo, corrupt=float("inf")) as proxy:
        assert await roundtrip(proxy.port, data) == data
        assert proxy.flips == []


async def test_rate_limit_is_a_floor_on_transfer_time(echo: int) -> None:
    data = os.urandom(600_000)
    async with Proxy(echo, rate=1_000_000) as proxy:
        t0 = time.monotonic()
        assert await roundtrip(proxy.port, data) == data
        took = time.monotonic() - t0
    # Each direction may send its burst (10 ms of the rate) at once, then at most 1 MB/s.
    assert took >= 0.55, took


async def test_latency_delays_each_direction(echo: int) -> None:
    async with Proxy(echo, latency=0.15) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        t0 = time.monotonic()
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
        assert time.monotonic() - t0 >= 0.3
        writer.close()


def test_parser_follows_frames_across_any_chunking() -> None:
    """Feed the same stream whole, byte by byte and in random chunks: the same counts, and
    exactly the payload byte at the middle of each WEIGHTS_READ response is flipped."""
    payload = bytes(range(256)) * 41  # 10496 bytes
    stream = b"".join([
        frame(MsgType.PING, {"t": 1.5}, rid=1),
        frame(WEIGHTS_READ, {"model": "m", "digest": "d", "pieces": [0, 1]}, rid=2),  # request
        frame(WEIGHTS_READ, {"pieces": [0, 1], "lengths": [5000, 5496]}, payload, flags=RESP, rid=2),
        frame(MsgType.STATUS, {"x": 1}, payload, flags=RESP, rid=3),  # another type: untouched
        frame(WEIGHTS_READ, {"pieces": [2], "lengths": [0]}, b"", flags=RESP, rid=4),  # no payload
        frame(WEIGHTS_READ, {"pieces": [3], "lengths": [10496]}, payload, flags=RESP | int(Flags.STREAM), rid=5),
    ])
    rng = random.Random(7)
    for chunking in ("whole", "bytes", "random"):
        proxy = Proxy(1, corrupt=float("inf"))
        parser = FrameParser(proxy, S2C)
        if chunking == "whole":
            parts = [stream]
        elif chunking == "bytes":
            parts = [stream[i:i + 1] for i in range(len(stream))]
        else:
            cuts = sorted(rng.sample(range(1, len(stream)), 40))
            parts = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        out = b"".join(bytes(parser.feed(p)) for p in parts)
        assert parser.ok, chunking
        assert proxy.frames[S2C] == 6
        assert proxy.frames_of(WEIGHTS_READ) == 3 and proxy.frames_of(WEIGHTS_READ, response=False) == 1
        assert proxy.payload_of(WEIGHTS_READ) == 2 * len(payload)
        diff = [i for i in range(len(stream)) if stream[i] != out[i]]
        assert len(diff) == 2 and len(proxy.flips) == 2, (chunking, diff)
        for flip, pos in zip(proxy.flips, diff, strict=True):
            assert flip.msg_type == WEIGHTS_READ and flip.offset == len(payload) // 2
            assert out[pos] == stream[pos] ^ 0xFF
            # The flipped byte lies in that frame's payload: at payload start + offset.
            start = stream.index(frame(WEIGHTS_READ, *_frame_args(flip.request_id, payload)))
            head_meta = len(frame(WEIGHTS_READ, *_frame_args(flip.request_id, b"")))
            assert pos == start + head_meta + flip.offset
            assert pos >= start + HEADER_SIZE


def _frame_args(rid: int, payload: bytes) -> tuple:
    meta = {"pieces": [0, 1], "lengths": [5000, 5496]} if rid == 2 else {"pieces": [3], "lengths": [10496]}
    flags = RESP if rid == 2 else RESP | int(Flags.STREAM)
    return meta, payload, flags, rid


def test_parser_counts_a_limited_number_of_corruptions() -> None:
    proxy = Proxy(1, corrupt=1)
    parser = FrameParser(proxy, S2C)
    one = frame(WEIGHTS_READ, {"pieces": [0]}, b"abcdef", flags=RESP, rid=9)
    out = [bytes(parser.feed(one)) for _ in range(3)]
    assert out[0] != one and out[1] == one and out[2] == one
    assert len(proxy.flips) == 1
    proxy.corrupt(0)
    assert bytes(parser.feed(one)) == one


def test_parser_follows_a_sealed_handshake() -> None:
    """After the HELLO answer with auth true (server) and the AUTH frame (client), frames carry
    a 16-byte tag; the parser keeps its place through them."""
    proxy = Proxy(1, corrupt=float("inf"))
    c2s, s2c = FrameParser(proxy, C2S), FrameParser(proxy, S2C)
    c2s.feed(frame(MsgType.HELLO, {"version": 1, "node_id": "c"}, rid=1))
    s2c.feed(frame(MsgType.HELLO, {"version": 1, "auth": True, "nonce": b"n" * 16}, flags=RESP, rid=1))
    c2s.feed(frame(MsgType.AUTH, {"proof": b"p" * 32}, rid=2))
    assert c2s.sealed and s2c.sealed
    sealed = frame(WEIGHTS_READ, {"pieces": [0]}, b"x" * 1000, flags=RESP, rid=3) + os.urandom(TAG)
    for _ in range(3):
        s2c.feed(sealed[:500])
        s2c.feed(sealed[500:])
        c2s.feed(frame(MsgType.PING, {"t": 1.0}, rid=4) + os.urandom(TAG))
    assert c2s.ok and s2c.ok
    assert proxy.frames_of(WEIGHTS_READ) == 3 and proxy.frames_of(MsgType.PING, C2S, False) == 3
    assert len(proxy.flips) == 3  # flipped in the ciphertext: the receiver's tag check fails


def test_parser_without_auth_stays_plain() -> None:
    proxy = Proxy(1)
    s2c = FrameParser(proxy, S2C)
    s2c.feed(frame(MsgType.HELLO, {"version": 1, "auth": False, "caps": {}}, flags=RESP, rid=1))
    assert not s2c.sealed
    s2c.feed(frame(MsgType.PONG, {"t": 1.0}, flags=RESP, rid=2) * 2)
    assert s2c.ok and proxy.frames[S2C] == 3


async def test_pause_holds_bytes_until_resume(echo: int) -> None:
    async with Proxy(echo) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        await proxy.wait(lambda p: p.open_connections == 1, what="the upstream connection")
        proxy.pause()
        writer.write(b"held")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(4), 0.3)
        assert proxy.bytes[C2S] == 0
        proxy.resume()
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"held"
        writer.close()


async def test_drop_aborts_open_connections(echo: int) -> None:
    async with Proxy(echo) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"x")
        assert await asyncio.wait_for(reader.readexactly(1), 10) == b"x"
        proxy.drop()
        assert await asyncio.wait_for(reader.read(-1), 10) == b""
        await proxy.wait(lambda p: p.open_connections == 0, what="no connection left")
        writer.close()


async def test_unreachable_upstream_closes_the_client() -> None:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    async with Proxy(port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(1), 10)
        assert proxy.failed_upstream == 1
        writer.close()


def test_proxy_thread_for_synchronous_callers(tmp_path: Path) -> None:
    """A real daemon, with a secret, reached through a ProxyThread: the handshake and sealed
    STATUS requests pass, and the proxy follows every frame (no desync)."""
    secret = tmp_path / "secret"
    secret.write_text("proxy-test-secret-0123456789abcdef0123456789")
    secret.chmod(0o600)
    d = DaemonProc("px", ["--no-mdns", "--secret-file", str(secret), "--state-dir", str(tmp_path / "state")],
                   tmp_path).wait_ready()
    try:
        with ProxyThread(d.port) as pt:
            from p2pllm.cli.client import open_daemon

            async def talk() -> None:
                conn = await open_daemon(f"127.0.0.1:{pt.port}", str(secret))
                try:
                    for _ in range(3):
                        snap = await conn.request(MsgType.STATUS, {}, timeout=10)
                        assert snap.meta["node"]["node_id"] == d.node_id
                finally:
                    conn.close()

            asyncio.run(talk())
            pt.wait(lambda p: p.frames_of(MsgType.STATUS) >= 3, what="three STATUS answers")
            p = pt.proxy
            assert p.unparsed == 0, p.stats()
            assert p.frames_of(MsgType.HELLO) == 1 and p.frames_of(MsgType.AUTH, C2S, False) == 1
    finally:
        d.stop()


async def test_pause_when_stops_after_a_frame(echo: int) -> None:
    """pause_when: the proxy holds everything after the write that completed the first PING
    echoed back; a second frame waits for resume()."""
    ping = frame(MsgType.PING, {"t": 1.0}, rid=1)
    async with Proxy(echo) as proxy:
        proxy.pause_when = lambda p: p.frames_of(MsgType.PING, S2C, False) >= 1
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(ping)
        assert await asyncio.wait_for(reader.readexactly(len(ping)), 10) == ping
        await proxy.wait(lambda p: p.paused, what="paused by pause_when")
        assert proxy.pause_when is None
        writer.write(ping)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(len(ping)), 0.3)
        proxy.resume()
        assert await asyncio.wait_for(reader.readexactly(len(ping)), 10) == ping
        assert proxy.frames_of(MsgType.PING, C2S, False) == 2
        writer.close()
