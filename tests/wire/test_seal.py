"""Sealed frames (protocol.md 6.3): key derivation, Sealer/Opener, and Connection over real
loopback sockets sealed both ways, including the handshake's switch points."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import numpy as np
import pytest

from p2pllm.wire import seal
from p2pllm.wire.connection import Connection, RemoteError, Reply, Request, connect, serve
from p2pllm.wire.frame import (
    PREAUTH_LIMITS,
    PREAUTH_MAX_BODY,
    Limits,
    ProtocolError,
    encode_meta,
    pack_header,
    unpack_header,
)
from p2pllm.wire.local import LocalConnection
from p2pllm.wire.messages import ErrorCode, Flags, MsgType
from p2pllm.wire.seal import (
    COUNTER_LIMIT,
    TAG_SIZE,
    Opener,
    Sealer,
    SealError,
    derive_keys,
    kdf_info,
)

PROTOCOL = Path(__file__).resolve().parents[2] / "protocol.md"

# The test vector of protocol.md 6.3.
SECRET = b"correct horse battery staple"
NONCE_C = bytes(range(16))
NONCE_S = bytes(range(16, 32))
KEY_C2S = "db7e8cb285373470fccec131e96f17da7a442bb9cd5064c1199f03e7d0413a6c"
KEY_S2C = "900b2a98c71a26320d82de61c650e8424e703d3a840abe1a23ce6647b3912347"
INFO_C2S = "70 32 70 6c 6c 6d 2d 73 65 61 6c 00 01 63 32 73 00 01 63 00 01 73"
PING_CT = "33 5b 2c ed 79 8b eb 09 9b ee 33 bc"
PING_TAG = "d1 21 86 07 00 a4 6f 24 8e f5 0f de 53 1b ea 0b"


def test_vector_matches_protocol_md() -> None:
    c2s, s2c = derive_keys(SECRET, NONCE_C, NONCE_S, "c", "s", 1)
    assert kdf_info(b"c2s", "c", "s", 1).hex(" ") == INFO_C2S
    assert (c2s.hex(), s2c.hex()) == (KEY_C2S, KEY_S2C)
    meta = encode_meta({"t": 1.5})
    header = pack_header(MsgType.PING, 0, 1, len(meta), 0)
    sealed = Sealer(c2s).seal(header, meta)
    assert sealed[:-TAG_SIZE].hex(" ") == PING_CT and sealed[-TAG_SIZE:].hex(" ") == PING_TAG
    assert Opener(c2s).open(header, sealed) == meta
    text = PROTOCOL.read_text()
    for value in (KEY_C2S, KEY_S2C, INFO_C2S, PING_CT, PING_TAG):
        assert value in text, f"protocol.md 6.3 lost the test vector value {value}"


def test_keys_depend_on_every_input() -> None:
    base = derive_keys(SECRET, NONCE_C, NONCE_S, "c", "s", 1)
    assert base[0] != base[1] and all(len(k) == 32 for k in base)
    variants = [
        derive_keys(SECRET + b"x", NONCE_C, NONCE_S, "c", "s", 1),
        derive_keys(SECRET, NONCE_S, NONCE_C, "c", "s", 1),
        derive_keys(SECRET, NONCE_C[:-1] + b"\xff", NONCE_S, "c", "s", 1),
        derive_keys(SECRET, NONCE_C, NONCE_S, "s", "c", 1),
        derive_keys(SECRET, NONCE_C, NONCE_S, "c", "s2", 1),
        derive_keys(SECRET, NONCE_C, NONCE_S, "c", "s", 2),
    ]
    keys = {k for pair in [base, *variants] for k in pair}
    assert len(keys) == 2 * (1 + len(variants))
    # Length prefixes: moving a byte from one node id to the other changes the keys.
    assert derive_keys(SECRET, NONCE_C, NONCE_S, "ab", "c", 1) != derive_keys(SECRET, NONCE_C, NONCE_S, "a", "bc", 1)
    with pytest.raises(ValueError):
        kdf_info(b"xxx", "c", "s", 1)


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("size", [0, 1, 1000, 300_000])
def test_round_trip_in_place(size: int, inplace: bool) -> None:
    key = os.urandom(32)
    s, o = Sealer(key), Opener(key)
    s.inplace = o.inplace = inplace
    for i in range(3):
        header = pack_header(MsgType.ACK, 1, i + 1, 0, size)
        body = os.urandom(size)
        buf = memoryview(bytearray(body + bytes(TAG_SIZE)))
        s.seal_into(header, buf, size)
        assert size < 16 or bytes(buf[:size]) != body  # (a 1-byte ciphertext may equal its plaintext)
        o.open_into(header, buf, buf[:size])
        assert bytes(buf[:size]) == body
    assert s.counter == o.counter == 3


def _sealed_frames(key: bytes, n: int) -> list[tuple[bytes, bytes]]:
    s = Sealer(key)
    out = []
    for i in range(n):
        meta = encode_meta({"i": i, "pad": "x" * 40})
        header = pack_header(MsgType.PING, 0, i + 1, len(meta), 0)
        out.append((header, s.seal(header, meta)))
    return out


def test_tampered_replayed_reordered_injected_frames_do_not_open() -> None:
    key = os.urandom(32)
    frames = _sealed_frames(key, 3)
    header, body = frames[0]
    for pos in range(len(header) + len(body)):  # every single bit flip, header or body or tag
        h, b = bytearray(header), bytearray(body)
        if pos < len(h):
            h[pos] ^= 1 << (pos % 8)
        else:
            b[pos - len(h)] ^= 1 << (pos % 8)
        with pytest.raises(SealError):
            Opener(key).open(bytes(h), b)
    o = Opener(key)
    o.open(*frames[0])
    with pytest.raises(SealError):  # replayed
        o.open(*frames[0])
    assert o.counter == 1  # a failure leaves the counter
    with pytest.raises(SealError):  # reordered: frame 2 before frame 1
        o.open(*frames[2])
    plain_meta = encode_meta({"i": 1})
    with pytest.raises(SealError):  # injected: a plain body with a made-up tag
        o.open(pack_header(MsgType.PING, 0, 2, len(plain_meta), 0), plain_meta + bytes(TAG_SIZE))
    with pytest.raises(SealError):  # the other direction's key
        Opener(os.urandom(32)).open(*frames[0])
    o.open(*frames[1])
    o.open(*frames[2])


def test_counter_exhaustion() -> None:
    key = os.urandom(32)
    s, o = Sealer(key), Opener(key)
    s.counter = o.counter = COUNTER_LIMIT - 1
    header = pack_header(MsgType.PING, 0, 1, 0, 0)
    last = s.seal(header, b"")  # counter 2**64 - 1 is still used
    o.open(header, last)
    with pytest.raises(SealError, match="exhausted"):
        s.seal(header, b"")
    with pytest.raises(SealError, match="exhausted"):
        o.open(header, last)


def test_preauth_limit_checks_the_sum_before_allocation() -> None:
    unpack_header(pack_header(MsgType.HELLO, 0, 1, PREAUTH_MAX_BODY // 2, PREAUTH_MAX_BODY // 2), PREAUTH_LIMITS)
    with pytest.raises(ProtocolError) as info:
        unpack_header(pack_header(MsgType.HELLO, 0, 1, PREAUTH_MAX_BODY // 2, PREAUTH_MAX_BODY // 2 + 1), PREAUTH_LIMITS)
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE and info.value.fatal
    assert Limits().max_body == Limits().max_meta + Limits().max_payload


# -- Connection over real sockets ------------------------------------------------------------


async def _echo(conn: Connection, req: Request) -> Reply | None:
    t = req.frame.msg_type
    if t is MsgType.STATUS:  # a stream of 3 partials, then the final
        for i in range(3):
            await req.partial(MsgType.STATUS, {"i": i})
        return Reply(MsgType.STATUS, {"done": True})
    if t is MsgType.GOODBYE:
        conn.info.setdefault("oneway", []).append(req.meta["n"])
        return None
    payload = req.frame.payload
    return Reply(MsgType.LINK_PROBE, {**req.meta, "aligned": payload.nbytes == 0 or _addr(payload) % 64 == 0},
                 [payload] if payload.nbytes else [])


def _addr(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0])


async def _pair(arm: str = "now") -> tuple[Connection, Connection, asyncio.Server]:
    """A client and the server's side of one connection, both sealed ("now": from the start)."""
    k_c2s, k_s2c = os.urandom(32), os.urandom(32)
    accepted: asyncio.Future[Connection] = asyncio.get_running_loop().create_future()

    def on_connection(conn: Connection) -> None:
        if arm == "now":
            conn.enable_sealing(k_s2c, k_c2s)
        else:
            conn.enable_sealing(k_s2c, k_c2s, after_received=MsgType.AUTH)
        accepted.set_result(conn)

    limits = Limits(max_payload=1 << 28)
    server = await serve("127.0.0.1", 0, _echo, on_connection, limits=limits)
    client = await connect("127.0.0.1", server.sockets[0].getsockname()[1], _echo, limits=limits)
    if arm == "now":
        client.enable_sealing(k_c2s, k_s2c)
    else:
        client.enable_sealing(k_c2s, k_s2c, after_sent=MsgType.AUTH)
    return client, await accepted, server


async def test_sealed_connection_carries_every_kind_of_traffic() -> None:
    client, server_side, server = await _pair()
    try:
        assert client.sealed and server_side.sealed
        r = await client.request(MsgType.LINK_PROBE, {"x": 1})
        assert r.meta["x"] == 1
        assert r.wire_bytes == 32 + len(encode_meta(r.meta)) + TAG_SIZE  # the tag is counted
        big = np.random.default_rng(0).integers(0, 255, 5 << 20, dtype=np.uint8)
        r = await client.request(MsgType.LINK_PROBE, {"y": 2}, [big])
        assert bytes(r.payload) == big.tobytes() and r.meta["aligned"] is True
        assert r.payload.readonly is False
        many = await asyncio.gather(*[client.request(MsgType.LINK_PROBE, {"i": i}, [big[: i * 3000]]) for i in range(60)])
        assert all(bytes(f.payload) == big[: i * 3000].tobytes() for i, f in enumerate(many))
        parts = [f.meta async for f in client.stream(MsgType.STATUS, {})]
        assert parts == [{"i": 0}, {"i": 1}, {"i": 2}, {"done": True}]
        for n in range(5):
            await client.notify(MsgType.GOODBYE, {"n": n})
        pong = await client.request(MsgType.PING, {"t": 2.5})
        assert pong.meta == {"t": 2.5}
        assert server_side.info["oneway"] == [0, 1, 2, 3, 4]
        assert client.bytes_out == server_side.bytes_in and client.bytes_in == server_side.bytes_out
    finally:
        client.close()
        server.close()


async def test_copying_path_without_decrypt_into(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seal, "HAS_INPLACE", False)
    client, _, server = await _pair()
    try:
        big = np.arange(1 << 20, dtype=np.uint8)
        r = await client.request(MsgType.LINK_PROBE, {"k": "v"}, [big])
        assert bytes(r.payload) == big.tobytes() and r.meta["k"] == "v"
    finally:
        client.close()
        server.close()


async def test_switch_after_auth_both_ways_and_pipelined_frames() -> None:
    """The client switches as it writes AUTH, the server as it reads it: HELLO is plain, the
    AUTH answer sealed, and sealed requests the client pipelines right after AUTH are served."""
    client, server_side, server = await _pair(arm="auth")
    try:
        hello = await client.request(MsgType.HELLO, {"n": 1})  # plain both ways
        assert not client.sealed and not server_side.sealed and hello.meta["n"] == 1
        auth = asyncio.ensure_future(client.request(MsgType.AUTH, {"proof": b"p"}))
        await asyncio.sleep(0)
        assert client.sealed  # switched right after writing AUTH
        pipelined = [asyncio.ensure_future(client.request(MsgType.LINK_PROBE, {"i": i})) for i in range(5)]
        assert (await auth).meta["proof"] == b"p"
        assert server_side.sealed
        assert [(await p).meta["i"] for p in pipelined] == list(range(5))
        assert client.bytes_in == server_side.bytes_out
    finally:
        client.close()
        server.close()


async def test_a_frame_part_way_in_at_the_switch_closes() -> None:
    client, server_side, server = await _pair(arm="auth")
    try:
        assert client._protocol is not None
        client._protocol._header = unpack_header(pack_header(MsgType.PING, 0, 9, 10, 0), Limits())
        with pytest.raises(ConnectionError):
            await client.request(MsgType.AUTH, {})
        assert client.closed and "part-way" in client.close_reason
    finally:
        client.close()
        server.close()


async def test_unsealed_side_is_closed_by_the_sealed_one() -> None:
    """One side sealed, the other plain (an injected plain frame): the sealed side closes."""
    k = os.urandom(32)
    accepted: asyncio.Future[Connection] = asyncio.get_running_loop().create_future()

    def on_connection(conn: Connection) -> None:
        conn.enable_sealing(k, k)
        accepted.set_result(conn)

    server = await serve("127.0.0.1", 0, _echo, on_connection)
    client = await connect("127.0.0.1", server.sockets[0].getsockname()[1], _echo)
    try:
        # The sealed side reads each header's body + 16 tag bytes: the second plain frame
        # supplies the bytes the first one lacks, and the first fails to open.
        pings = [asyncio.ensure_future(client.request(MsgType.PING, {"t": 1.0})) for _ in range(2)]
        for ping in pings:
            with pytest.raises((ConnectionError, RemoteError)):
                await asyncio.wait_for(ping, 5)
        side = await accepted
        await asyncio.wait_for(side.wait_closed(), 5)
        assert "did not open" in side.close_reason
    finally:
        client.close()
        server.close()


async def test_sealed_body_over_the_aead_limit_is_refused_before_anything_is_sent() -> None:
    client, _, server = await _pair()
    try:
        huge = np.empty(seal.MAX_SEALED_BODY, dtype=np.uint8)  # never touched: virtual memory only
        before = client.bytes_out
        with pytest.raises(ProtocolError) as info:
            await client.notify(MsgType.GOODBYE, {"n": 0}, [huge])
        assert info.value.code == ErrorCode.FRAME_TOO_LARGE and client.bytes_out == before
        assert (await client.request(MsgType.PING, {"t": 1.0})).meta == {"t": 1.0}
    finally:
        client.close()
        server.close()


async def test_local_connection_is_never_sealed() -> None:
    conn = LocalConnection(_echo)
    with pytest.raises(TypeError):
        conn.enable_sealing(os.urandom(32), os.urandom(32))
    assert not conn.sealed
    assert (await conn.request(MsgType.LINK_PROBE, {"x": 3})).meta["x"] == 3


@pytest.mark.parametrize("sizes", [[0, 5], [7, 0, 100_000, 3], [30, 1 << 20, 17]])
def test_sealing_piece_by_piece_gives_the_same_bytes(sizes: list[int]) -> None:
    key = os.urandom(32)
    pieces = [os.urandom(n) for n in sizes]
    body = b"".join(pieces)
    header = pack_header(MsgType.ACK, 1, 5, sizes[0], len(body) - sizes[0])
    out = memoryview(bytearray(len(body) + TAG_SIZE))
    s = Sealer(key)
    s.counter = 41
    assert s.seal_pieces_into(header, [memoryview(p) for p in pieces], out) == len(out)
    ref = Sealer(key)
    ref.counter = 41
    assert bytes(out) == ref.seal(header, body)
    o = Opener(key)
    o.counter = 41
    assert o.open(header, out) == body


async def test_an_exhausted_counter_closes_the_connection() -> None:
    client, server_side, server = await _pair()
    try:
        assert client._sealer is not None
        client._sealer.counter = COUNTER_LIMIT  # sending: the next frame would reuse a nonce
        with pytest.raises(ConnectionError):
            await client.request(MsgType.PING, {"t": 1.0})
        assert client.closed and "exhausted" in client.close_reason
    finally:
        client.close()
        server.close()
    client, server_side, server = await _pair()
    try:
        assert server_side._protocol is not None and server_side._protocol._opener is not None
        server_side._protocol._opener.counter = COUNTER_LIMIT  # receiving side
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(client.request(MsgType.PING, {"t": 1.0}), 5)
        assert server_side.closed and "exhausted" in server_side.close_reason
    finally:
        client.close()
        server.close()


async def _read_frame(reader: asyncio.StreamReader, opener: Opener | None) -> tuple[int, int, int, dict]:
    from p2pllm.wire.frame import HEADER, decode_meta

    head = await reader.readexactly(32)
    _, _, t, flags, _, rid, mlen, plen = HEADER.unpack(head)
    body = await reader.readexactly(mlen + plen + (TAG_SIZE if opener else 0))
    if opener is not None:
        body = bytes(opener.open(head, body))
    return t, flags, rid, decode_meta(body[:mlen])


def _frame(sealer: Sealer | None, t: int, meta: dict, flags: int, rid: int) -> bytes:
    m = encode_meta(meta)
    head = pack_header(t, flags, rid, len(m), 0)
    return head + (sealer.seal(head, m) if sealer else m)


@pytest.mark.parametrize("sealed_after_hello", [True, False])
async def test_client_reads_everything_after_the_hello_answer_sealed(sealed_after_hello: bool) -> None:
    """A server's frame right behind its HELLO answer (same TCP write, before the client has
    its keys) is held, then opened sealed once the client switches at AUTH; a plain one there
    closes the client's connection."""
    k_c2s, k_s2c = os.urandom(32), os.urandom(32)
    seen: list[tuple[int, int, int, dict]] = []
    done = asyncio.Event()

    async def raw_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        s2c, c2s = Sealer(k_s2c), Opener(k_c2s)
        try:
            t, _, rid, _ = await _read_frame(reader, None)  # HELLO
            after = _frame(s2c if sealed_after_hello else None, MsgType.PING, {"t": 7.0}, 0, 900)
            writer.write(_frame(None, MsgType.HELLO, {"ok": 1}, 1, rid) + after)
            t, _, auth_rid, _ = await _read_frame(reader, None)  # AUTH, plain
            seen.append((t, 0, auth_rid, {}))
            if sealed_after_hello:
                seen.append(await _read_frame(reader, c2s))  # the PONG to the held PING, sealed
            # (a plain frame is 16 bytes short of a sealed one: the ACK's bytes complete it)
            writer.write(_frame(s2c, MsgType.ACK, {"auth": "ok"}, 1, auth_rid))
            await writer.drain()
            await reader.read()
        except (asyncio.IncompleteReadError, ConnectionError, SealError) as exc:
            seen.append((0, 0, 0, {"error": repr(exc)}))
        finally:
            done.set()
            writer.close()

    server = await asyncio.start_server(raw_server, "127.0.0.1", 0)
    client = await connect("127.0.0.1", server.sockets[0].getsockname()[1], _echo)
    try:
        client.hold_reading_after(MsgType.HELLO)
        hello = await client.request(MsgType.HELLO, {"n": 1})
        assert hello.meta == {"ok": 1}
        await asyncio.sleep(0.2)  # the frame behind the answer has arrived: it waits
        assert client.frames_in == 1 and not client.closed
        client.enable_sealing(k_c2s, k_s2c, after_sent=MsgType.AUTH)
        if sealed_after_hello:
            ack = await asyncio.wait_for(client.request(MsgType.AUTH, {}), 5)
            assert ack.meta == {"auth": "ok"}
            assert seen[0][0] == MsgType.AUTH
            assert seen[1][:3] == (MsgType.PONG, Flags.RESPONSE, 900) and seen[1][3] == {"t": 7.0}
        else:
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(client.request(MsgType.AUTH, {}), 5)
            assert "did not open" in client.close_reason
    finally:
        client.close()
        await asyncio.wait_for(done.wait(), 5)
        server.close()


async def test_a_flood_while_frames_are_held_closes() -> None:
    async def raw_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, _, rid, _ = await _read_frame(reader, None)
        writer.write(_frame(None, MsgType.HELLO, {"ok": 1}, 1, rid) + b"\x00" * (400 << 10))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            await reader.read()
        writer.close()

    server = await asyncio.start_server(raw_server, "127.0.0.1", 0)
    client = await connect("127.0.0.1", server.sockets[0].getsockname()[1], _echo)
    try:
        client.hold_reading_after(MsgType.HELLO)
        assert (await client.request(MsgType.HELLO, {})).meta == {"ok": 1}
        await asyncio.wait_for(client.wait_closed(), 5)
        assert "too much" in client.close_reason
    finally:
        client.close()
        server.close()
