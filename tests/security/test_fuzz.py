"""Fuzz: thousands of malformed frames against a real p2pllmd, from outsiders and from
authenticated hostile peers, while a legitimate client keeps being served (issue 12, Tests).

What is checked, for every frame that asks for an answer: the answer is an ERROR with a known
ErrorCode other than INTERNAL (or a well-formed reply of the type asked, e.g. PONG), or the
connection closes; nothing hangs (every answer within REPLY_BOUND). Meanwhile a legitimate ctl
client sends STATUS / PING every ~50 ms and each is answered within LEGIT_BOUND; the daemon's
RSS stays within RSS_BOUND of its level after a warm-up; and the daemon's log has no traceback
of an unhandled exception and no ERROR-level record.

Deterministic: everything sent is drawn from random.Random seeded by SEED and the connection's
index (P2PLLM_FUZZ_SEED overrides SEED to explore; print shows the seed and the counts, so a
failure reproduces with the same seed). Frames are counted, not time: the run takes ~30-60 s
on a 2-core machine.

Outsiders work at byte level (raw sockets: random bytes, bad magic / version, huge lengths,
truncated frames then EOF, HELLO / AUTH of wrong shapes, requests before auth). Authenticated
peers go through p2pllm's own Connection after client_handshake (so through the sealed
transport once there is one): every MsgType and unknown ones, random flags and request ids
(spoofed responses too), msgpack bodies of wrong shapes built from the message schemas (each
field's valid example, its bad examples, or nested junk; missing and extra keys; big strings
within the limits), job envelopes for unknown jobs and for the roles the test itself assigned
(a shard and a verifier of the bundled model), tensors whose descriptors lie about dtype,
shape and byte count, CANCEL of random ids; and they answer the daemon's own requests with junk.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from p2pllm.wire.connection import Connection, ConnectionClosed, RemoteError, Reply, Request
from p2pllm.wire.frame import HEADER_SIZE, Frame, encode_meta
from p2pllm.wire.messages import ErrorCode, Flags, MsgType
from p2pllm.wire.schema import Body, definitions
from p2pllm.wire.tensors import ITEMSIZE
from tests.security.conftest import (
    SECRET,
    TIMEOUT,
    assert_still_serves,
    hostile,
    log_problems,
    raw_header,
    rss_bytes,
)

SEED = int(os.environ.get("P2PLLM_FUZZ_SEED", "1202"))
SCALE = float(os.environ.get("P2PLLM_FUZZ_SCALE", "1"))  # more connections, to hunt leaks
OUTSIDER_CONNS, OUTSIDER_FRAMES = int(60 * SCALE), 60  # raw connections, frames on each (before auth)
PEER_CONNS, PEER_FRAMES = int(50 * SCALE), 120  # authenticated hostile peers, frames on each
OWNER_BATCHES, OWNER_FRAMES = int(8 * SCALE), 150  # the coordinator of the test's own roles
CONCURRENCY = 6  # connections of each kind open at once
WARMUP = 6  # connections of each kind before the RSS baseline is taken
LEGIT_EVERY = 0.05  # seconds between the legitimate client's requests
LEGIT_BOUND = 5.0  # seconds within which each of them must be answered (2 busy cores)
REPLY_BOUND = 20.0  # seconds within which every fuzz request must be answered
RSS_BOUND = 64 << 20  # bytes of RSS growth allowed above the post-warm-up level
PREAUTH_BODY = 64 * 1024  # bytes of a frame's body the daemon takes before auth (issue 12)

KNOWN_CODES = {int(c) for c in ErrorCode} - {int(ErrorCode.INTERNAL)}
NO_REPLY_TYPES = {int(MsgType.PONG), int(MsgType.ERROR), int(MsgType.CANCEL)}  # ignored as requests
ALL_TYPES = [int(t) for t in MsgType]
ROLE_TYPES = [int(t) for t in MsgType if t >= 0x0100 and t < 0x0500] + [int(MsgType.ROLE_CALL)]
# the owner's frames: mostly those its shard and verifier handle
OWNER_TYPES = ROLE_TYPES + [int(t) for t in MsgType if t.name.startswith(("SHARD_", "SPEC_"))] * 4
SHARD_JOB, SPEC_JOB = "fuzz-split", "fuzz-spec"
OWN_JOBS = (SHARD_JOB, SPEC_JOB)


def _bodies() -> dict[int, list[Body]]:
    """The schema bodies of each message type (a body named "SHARD_OPEN" or "GENERATE split"
    describes requests of that type; "... reply" bodies describe answers, used as junk)."""
    for mod in ("speculative", "split", "federated", "splittrain"):
        __import__(f"p2pllm.pillars.{mod}.messages")
    __import__("p2pllm.daemon.messages")
    by_type: dict[int, list[Body]] = {}
    names = {t.name: int(t) for t in MsgType}
    for name, body in definitions().items():
        head = name.split()[0]
        if head in names:
            by_type.setdefault(names[head], []).append(body)
        elif head == "ASSIGN":
            by_type.setdefault(int(MsgType.ASSIGN), []).append(body)
    return by_type


BODIES = _bodies()


# -- junk -----------------------------------------------------------------------------------


EDGE_INTS = [0, 1, -1, 2, 255, 256, 65535, 2**31 - 1, 2**31, 2**32, 2**53, 2**63 - 1, -(2**63), 2**64 - 1]
EDGE_FLOATS = [0.0, -0.0, 0.5, 1e-300, 1e300, math.inf, -math.inf, math.nan, 3.14159]
WORDS = ["", "a", "..", "../..", "/etc/passwd", "/", "~", "\x00", "shakespeare", "echo", "shard",
         "verifier", "drafter", "fl-client", "train-stage", "auto", "spec", "split", "*", "%s%n",
         "ünï€ødé", "\ud7ff", "None", "null", "0", "-1", "nan", SHARD_JOB, SPEC_JOB, "shard0",
         "verifier", "s1", "job", "rid", "tensors"]


def junk(rng: random.Random, depth: int = 0, big: bool = True) -> Any:
    """A random msgpack value: scalars at edges, strings (some long), bytes, lists, maps."""
    r = rng.random()
    if r < 0.08:
        return None
    if r < 0.14:
        return rng.random() < 0.5
    if r < 0.30:
        return rng.choice(EDGE_INTS) if rng.random() < 0.6 else rng.randint(-1000, 100000)
    if r < 0.38:
        return rng.choice(EDGE_FLOATS)
    if r < 0.58:
        if big and rng.random() < 0.04:
            return rng.choice("xA\u00e9\u4e2d") * rng.randint(4096, 60000)  # long, within the limits
        return rng.choice(WORDS) if rng.random() < 0.6 else "".join(
            chr(rng.randint(32, 0x2FFF)) for _ in range(rng.randint(0, 40)))
    if r < 0.66:
        return rng.randbytes(rng.randint(0, 300 if not big or rng.random() < 0.95 else 50000))
    if depth >= 4:
        return rng.randint(0, 9)
    if r < 0.83:
        return [junk(rng, depth + 1, big) for _ in range(rng.randint(0, 6 if rng.random() < 0.9 else 300))]
    return {rng.choice(WORDS) if rng.random() < 0.5 else f"k{rng.randint(0, 99)}": junk(rng, depth + 1, big)
            for _ in range(rng.randint(0, 6))}


def tensor_descriptors(rng: random.Random, names: list[str]) -> tuple[list[Any], bytes]:
    """Descriptors that lie (dtype, shape, count) and a payload that may not match them."""
    dtypes = [*ITEMSIZE, "float128", "object", "complex64", "", "int4", 7]
    descs: list[Any] = []
    nbytes = 0
    for _ in range(rng.randint(0, 4)):
        dtype = rng.choice(dtypes)
        r = rng.random()
        if r < 0.4:
            shape: Any = [rng.randint(0, 6) for _ in range(rng.randint(0, 3))]
        elif r < 0.55:
            shape = [rng.choice([-1, 2**40, 2**63 - 1, 2**64 - 1, 0])] * rng.randint(1, 3)
        elif r < 0.65:
            shape = [1] * rng.randint(9, 40)  # too many dims
        elif r < 0.8:
            shape = junk(rng, 2, big=False)
        else:
            shape = [rng.randint(1, 64), rng.randint(1, 64)]
        desc: Any = {"name": rng.choice([*names, "x", "", 5]), "dtype": dtype, "shape": shape}
        if rng.random() < 0.1:
            desc = junk(rng, 2, big=False)
        elif rng.random() < 0.1:
            desc.pop(rng.choice(["name", "dtype", "shape"]))
        descs.append(desc)
        if isinstance(shape, list) and all(type(d) is int and 0 <= d < 4096 for d in shape) and dtype in ITEMSIZE:
            nbytes += math.prod(shape) * ITEMSIZE[str(dtype)]
    r = rng.random()
    if r < 0.3:
        size = nbytes  # the descriptors' own count (so the dtype/shape checks are reached)
    elif r < 0.6:
        size = max(0, nbytes - rng.randint(1, 64))  # truncated
    else:
        size = rng.randint(0, 8192)
    size = min(size, 1 << 20)
    return descs, rng.randbytes(size)


def body_for(rng: random.Random, msg_type: int, jobs: list[str]) -> tuple[Any, bytes]:
    """A body of the wrong shape for `msg_type`: its schema's keys with valid, bad or junk values,
    some missing, extra ones; or something else entirely. Returns (meta, payload)."""
    bodies = BODIES.get(msg_type) or list(definitions().values())
    body = rng.choice(bodies)
    meta: dict[Any, Any] = {}
    for f in body.fields:
        r = rng.random()
        if r < 0.15:
            continue
        try:
            if r < 0.6:
                meta[f.name] = f.example()
            elif r < 0.8:
                meta[f.name] = rng.choice(list(f.bad_examples()) or [None])
            else:
                meta[f.name] = junk(rng, 1)
        except NotImplementedError:
            meta[f.name] = junk(rng, 1)
    if msg_type in ROLE_TYPES or rng.random() < 0.2:
        r = rng.random()
        own = {0x02: (SHARD_JOB, "shard0"), 0x01: (SPEC_JOB, "verifier")}.get(msg_type >> 8)
        if own is not None and own[0] in jobs and r < 0.85:  # the role that handles this type
            meta["job"] = own[0]
            if rng.random() < 0.3:
                meta["rid"] = own[1]
        else:
            meta["job"] = rng.choice(jobs) if r < 0.6 else (
                f"no-such-job-{rng.randint(0, 99)}" if r < 0.85 else junk(rng, 2))
        if rng.random() < 0.15:
            meta["rid"] = rng.choice(["shard0", "verifier", "drafter", "x"]) if rng.random() < 0.8 else junk(rng, 2)
    if msg_type == MsgType.GENERATE and rng.random() < 0.7:
        meta["mode"] = rng.choice(["spec", "split", "x", None, 3, ["split"]])
    if msg_type == MsgType.CANCEL:
        meta = {"request_id": rng.choice([rng.randint(0, 2**64 - 1), -1, "x", [1], {"a": 1}, None, 1.5])}
    if msg_type == MsgType.SUBSCRIBE:
        meta = {"interval": rng.choice([0.05, 0.2, 0, -1, 1e9, "x", None, True]),
                "count": rng.choice([1, 2, 0, -5, 2**64 - 1, "x", [1], None, 1.5])}
    for _ in range(rng.randint(0, 3)):
        meta[f"extra{rng.randint(0, 9)}"] = junk(rng, 1)
    payload = b""
    tensor_names = [t.name for t in body.tensors]
    if tensor_names or rng.random() < 0.15:
        descs, payload = tensor_descriptors(rng, tensor_names or ["ids", "hidden", "grad"])
        meta["tensors"] = descs if rng.random() < 0.9 else junk(rng, 1)
    elif rng.random() < 0.05:
        payload = rng.randbytes(rng.randint(1, 20000))
    r = rng.random()
    if r < 0.04:
        return junk(rng, 0), payload  # not a map at all
    if r < 0.07:
        meta[rng.randint(0, 9)] = 1  # a non-string key
    return meta, payload


# -- statistics -----------------------------------------------------------------------------


@dataclass
class Stats:
    frames: Counter[str] = field(default_factory=Counter)  # sent, by attacker kind
    conns: Counter[str] = field(default_factory=Counter)
    replies: Counter[str] = field(default_factory=Counter)  # "ERROR NAME" / reply type name
    owner_replies: Counter[str] = field(default_factory=Counter)  # those the owner's frames got
    roles_held: list[tuple[str, str]] = field(default_factory=list)  # the owner's, at its end
    closed_early: int = 0  # connections the daemon closed while answers were still owed
    bad: list[str] = field(default_factory=list)  # property violations, with the frame

    def reply(self, item: Any, what: str, expected_types: set[int] | None = None) -> None:
        if isinstance(item, RemoteError):
            if item.code not in KNOWN_CODES:
                self.bad.append(f"{what}: untyped error {item}")
            name = ErrorCode(item.code).name if item.code in KNOWN_CODES | {1} else str(item.code)
            self.replies[f"ERROR {name}"] += 1
        elif isinstance(item, Frame):
            if item.msg_type is MsgType.ERROR:  # an ERROR frame as a partial response
                self.reply(RemoteError(int(item.meta.get("code", 1)), str(item.meta.get("message"))), what)
                return
            self.replies[item.msg_type.name] += 1
            if expected_types is not None and int(item.msg_type) not in expected_types:
                self.bad.append(f"{what}: answered with {item.msg_type.name}")
        elif isinstance(item, ConnectionClosed):
            self.replies["closed"] += 1
        else:
            self.bad.append(f"{what}: {item!r}")


# -- outsiders: raw bytes before auth ---------------------------------------------------------


def _frame_bytes(msg_type: int, flags: int, rid: int, meta: bytes, payload: bytes = b"") -> bytes:
    return raw_header(msg_type, flags, rid, len(meta), len(payload)) + meta + payload


def _wants_reply(msg_type: int, flags: int, rid: int) -> bool:
    return not flags & (Flags.RESPONSE | Flags.ONEWAY) and rid != 0 and msg_type not in NO_REPLY_TYPES


def outsider_plan(rng: random.Random, n: int) -> tuple[list[tuple[bytes, bool]], bytes | None, str]:
    """(frames with whether each wants an answer, a last frame that ends the connection, its kind).

    The body frames are answered on an open connection (UNAUTHENTICATED, BAD_META,
    UNKNOWN_TYPE, PONG); the last one closes it (a fatal header, a bad HELLO / AUTH, or a
    truncated frame then EOF), or is None (the client closes)."""
    frames: list[tuple[bytes, bool]] = []
    rid = 0
    for _ in range(n):
        rid += 1
        r = rng.random()
        flags = 0 if rng.random() < 0.6 else rng.randint(0, 0xFFFF)
        frid = rid if rng.random() < 0.9 else rng.choice([0, rid])
        if r < 0.45:  # a message of a random type (never HELLO/AUTH: those are endings)
            t = rng.choice(ALL_TYPES) if rng.random() < 0.8 else rng.randint(0, 0xFFFF)
            if t in (MsgType.HELLO, MsgType.AUTH):
                t = MsgType.STATUS
            meta = junk(rng, 1, big=False)
            meta = meta if isinstance(meta, dict) else {"x": meta}
            data = encode_meta(meta) if meta else b""
            if len(data) > PREAUTH_BODY - 2000:  # a frame over the pre-auth limit ends the connection
                data = encode_meta({"x": len(data)})
            payload = rng.randbytes(rng.randint(0, 2000)) if rng.random() < 0.2 else b""
            frames.append((_frame_bytes(t, flags, frid, data, payload), _wants_reply(t, flags, frid)))
        elif r < 0.65:  # metadata that is not msgpack, or not a map
            t = rng.choice([x for x in ALL_TYPES if x not in NO_REPLY_TYPES | {MsgType.HELLO, MsgType.AUTH}])
            data = rng.randbytes(rng.randint(1, 200)) if rng.random() < 0.5 else encode_meta(junk(rng, 1, big=False))
            data = data[:PREAUTH_BODY]
            if (data[:1] and 0x80 <= data[0] <= 0x8F) or data[:1] in (b"\xde", b"\xdf"):
                data = b"\xc1" + data  # never a map: 0xc1 is never valid msgpack
            frames.append((_frame_bytes(t, flags, frid, data), _wants_reply(t, flags, frid)))
        elif r < 0.8:  # PING with junk
            meta = {"t": junk(rng, 1, big=False)}
            if len(encode_meta(meta)) > PREAUTH_BODY:
                meta = {"t": 0.5}
            frames.append((_frame_bytes(MsgType.PING, flags, frid, encode_meta(meta)),
                           _wants_reply(MsgType.PING, flags, frid)))
        else:  # the reserved field set, lengths that include junk after a valid map
            t = rng.choice([int(MsgType.STATUS), int(MsgType.JOBS), int(MsgType.ASSIGN), int(MsgType.SHARD_FORWARD)])
            data = encode_meta({"job": "j"}) + rng.randbytes(rng.randint(1, 30))  # trailing bytes
            head = raw_header(t, flags, frid, len(data), 0, reserved=rng.randint(0, 0xFFFF))
            frames.append((head + data, _wants_reply(t, flags, frid)))
    r = rng.random()
    rid += 1
    if r < 0.12:
        return frames, rng.randbytes(rng.randint(1, 400)).replace(b"P2PL", b"p2pl"), "random bytes"
    if r < 0.2:
        return frames, raw_header(MsgType.STATUS, 0, rid, 0, 0, magic=rng.randbytes(4).replace(b"P2PL", b"XXXX")), "bad magic"
    if r < 0.28:
        return frames, raw_header(MsgType.STATUS, 0, rid, 0, 0, version=rng.choice([0, 2, 0xFFFF])), "bad version"
    if r < 0.4:
        meta_len, payload_len = rng.choice([(2**32 - 1, 0), (0, 2**64 - 1), (1 << 21, 0), (0, (1 << 30) + 1),
                                            (0, 1 << 17), (1 << 17, 0), (70000, 70000)])
        return frames, raw_header(rng.choice(ALL_TYPES), 0, rid, meta_len, payload_len), "huge lengths"
    if r < 0.55:
        full = _frame_bytes(MsgType.SHARD_FORWARD, 0, rid, encode_meta({"job": "j", "tensors": [
            {"name": "ids", "dtype": "int64", "shape": [64]}]}), bytes(512))
        return frames, full[: rng.randint(1, len(full) - 1)], "truncated then EOF"
    if r < 0.63:  # a header that promises a body up to 1 MiB (within the current limits), then EOF
        return frames, raw_header(MsgType.LINK_PROBE, 0, rid, 0, rng.randint(1, 1 << 20)) + rng.randbytes(100), \
            "promised body then EOF"
    if r < 0.78:
        hello: dict[str, Any] = {"version": 1, "node_id": "x", "name": "y", "kind": "peer", "port": 0,
                                 "nonce": rng.randbytes(16)}
        key = rng.choice([*hello, "all"])
        if key == "all":
            hello = junk(rng, 1, big=False) if rng.random() < 0.5 else {}
            hello = hello if isinstance(hello, dict) else {"h": hello}
        elif rng.random() < 0.3:
            del hello[key]
        else:
            hello[key] = rng.choice([junk(rng, 1, big=False), b"short", rng.randbytes(65), "self", 2, -1])
            if key == "kind" or key == "port":
                hello["version"] = 99  # a kind/port the daemon may accept: make it a refusal anyway
        return frames, _frame_bytes(MsgType.HELLO, 0, rid, encode_meta(hello)), "bad HELLO"
    if r < 0.9:
        auth = rng.choice([{}, {"proof": rng.randbytes(32)}, {"proof": "x"}, {"proof": junk(rng, 1, big=False)}])
        return frames, _frame_bytes(MsgType.AUTH, 0, rid, encode_meta(auth)), "AUTH without HELLO"
    return frames, None, "client closes"


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]] | None:
    try:
        head = await reader.readexactly(HEADER_SIZE)
        _m, _v, t, _f, _r, _rid, meta_len, payload_len = struct.unpack("!4sHHHHQIQ", head)
        body = await reader.readexactly(meta_len + payload_len)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    from p2pllm.wire.frame import decode_meta

    return t, decode_meta(body[:meta_len])


async def outsider(port: int, index: int, stats: Stats) -> None:
    rng = random.Random(f"{SEED}-outsider-{index}")
    frames, last, ending = outsider_plan(rng, OUTSIDER_FRAMES)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    stats.conns["outsider"] += 1
    what = f"outsider {index} (seed {SEED})"
    try:
        writer.write(b"".join(f for f, _ in frames))
        stats.frames["outsider"] += len(frames)
        owed = sum(w for _, w in frames)
        got = 0
        while got < owed:
            try:
                item = await asyncio.wait_for(_read_frame(reader), REPLY_BOUND)
            except TimeoutError:
                stats.bad.append(f"{what}: no answer within {REPLY_BOUND}s, {got} of {owed} answered")
                return
            if item is None:
                stats.closed_early += 1
                stats.bad.append(f"{what}: closed by the daemon with {owed - got} answers owed")
                return
            t, meta = item
            got += 1
            if t == MsgType.ERROR:
                code = meta.get("code")
                stats.replies[f"ERROR {ErrorCode(code).name}" if code in KNOWN_CODES else f"ERROR {code}"] += 1
                if code not in KNOWN_CODES:
                    stats.bad.append(f"{what}: untyped error {meta}")
            elif t == MsgType.PONG:
                stats.replies["PONG"] += 1
            else:
                stats.bad.append(f"{what}: answered {t:#06x} {meta} before auth")
        if last is None:
            return
        writer.write(last)
        stats.frames["outsider"] += 1
        stats.frames[f"ending: {ending}"] += 1
        if ending in ("truncated then EOF", "promised body then EOF", "random bytes"):
            writer.write_eof()  # random bytes shorter than a header wait for more: EOF ends them
        while True:
            try:
                item = await asyncio.wait_for(_read_frame(reader), REPLY_BOUND)
            except TimeoutError:
                stats.bad.append(f"{what}: not closed within {REPLY_BOUND}s after {ending}")
                return
            if item is None:
                stats.replies[f"closed after {ending}"] += 1
                return
            t, meta = item
            code = meta.get("code")
            if t == MsgType.HELLO and ending == "bad HELLO" and meta.get("auth") is True:
                stats.replies["HELLO accepted (a mutation that is still valid)"] += 1
                return  # it waits for AUTH now (or its handshake timeout): we hang up
            if t != MsgType.ERROR or code not in KNOWN_CODES:
                stats.bad.append(f"{what}: after {ending}: {t:#06x} {meta}")
            else:
                stats.replies[f"ERROR {ErrorCode(code).name}"] += 1
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


# -- authenticated hostile peers --------------------------------------------------------------


def junk_handler(seed: str) -> Callable[[Connection, Request], Any]:
    """Answers the daemon's requests (keepalive PINGs are answered by the wire itself) with
    junk: a random reply type and a body of the wrong shape."""
    rng = random.Random(seed)

    async def handle(conn: Connection, req: Request) -> Reply:
        meta = junk(rng, 1, big=False)
        if rng.random() < 0.5 and req.frame.msg_type is MsgType.JOBS:
            meta = {"jobs": [junk(rng, 1, big=False), {"job": junk(rng, 2, big=False)}], "roles": junk(rng, 1)}
        return Reply(MsgType(rng.choice(ALL_TYPES)), meta if isinstance(meta, dict) else {"x": meta})

    return handle


async def send_fuzz(conn: Connection, rng: random.Random, n: int, types: list[int], jobs: list[str],
                    stats: Stats, kind: str, what: str) -> None:
    """Send `n` fuzz frames on `conn`; then check every answer owed (a queue per request id)."""
    owed: list[tuple[int, asyncio.Queue[Any], str]] = []
    next_rid = 1 << 40
    for i in range(n):
        if conn.closed:
            break
        t = rng.choice(types) if rng.random() < 0.95 else rng.randint(0, 0xFFFF)
        r = rng.random()
        if r < 0.7:
            flags = 0
        elif r < 0.8:
            flags = int(Flags.ONEWAY)
        elif r < 0.9:
            flags = rng.choice([int(Flags.STREAM), int(Flags.STREAM | Flags.ONEWAY), rng.randint(8, 0xFFFF) & ~1])
        else:
            flags = rng.randint(0, 0xFFFF)  # RESPONSE among others: a spoofed answer
        next_rid += 1
        rid = next_rid
        if flags & Flags.RESPONSE:
            rid = rng.randint(0, 40)  # the daemon's own requests to us have small ids: spoof them
        elif rng.random() < 0.03:
            rid = 0
        if t == MsgType.GOODBYE and not flags & Flags.RESPONSE and rng.random() < 0.95:
            t = int(MsgType.STATUS)  # GOODBYE ends the connection: keep it rarer
        meta, payload = body_for(rng, t, jobs)
        while rng.random() > 0.005 and len(encode_meta(meta if isinstance(meta, dict) else {"_": meta})) > 900_000:
            meta, payload = body_for(rng, t, jobs)  # over max_meta closes the connection: rarely
        if t == MsgType.ERROR and flags & Flags.RESPONSE and rng.random() < 0.5:
            meta = {"code": junk(rng, 2, big=False), "message": junk(rng, 2, big=False)}
        if t in (MsgType.HELLO, MsgType.AUTH) and not flags & Flags.RESPONSE and rng.random() < 0.95:
            t = int(MsgType.PING)  # a bad re-handshake closes the connection: keep it rarer
        wants = _wants_reply(t, flags, rid)
        label = f"{what} frame {i}: type {t:#06x} flags {flags:#06x}"
        if wants:
            q: asyncio.Queue[Any] = asyncio.Queue()
            conn._pending[rid] = q  # see the answer whatever it is (partial, final or ERROR)
            owed.append((rid, q, label))
        try:
            await conn.send_frame(t, meta if isinstance(meta, dict) else {"_": meta} if meta is not None else None,
                                  [payload] if payload else (), flags=flags, request_id=rid)
        except ConnectionClosed:
            break
        except (TypeError, ValueError, OverflowError) as exc:  # msgpack refused our junk: count nothing
            if wants:
                conn._pending.pop(rid, None)
                owed.pop()
            stats.frames["unsendable"] += 1
            _ = exc
            continue
        stats.frames[kind] += 1
        if i % 20 == 19:
            await asyncio.sleep(0)  # let answers in
    deadline = time.monotonic() + REPLY_BOUND
    for rid, q, label in owed:
        try:
            item = await asyncio.wait_for(q.get(), max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            stats.bad.append(f"{label}: no answer within {REPLY_BOUND}s (seed {SEED})")
            continue
        finally:
            conn._pending.pop(rid, None)
        if isinstance(item, ConnectionClosed):
            stats.closed_early += 1
        stats.reply(item, label)
        if kind == "owner":
            stats.owner_replies[type(item).__name__ if not isinstance(item, RemoteError)
                                else ErrorCode(item.code).name if item.code in KNOWN_CODES else str(item.code)] += 1


async def peer(port: int, secret: bytes | None, index: int, stats: Stats, jobs: list[str]) -> None:
    rng = random.Random(f"{SEED}-peer-{index}")
    conn = await hostile(port, secret, "peer", name=f"fuzz{index}", handler=junk_handler(f"{SEED}-h-{index}"))
    stats.conns["peer"] += 1
    try:
        types = [t for t in ALL_TYPES]
        await send_fuzz(conn, rng, PEER_FRAMES, types, [f"no-such-{index}", *jobs], stats, "peer",
                        f"peer {index}")
    finally:
        conn.close()


# -- the roles the owner assigned (so pillar handlers see the junk) ---------------------------


async def assign_own_roles(conn: Connection, node_id: str) -> None:
    await conn.request(MsgType.ASSIGN, {
        "job": SHARD_JOB, "rid": "shard0", "role": "shard", "pillar": "split",
        "params": {"model": "shakespeare", "start": 0, "end": 4, "num_layers": 4, "max_sessions": 2,
                   "max_len": 64, "session_idle_s": 2.0, "first": {"node": node_id, "rid": "shard0"}}},
        timeout=120)
    await conn.request(MsgType.ASSIGN, {
        "job": SPEC_JOB, "rid": "verifier", "role": "verifier", "pillar": "spec",
        "params": {"model": "shakespeare", "session_timeout": 2.0}}, timeout=120)


async def owner(port: int, secret: bytes | None, node_id: str, stats: Stats, stop: asyncio.Event,
                assigned: asyncio.Event, batches: int = OWNER_BATCHES) -> None:
    """The coordinator of the test's own roles: frames for them, with bodies of wrong shapes.
    At the end it records which of its roles are still held (stats.roles_held)."""
    conn = await hostile(port, secret, "peer", name="owner", node_id="owner-" + "0" * 20)
    stats.conns["owner"] += 1
    await assign_own_roles(conn, node_id)
    assigned.set()
    try:
        for b in range(batches):
            rng = random.Random(f"{SEED}-owner-{b}")
            if conn.closed:  # a frame ended it (the roles went with it): a new owner, new roles
                conn = await hostile(port, secret, "peer", name="owner", node_id="owner-" + "0" * 20)
                stats.conns["owner"] += 1
                await assign_own_roles(conn, node_id)
            await send_fuzz(conn, rng, OWNER_FRAMES, OWNER_TYPES, list(OWN_JOBS), stats, "owner", f"owner {b}")
            if stop.is_set():
                break
        if not conn.closed:
            snap = (await conn.request(MsgType.STATUS, {}, timeout=TIMEOUT)).meta
            stats.roles_held = sorted((r["job"], r["rid"]) for r in snap["node"]["roles"])
    finally:
        conn.close()


# -- the legitimate client and the RSS sampler -------------------------------------------------


@dataclass
class Legit:
    answered: int = 0
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


async def legit_client(port: int, secret: bytes | None, stop: asyncio.Event, out: Legit) -> None:
    conn = await hostile(port, secret, "ctl", name="legit")
    try:
        i = 0
        while not stop.is_set() or out.answered < 10:  # at least 10, however fast the fuzz ran
            i += 1
            t0 = time.perf_counter()
            try:
                if i % 2:
                    f = await conn.request(MsgType.STATUS, {}, timeout=LEGIT_BOUND)
                    ok = f.msg_type is MsgType.STATUS and "node" in f.meta
                else:
                    f = await conn.request(MsgType.PING, {"t": float(i)}, timeout=LEGIT_BOUND)
                    ok = f.msg_type is MsgType.PONG and f.meta.get("t") == float(i)
            except (TimeoutError, RemoteError, ConnectionClosed) as exc:
                out.failures.append(f"request {i}: {type(exc).__name__}: {exc}")
                if conn.closed:
                    conn = await hostile(port, secret, "ctl", name="legit")
                continue
            out.latencies.append(time.perf_counter() - t0)
            if ok:
                out.answered += 1
            else:
                out.failures.append(f"request {i}: wrong answer {f.msg_type.name} {str(f.meta)[:200]}")
            await asyncio.sleep(LEGIT_EVERY)
    finally:
        conn.close()


async def sample_rss(pid: int, stop: asyncio.Event, samples: list[tuple[float, int]]) -> None:
    while not stop.is_set():
        samples.append((time.monotonic(), rss_bytes(pid)))
        await asyncio.sleep(0.1)


async def run_pool(factories: list[Callable[[], Any]], limit: int) -> None:
    sem = asyncio.Semaphore(limit)

    async def one(f: Callable[[], Any]) -> None:
        async with sem:
            await f()

    await asyncio.gather(*(one(f) for f in factories))


# -- the test ---------------------------------------------------------------------------------


@pytest.mark.timeout(600)
@pytest.mark.parametrize("with_secret", [True, False], ids=["secret", "loopback-no-secret"])
async def test_fuzz_outsiders_and_hostile_peers_while_a_legit_client_is_served(
        daemons: Any, secret_file: Any, with_secret: bool) -> None:
    """With a secret (sealed frames after AUTH; the full count), and without one (the loopback
    default, where HELLO alone admits a client; half the connections, to stay within a minute)."""
    secret = SECRET if with_secret else None
    share = 1.0 if with_secret else 0.5
    n_out, n_peer = int(OUTSIDER_CONNS * share), int(PEER_CONNS * share)
    d = daemons("fuzz", *(["--secret-file", str(secret_file)] if with_secret else []))
    pid = d.proc.pid
    stats = Stats()
    legit = Legit()
    stop = asyncio.Event()
    samples: list[tuple[float, int]] = []
    t_start = time.monotonic()
    tasks = [asyncio.create_task(legit_client(d.port, secret, stop, legit)),
             asyncio.create_task(sample_rss(pid, stop, samples))]
    try:
        assigned = asyncio.Event()
        owner_task = asyncio.create_task(owner(d.port, secret, d.node_id, stats, stop, assigned,
                                               int(OWNER_BATCHES * share)))
        await asyncio.wait_for(assigned.wait(), 120)  # the roles' models are loaded before the baseline
        jobs = list(OWN_JOBS)

        def outs(r: range) -> list[Callable[[], Any]]:
            return [lambda i=i: outsider(d.port, i, stats) for i in r]

        def peers(r: range) -> list[Callable[[], Any]]:
            return [lambda i=i: peer(d.port, secret, i, stats, jobs) for i in r]

        # warm-up: the first connections of each kind, then the RSS baseline
        await asyncio.gather(run_pool(outs(range(WARMUP)), CONCURRENCY),
                             run_pool(peers(range(WARMUP)), CONCURRENCY))
        baseline = rss_bytes(pid)
        n_warm = len(samples)
        await asyncio.gather(run_pool(outs(range(WARMUP, n_out)), CONCURRENCY),
                             run_pool(peers(range(WARMUP, n_peer)), CONCURRENCY))
        stop.set()
        await owner_task
    finally:
        stop.set()
        for t in tasks:
            await t
    elapsed = time.monotonic() - t_start
    peak = max(rss for _, rss in samples[n_warm:])
    final = rss_bytes(pid)
    await assert_still_serves(d.port, secret)
    roles = stats.roles_held
    total = stats.frames["outsider"] + stats.frames["peer"] + stats.frames["owner"]
    lat = sorted(legit.latencies)
    print(f"\nfuzz seed {SEED}: {total} frames in {elapsed:.1f}s over {sum(stats.conns.values())} connections "
          f"{dict(stats.conns)}; frames {dict(stats.frames)}")
    print(f"answers: {dict(stats.replies.most_common())}; closed with answers owed: {stats.closed_early}")
    print(f"the owner's frames for its own roles got: {dict(stats.owner_replies.most_common())}")
    print(f"legit client: {legit.answered} answered, {len(legit.failures)} failed, latency "
          f"p50 {lat[len(lat) // 2] * 1000:.1f} ms max {lat[-1] * 1000:.1f} ms (bound {LEGIT_BOUND}s)")
    print(f"RSS: post-warm-up {baseline / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB "
          f"(+{(peak - baseline) / 2**20:.1f}), final {final / 2**20:.1f} MiB; bound +{RSS_BOUND >> 20} MiB; "
          f"{len(samples)} samples; own roles still held: {sorted(roles)}")
    curve = [samples[min(len(samples) - 1, i * len(samples) // 8)][1] >> 20 for i in range(9)]
    print(f"RSS MiB over the run (ninths): {curve}")
    problems = log_problems(d.log_path.read_text())
    assert not stats.bad, f"seed {SEED}: {len(stats.bad)} violations, e.g.\n" + "\n".join(stats.bad[:20])
    assert not problems, f"seed {SEED}: the daemon log shows unhandled exceptions:\n" + "\n".join(problems[:30])
    assert total >= 10_000 * share
    assert sum(stats.conns.values()) >= 100 * share
    assert not legit.failures, legit.failures[:10]
    assert legit.answered >= 10 and lat[-1] < LEGIT_BOUND
    assert peak - baseline < RSS_BOUND, f"RSS grew {(peak - baseline) >> 20} MiB over the post-warm-up level"
