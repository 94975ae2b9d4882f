"""Protected transport and limits before trust (issue 12 items 2 and 3; protocol.md 2.1, 6, 6.3).

Real p2pllmd processes on 127.0.0.1 with a shared secret, real sockets:
- a recording TCP proxy between a client and the daemon: with the secret, neither a string the
  client sends nor one the daemon answers after AUTH crosses the wire in the clear (without
  a secret both do: the recorder sees plaintext when there is some);
- the same proxy tampers with the client's sealed frames (a flipped bit in header, body or
  tag, a replayed frame, two frames swapped, a truncated frame, an injected plain frame):
  the daemon closes that connection, logs it once, and serves a legitimate client after;
- before auth: a frame over 64 KiB gets FRAME_TOO_LARGE and a close with nothing allocated
  (the daemon's RSS does not grow), one of exactly 64 KiB is served; more than max_unauthed
  idle connections: the extra ones are closed at once, a legitimate client connects once the
  idle ones go; a handshake left unfinished is closed after handshake_timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from p2pllm.net.auth import client_handshake
from p2pllm.wire.connection import Connection, ConnectionClosed, connect
from p2pllm.wire.frame import HEADER, HEADER_SIZE, PREAUTH_MAX_BODY, Limits, encode_meta
from p2pllm.wire.messages import ErrorCode, Flags, MsgType
from p2pllm.wire.seal import TAG_SIZE
from tests.conftest import wait_for
from tests.security.conftest import (
    SECRET,
    TIMEOUT,
    _ack,
    assert_still_serves,
    closed_by_peer,
    log_problems,
    raw_frame,
    raw_header,
    raw_socket,
    read_frame,
    rss_bytes,
)

Tamper = Callable[[int, bytes], list[bytes]]


class FrameProxy:
    """127.0.0.1:port -> the daemon. Records every byte both ways; cuts the client's stream
    into frames (HELLO and AUTH plain, later ones, when `sealed`, + 16 tag bytes) and passes
    each through `tamper(index, frame) -> frames to forward` (index 0 = HELLO)."""

    def __init__(self, target_port: int, tamper: Tamper | None = None, *, sealed: bool = True) -> None:
        self.target_port = target_port
        self.tamper = tamper
        self.tag = TAG_SIZE if sealed else 0
        self.up = bytearray()  # client -> daemon, as the client sent it
        self.down = bytearray()  # daemon -> client
        self.daemon_closed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> FrameProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        d_reader, d_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def upstream() -> None:
            index = 0
            try:
                while True:
                    head = await c_reader.readexactly(HEADER_SIZE)
                    meta_len, payload_len = HEADER.unpack(head)[6:8]
                    body = await c_reader.readexactly(meta_len + payload_len + (self.tag if index >= 2 else 0))
                    frame = head + body
                    self.up += frame
                    for out in self.tamper(index, frame) if self.tamper else [frame]:
                        d_writer.write(out)
                    await d_writer.drain()
                    index += 1
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    d_writer.close()

        async def downstream() -> None:
            try:
                while chunk := await d_reader.read(1 << 16):
                    self.down += chunk
                    c_writer.write(chunk)
                    await c_writer.drain()
            except ConnectionError:
                pass
            finally:
                self.daemon_closed.set()
                with contextlib.suppress(Exception):
                    c_writer.close()

        await asyncio.gather(upstream(), downstream())


async def handshaken(port: int, secret: bytes | None, kind: str = "ctl") -> tuple[Connection, dict[str, Any]]:
    """The one way a client gets an authenticated (with a secret: sealed) connection."""
    conn = await connect("127.0.0.1", port, _ack, limits=Limits(), timeout=TIMEOUT)
    try:
        hello = await client_handshake(conn, node_id=f"{kind}-{uuid.uuid4().hex[:12]}", name="t",
                                       kind=kind, port=0, secret=secret)
    except BaseException:
        conn.close()
        raise
    return conn, hello


def config_file(tmp_path: Path, **values: Any) -> str:
    path = tmp_path / f"config-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


async def test_sealed_traffic_is_not_plaintext_on_the_wire(daemons, secret_file, tmp_path) -> None:
    sealed_d = daemons("t-sealed", "--no-mdns", "--secret-file", str(secret_file), wait=False)
    plain_d = daemons("t-plain", "--no-mdns", wait=False)  # both start at once
    sealed_d.wait_ready()
    plain_d.wait_ready()
    marker = "p2pllm-transport-marker-" + uuid.uuid4().hex
    seen: dict[bool, tuple[bytes, bytes, str, Connection]] = {}
    for secret, d in ((SECRET, sealed_d), (None, plain_d)):
        proxy = await FrameProxy(d.port, sealed=secret is not None).start()
        try:
            conn, hello = await handshaken(proxy.port, secret)
            assert conn.sealed is (secret is not None)
            pong = await conn.request(MsgType.PING, {"t": 1.5, "marker": marker}, timeout=TIMEOUT)
            assert pong.meta == {"t": 1.5}
            status = await conn.request(MsgType.STATUS, {}, timeout=TIMEOUT)
            assert status.msg_type is MsgType.STATUS
            platform = hello["caps"]["platform"]  # sent by the daemon: in its AUTH answer when sealed
            assert isinstance(platform, str) and len(platform) > 8
            conn.close()
            seen[secret is not None] = (bytes(proxy.up), bytes(proxy.down), platform, conn)
        finally:
            proxy.close()
    up, down, platform, _ = seen[True]
    assert marker.encode() not in up, "a string the client sent after AUTH crossed the wire in the clear"
    assert platform.encode() not in down, "the daemon's answer after AUTH crossed the wire in the clear"
    assert b"P2PL" in up and b"P2PL" in down  # headers stay readable (lengths checked before allocation)
    assert sealed_d.node_id.encode() in down  # the HELLO answer is plain, and the recorder works
    # Without a secret (loopback only) frames stay plain, and this recorder sees them.
    up, down, platform, _ = seen[False]
    assert marker.encode() in up and platform.encode() in down
    assert not log_problems(sealed_d.log())


def _flip(pos: int) -> Tamper:
    def tamper(i: int, frame: bytes) -> list[bytes]:
        if i != 2:
            return [frame]
        b = bytearray(frame)
        b[pos % len(b)] ^= 0x10
        return [bytes(b)]

    return tamper


def _replay(i: int, frame: bytes) -> list[bytes]:
    return [frame, frame] if i == 2 else [frame]


def _swapper() -> Tamper:
    held: list[bytes] = []

    def tamper(i: int, frame: bytes) -> list[bytes]:
        if i == 2:
            held.append(frame)
            return []
        if i == 3:
            return [frame, *held]
        return [frame]

    return tamper


def _truncate(i: int, frame: bytes) -> list[bytes]:
    return [frame[:-5]] if i == 2 else [frame]


def _inject(i: int, frame: bytes) -> list[bytes]:
    # A plain PING an outsider slips in before the client's first sealed frame.
    return [raw_frame(MsgType.PING, {"t": 9.0}, request_id=77), frame] if i == 2 else [frame]


TAMPERS: dict[str, Callable[[], Tamper]] = {
    "flipped bit in the header (request id)": lambda: _flip(19),
    "flipped bit in the ciphertext": lambda: _flip(HEADER_SIZE + 1),
    "flipped bit in the tag": lambda: _flip(-1),
    "replayed frame": lambda: _replay,
    "two frames swapped": _swapper,
    "truncated frame": lambda: _truncate,
    "injected plain frame": lambda: _inject,
}


async def test_tampered_sealed_frames_close_the_connection(daemons, secret_file) -> None:
    d = daemons("t-tamper", "--no-mdns", "--secret-file", str(secret_file))
    for n, (what, make) in enumerate(TAMPERS.items(), start=1):
        proxy = await FrameProxy(d.port, make()).start()
        try:
            conn, _ = await handshaken(proxy.port, SECRET)
            assert conn.sealed
            # Two sealed requests (frames 2 and 3 of this connection) the proxy tampers with.
            answers = await asyncio.gather(
                *(conn.request(MsgType.PING, {"t": float(k)}, timeout=TIMEOUT) for k in range(2)),
                return_exceptions=True,
            )
            await asyncio.wait_for(proxy.daemon_closed.wait(), TIMEOUT)  # the daemon hung up
            await asyncio.wait_for(conn.wait_closed(), TIMEOUT)
            assert any(isinstance(a, ConnectionClosed) for a in answers), (what, answers)
            assert not any(isinstance(a, Exception) and not isinstance(a, ConnectionClosed) for a in answers)
        finally:
            proxy.close()
        await assert_still_serves(d.port, SECRET)
        # Logged once per connection it closed.
        assert d.log().count("did not open") == n, (what, d.log())
    assert not log_problems(d.log())


async def test_a_frame_over_64_KiB_before_auth_is_refused_with_nothing_allocated(daemons, secret_file) -> None:
    d = daemons("t-big", "--no-mdns", "--secret-file", str(secret_file))
    await assert_still_serves(d.port, SECRET)
    rss_before = rss_bytes(d.proc.pid)
    chunk = b"\x00" * (1 << 20)
    for meta_len, payload_len in [(1 << 20, 0), (0, 1 << 20), (40_000, 30_000), (1000, 200 << 20)] * 2:
        with raw_socket(d.port) as sock:
            # A HELLO whose header announces more than 64 KiB (each within the post-auth
            # limits), then 1 MiB of its body: answered at the header, nothing waits for it.
            sock.sendall(raw_header(MsgType.HELLO, 0, 5, meta_len, payload_len))
            answer = read_frame(sock)
            assert answer is not None and answer[0] == MsgType.ERROR and answer[2] == 5, answer
            assert answer[3]["code"] == ErrorCode.FRAME_TOO_LARGE and "65536" in answer[3]["message"], answer
            with contextlib.suppress(ConnectionError):
                sock.sendall(chunk)
            assert closed_by_peer(sock)
    # Exactly 64 KiB of metadata + payload is allowed before auth (PING is served unauthenticated).
    with raw_socket(d.port) as sock:
        pad = "x" * (PREAUTH_MAX_BODY - len(encode_meta({"t": 2.0, "pad": "x" * 300})) + 300)
        meta = {"t": 2.0, "pad": pad}
        assert len(encode_meta(meta)) == PREAUTH_MAX_BODY
        sock.sendall(raw_frame(MsgType.PING, meta, request_id=6))
        answer = read_frame(sock)
        assert answer is not None and answer[0] == MsgType.PONG and answer[1] & Flags.RESPONSE, answer
    grown = rss_bytes(d.proc.pid) - rss_before
    assert grown < 8 << 20, f"the daemon's RSS grew by {grown} bytes"
    await assert_still_serves(d.port, SECRET)
    assert not log_problems(d.log())


async def test_unauthenticated_connections_are_capped(daemons, secret_file, tmp_path) -> None:
    cap = 4
    cfg = config_file(tmp_path, max_unauthed=cap, handshake_timeout=60.0)
    d = daemons("t-cap", "--no-mdns", "--secret-file", str(secret_file), "--config", cfg)
    authed, _ = await handshaken(d.port, SECRET)  # authenticated connections do not count
    idle = [raw_socket(d.port) for _ in range(cap)]
    try:
        await asyncio.sleep(0.5)
        extra = [raw_socket(d.port) for _ in range(3)]
        for sock in extra:  # over the cap: closed at once, nothing read or sent
            assert await asyncio.to_thread(closed_by_peer, sock, 3.0)
            sock.close()
        for sock in idle:  # the ones under the cap stay open
            sock.settimeout(0.2)
            with pytest.raises(TimeoutError):
                sock.recv(1)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError, TimeoutError)):
            await handshaken(d.port, SECRET)  # a legitimate client too, while the cap is full
        assert (await authed.request(MsgType.PING, {"t": 3.0}, timeout=TIMEOUT)).meta == {"t": 3.0}
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + TIMEOUT
    while True:  # once the idle ones go, a legitimate client connects
        try:
            await assert_still_serves(d.port, SECRET)
            break
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    authed.close()
    log = d.log()
    assert log.count("the cap max_unauthed") == 1, log  # rate-limited: one line for 4 refusals
    assert not log_problems(log)


async def test_an_unfinished_handshake_is_closed_after_the_timeout(daemons, secret_file, tmp_path) -> None:
    cfg = config_file(tmp_path, handshake_timeout=1.0)
    d = daemons("t-timeout", "--no-mdns", "--secret-file", str(secret_file), "--config", cfg)
    authed, _ = await handshaken(d.port, SECRET)
    silent = raw_socket(d.port)
    half = raw_socket(d.port)  # HELLO, then never AUTH
    t0 = time.monotonic()
    half.sendall(raw_frame(MsgType.HELLO, {"version": 1, "node_id": "half", "name": "half", "kind": "ctl",
                                           "port": 0, "nonce": b"n" * 16}, request_id=1))
    answer = read_frame(half)
    assert answer is not None and answer[0] == MsgType.HELLO and answer[3]["auth"] is True
    for sock in (silent, half):
        assert await asyncio.to_thread(closed_by_peer, sock, 8.0)
        sock.close()
    elapsed = time.monotonic() - t0
    assert 0.8 < elapsed < 8.0, elapsed
    # The authenticated connection outlived the timeout and is still served.
    assert (await authed.request(MsgType.PING, {"t": 4.0}, timeout=TIMEOUT)).meta == {"t": 4.0}
    authed.close()
    await assert_still_serves(d.port, SECRET)
    assert d.log().count("no handshake within 1.0s") == 2
    assert not log_problems(d.log())



async def test_a_dialing_daemons_caps_cross_only_sealed(daemons, secret_file) -> None:
    """With a secret, what a dialing peer's caps say (models, memory, held jobs) is not in its
    plain HELLO or AUTH: it comes in a sealed CAPS_UPDATE after the ACK, and the daemon has it."""
    d = daemons("t-caps", "--no-mdns", "--secret-file", str(secret_file))
    marker = "caps-marker-" + uuid.uuid4().hex
    proxy = await FrameProxy(d.port).start()
    conn = await connect("127.0.0.1", proxy.port, _ack, limits=Limits(), timeout=TIMEOUT)
    try:
        node_id = "peer-" + uuid.uuid4().hex[:12]
        await client_handshake(conn, node_id=node_id, name="caps-peer", kind="peer", port=1,
                               secret=SECRET, caps={"platform": marker, "models": []})

        async def peer_caps() -> Any:
            status = await conn.request(MsgType.STATUS, {}, timeout=TIMEOUT)
            return next((p for p in status.meta["peers"] if p["node_id"] == node_id
                         and p.get("platform") == marker), None)

        await wait_for(peer_caps, timeout=10, interval=0.1, what="the daemon to have the peer's caps")
        assert marker.encode() not in proxy.up, "the dialer's caps crossed the wire in the clear"
    finally:
        conn.close()
        proxy.close()
    assert not log_problems(d.log())


async def test_short_lived_connections_leave_no_memory_behind(daemons) -> None:
    """1,000 outsiders that connect, send junk and go, within the handshake timeout: the
    daemon's RSS stays flat (each once held a 256 KiB msgpack buffer until its handshake
    timer fired, ~75 MiB per 1,000; a flood could exhaust the host)."""
    d = daemons("t-flood", "--no-mdns")

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
        writer.write(b"P2PL" + bytes(range(60)))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(reader.read(100), TIMEOUT)
        writer.close()

    for _ in range(5):  # warm up (allocator pools, first frames' code paths)
        await asyncio.gather(*(one() for _ in range(20)))
    base = rss_bytes(d.proc.pid)
    for _ in range(50):
        await asyncio.gather(*(one() for _ in range(20)))
    grown = rss_bytes(d.proc.pid) - base
    assert grown < 16 << 20, f"RSS grew {grown / 2**20:.1f} MiB over 1,000 closed connections"
    await assert_still_serves(d.port, None)
