"""Shared helpers for the security tests: a hostile client at byte level and at message level,
filesystem and memory snapshots, and the check that a daemon still serves a legitimate client.

Daemons are real p2pllmd processes started with the `daemons` fixture of tests/conftest.py
(127.0.0.1, port 0). With a secret: ``daemons("a", "--secret-file", str(secret_file))``.

- ``raw_socket(port)``: a blocking TCP socket, for bytes no well-behaved client would send;
  ``raw_frame(...)`` builds one frame's bytes, ``read_frame(sock)`` reads one answer (or None
  when the daemon closed the connection).
- ``await hostile(port, secret, kind)``: an authenticated p2pllm Connection, made the way a
  real client makes one (wire.connection.connect + net.auth.client_handshake), so everything it
  sends after the handshake goes through the same transport (sealed, once that lands).
- ``tree_digest(path)``: every path under a directory with its kind, size, mtime and sha256;
  compare two digests to assert the filesystem is unchanged.
- ``rss_bytes(pid)``: the resident set size of a process, from /proc.
- ``await assert_still_serves(port, secret)``: a fresh legitimate ctl client gets STATUS and
  PING answered.
- ``log_problems(text)``: the lines of a daemon log that show an unhandled exception.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from p2pllm.net.auth import client_handshake
from p2pllm.wire.connection import Connection, Reply, Request, connect
from p2pllm.wire.frame import HEADER, HEADER_SIZE, Buffer, Limits, decode_meta, encode_frame
from p2pllm.wire.messages import MsgType

SECRET = b"security-tests-shared-secret-0123456789abcdef"
TIMEOUT = 10.0  # seconds any single answer from a daemon may take in these tests

Secret = bytes | str | os.PathLike[str] | None


# -- secrets --------------------------------------------------------------------------------


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    """A secret file (mode 0600) holding SECRET, for --secret-file and hostile(secret=...)."""
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    path.chmod(0o600)
    return path


def _secret_bytes(secret: Secret) -> bytes | None:
    if secret is None or isinstance(secret, bytes):
        return secret
    return Path(secret).read_bytes().strip()


# -- byte level -----------------------------------------------------------------------------


def raw_socket(port: int, timeout: float = TIMEOUT) -> socket.socket:
    """A connected blocking TCP socket to 127.0.0.1:port (close it yourself, or use `with`)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def raw_frame(
    msg_type: int,
    meta: Mapping[str, Any] | None = None,
    payload: Sequence[Buffer] = (),
    *,
    flags: int = 0,
    request_id: int = 1,
) -> bytes:
    """One well-formed frame's bytes (corrupt them as the attack needs)."""
    return b"".join(bytes(b) for b in encode_frame(msg_type, meta, payload, flags=flags, request_id=request_id))


def raw_header(
    msg_type: int, flags: int, request_id: int, meta_len: int, payload_len: int,
    *, magic: bytes = b"P2PL", version: int = 1, reserved: int = 0,
) -> bytes:
    """A 32-byte header with any field values (lengths need not match what follows)."""
    return HEADER.pack(magic, version, msg_type, flags, reserved, request_id, meta_len, payload_len)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def read_frame(sock: socket.socket) -> tuple[int, int, int, dict[str, Any], bytes] | None:
    """Read one frame: (msg_type, flags, request_id, meta, payload), or None when the daemon
    closed (or reset) the connection. A timeout raises socket.timeout (the daemon hung)."""
    head = _recv_exact(sock, HEADER_SIZE)
    if head is None:
        return None
    _magic, _version, msg_type, flags, _r, rid, meta_len, payload_len = HEADER.unpack(head)
    body = _recv_exact(sock, meta_len + payload_len) if meta_len + payload_len else b""
    if body is None:
        return None
    return msg_type, flags, rid, decode_meta(body[:meta_len]), body[meta_len:]


def closed_by_peer(sock: socket.socket, timeout: float = TIMEOUT) -> bool:
    """True once the daemon has closed the connection (reads EOF or a reset within `timeout`),
    reading and dropping whatever it still sends."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False


# -- message level --------------------------------------------------------------------------


async def _ack(conn: Connection, req: Request) -> Reply | None:
    return None


async def hostile(
    port: int,
    secret: Secret = None,
    kind: str = "peer",
    *,
    node_id: str | None = None,
    name: str = "hostile",
    listen_port: int = 0,
    handler: Any = _ack,
    limits: Limits | None = None,
) -> Connection:
    """An authenticated Connection to 127.0.0.1:port, as `kind` ("peer" or "ctl").

    `secret` is the secret's bytes or a path to a secret file. Requests the daemon sends to a
    "peer" are answered by `handler` (default: ACK). Close it yourself (conn.close())."""
    conn = await connect(
        "127.0.0.1", port, handler, limits=limits or Limits(max_payload=1 << 32), name=name, timeout=TIMEOUT
    )
    try:
        await client_handshake(
            conn,
            node_id=node_id or f"{kind}-{uuid.uuid4().hex[:12]}",
            name=name,
            kind=kind,
            port=listen_port,
            secret=_secret_bytes(secret),
        )
    except BaseException:
        conn.close()
        raise
    return conn


async def assert_still_serves(port: int, secret: Secret = None, timeout: float = TIMEOUT) -> dict[str, Any]:
    """A fresh legitimate ctl client gets STATUS and PING answered; returns the STATUS meta."""
    conn = await hostile(port, secret, "ctl", name="legit")
    try:
        status = await conn.request(MsgType.STATUS, {}, timeout=timeout)
        assert status.msg_type is MsgType.STATUS, status
        pong = await conn.request(MsgType.PING, {"t": 1.25}, timeout=timeout)
        assert pong.msg_type is MsgType.PONG and pong.meta.get("t") == 1.25, pong
        return status.meta
    finally:
        conn.close()


# -- filesystem, memory, logs ---------------------------------------------------------------


def tree_digest(path: str | os.PathLike[str]) -> dict[str, tuple[Any, ...]]:
    """{relative path: (kind, size, mtime_ns, sha256 or link target)} of everything under
    `path` (itself included as "."); symlinks are recorded, not followed."""
    root = Path(path)
    out: dict[str, tuple[Any, ...]] = {}
    if not root.exists() and not root.is_symlink():
        return out
    items = [root, *sorted(root.rglob("*"))] if root.is_dir() and not root.is_symlink() else [root]
    for p in items:
        rel = "." if p == root else str(p.relative_to(root))
        st = p.lstat()
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = ("dir", st.st_mode & 0o7777)
        else:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[rel] = ("file", st.st_size, st.st_mtime_ns, h.hexdigest())
    return out


def rss_bytes(pid: int) -> int:
    """The resident set size of process `pid` in bytes (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


PROBLEM_MARKERS = ("Traceback", "Task exception was never retrieved", " ERROR ", " CRITICAL ")


def log_problems(text: str) -> list[str]:
    """The lines of a daemon log that show an unhandled exception or an ERROR-level record."""
    return [line for line in text.splitlines() if any(m in line for m in PROBLEM_MARKERS)]


def u64(n: int) -> bytes:
    return struct.pack("!Q", n)


async def wait_closed(conn: Connection, timeout: float = TIMEOUT) -> bool:
    """True once `conn` has closed (the daemon dropped it) within `timeout`."""
    try:
        await asyncio.wait_for(conn.wait_closed(), timeout)
    except TimeoutError:
        return False
    return True
