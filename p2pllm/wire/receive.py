"""Receiving frames from a TCP stream: an asyncio BufferedProtocol feeding a FrameSink.

- Small frames are parsed out of one reusable buffer (each body copied out, it is small).
- A large body is received straight into its own buffer (one kernel copy, no re-assembly),
  laid out so that the payload starts 64-byte aligned, and tensors are built on it.
- A header is validated against the limits before anything is allocated for its body.
- Sealed frames (protocol.md 6.3), once the connection has switched: the header is read and
  checked as above and kept as the associated data; a small body is decrypted out of the
  receive buffer into its own buffer (the decryption is the copy), a large one is received
  into its aligned buffer with its tag and decrypted there in place. A frame that does not
  open closes the connection (no ERROR frame: the peer is not who it claims to be).

No torch here (large bodies are numpy buffers, numpy imported on the first one), so the wire
layer and the CLI load without torch.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Callable
from typing import Any, cast

from p2pllm.wire.frame import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    Header,
    Limits,
    ProtocolError,
    unpack_header,
)
from p2pllm.wire.messages import ErrorCode
from p2pllm.wire.seal import MAX_SEALED_BODY, TAG_SIZE, Opener, SealError

RECV_BUFFER = 256 * 1024  # reusable receive buffer for small frames
SMALL_BODY = 64 * 1024  # bodies below this are copied into a plain bytearray

_unpack_from = HEADER.unpack_from
_make_header = functools.partial(tuple.__new__, Header)  # Header._make without its checks


class FrameSink:
    """What the protocol delivers to (the Connection): frames, fatal errors, flow control."""

    limits: Limits
    _is_closed: bool = False

    def _on_frame(self, header: Header, body: memoryview) -> None:
        raise NotImplementedError

    def _fatal(self, exc: ProtocolError, rid: int) -> None:
        raise NotImplementedError

    def _lost(self, reason: str) -> None:
        raise NotImplementedError

    def _seal_failed(self, reason: str) -> None:
        raise NotImplementedError

    def _pause_writing(self) -> None:
        raise NotImplementedError

    def _resume_writing(self) -> None:
        raise NotImplementedError


def alloc_aligned(nbytes: int, offset: int = 0) -> memoryview:
    """A writable buffer of `nbytes`; from SMALL_BODY bytes up, its byte `offset` sits on a
    64-byte boundary (small ones are plain bytearrays, as small bodies copied out of the
    receive buffer are).

    Large buffers are uninitialised numpy arrays (malloc'd, not zero-filled: the allocator
    reuses freed blocks of the same size without page faults); numpy is imported only when
    the first large body arrives, so the wire layer itself loads neither numpy nor torch.
    """
    if nbytes < SMALL_BODY:
        return memoryview(bytearray(nbytes))
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy comes with torch
        raw: Any = bytearray(nbytes + 64)
        import ctypes

        addr = ctypes.addressof(ctypes.c_char.from_buffer(raw))
    else:
        raw = numpy.empty(nbytes + 64, dtype=numpy.uint8)
        addr = raw.__array_interface__["data"][0]
    start = -(addr + offset) % 64
    return memoryview(raw)[start : start + nbytes]


def alloc_body(header: Header) -> memoryview:
    """An uninitialised buffer for a frame body whose payload starts 64-byte aligned."""
    return alloc_aligned(header.meta_len + header.payload_len, header.meta_len)


class FrameProtocol(asyncio.BufferedProtocol):
    """Parses frames out of the byte stream; see the module docstring."""

    def __init__(self, make_connection: Callable[[asyncio.Transport, FrameProtocol], FrameSink]):
        self._make_connection = make_connection
        self.conn: FrameSink | None = None
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._header: Header | None = None
        self._body: memoryview | None = None
        self._pos = 0
        self._opener: Opener | None = None  # set once the connection reads sealed frames
        self._aad = b""  # the header of the sealed frame being received
        self._held = False  # frames wait unparsed in the buffer (see hold())
        self.paused = False
        self._dead = False
        self.made: asyncio.Future[FrameSink] = asyncio.get_running_loop().create_future()

    # asyncio callbacks --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = self._make_connection(transport, self)
        if not self.made.done():
            self.made.set_result(self.conn)

    def connection_lost(self, exc: Exception | None) -> None:
        self._dead = True
        # Free the receive buffers now: a closed connection may sit in a reference cycle (its
        # tasks) until a full GC, rare in a process of many long-lived objects, and 256 KiB
        # each made a daemon's RSS grow with every connection it had closed.
        self._view = memoryview(b"")
        self._buf = bytearray()
        self._header = self._body = None
        if self.conn is not None:
            self.conn._lost(f"connection lost: {exc}" if exc else "peer closed the connection")
            self.conn = None

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn._pause_writing()

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn._resume_writing()

    def eof_received(self) -> bool | None:
        return False  # close the transport

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._body is not None:
            return self._body[self._pos :]
        if len(self._buf) - self._end < 4096:
            self._compact()
            if self._held and len(self._buf) - self._end < 4096 and not self._dead:
                self._dead = True  # a full buffer of frames while they must wait: give up
                if self.conn is not None:
                    self.conn._seal_failed("the peer sent too much while its frames had to wait")
                return memoryview(bytearray(4096))
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._dead:
            return
        if self._body is not None:
            self._pos += nbytes
            if self._pos == len(self._body):
                header, body = self._header, self._body
                self._header = None
                self._body = None
                assert header is not None and self.conn is not None
                if self._opener is not None:  # body and tag, opened in place
                    n = len(body) - TAG_SIZE
                    try:
                        self._opener.open_into(self._aad, body, body[:n])
                    except SealError as exc:
                        self._dead = True
                        self.conn._seal_failed(str(exc))
                        return
                    body = body[:n]
                self.conn._on_frame(header, body)
            return
        self._end += nbytes
        self._parse()

    # parsing ------------------------------------------------------------------------------

    def _compact(self) -> None:
        n = self._end - self._start
        if self._start:
            self._buf[:n] = self._buf[self._start : self._end]
            self._start, self._end = 0, n

    @property
    def sealed(self) -> bool:
        return self._opener is not None

    @property
    def mid_frame(self) -> bool:
        """Whether a frame's header has been read and its body not yet delivered."""
        return self._header is not None

    def set_opener(self, opener: Opener) -> None:
        """Open every frame whose header is read from now on (call at a frame boundary: from
        the sink's _on_frame, or while no frame is part-way in); frames held (hold()) are
        parsed now, opened."""
        if self._header is not None:
            raise RuntimeError("cannot switch to sealed frames in the middle of a frame")
        self._opener = opener
        self.release()

    def hold(self) -> None:
        """Parse no further frame until release() or set_opener(): the bytes that arrive
        wait in the receive buffer (at most its size; more closes the connection). Called
        from the sink's _on_frame, so the hold starts at that frame's end: the client holds
        what follows the HELLO answer until it has the keys to open it."""
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            if not self._dead and self._end > self._start:
                self._parse()

    def _parse(self) -> None:
        if self._held or (self._opener is None and not self._parse_plain()):
            return
        if self._opener is not None and not self._held:  # sealed, or switched by the last frame
            self._parse_sealed()

    def _parse_plain(self) -> bool:
        """Plain frames; returns True when a delivered frame switched the connection to
        sealed frames (the rest of the buffer is then parsed as sealed) or held it."""
        conn = self.conn
        assert conn is not None
        view = self._view
        limits = conn.limits
        while not self._dead and not conn._is_closed:
            avail = self._end - self._start
            header = self._header
            if header is None:
                if avail < HEADER_SIZE:
                    break
                start = self._start
                magic, version, msg_type, flags, _, rid, meta_len, payload_len = _unpack_from(view, start)
                if magic == MAGIC and version == PROTOCOL_VERSION and meta_len <= limits.max_meta and (
                    payload_len <= limits.max_payload and meta_len + payload_len <= limits.max_body
                ):
                    header = _make_header((msg_type, flags, rid, meta_len, payload_len, version))
                else:
                    raw = view[start : start + HEADER_SIZE]
                    try:
                        header = unpack_header(raw, limits)  # raises the typed error
                    except ProtocolError as exc:
                        self._header_error(conn, exc, raw)
                        return False
                self._header = header
                self._start = start + HEADER_SIZE
                avail -= HEADER_SIZE
            body_len = header.meta_len + header.payload_len
            if avail >= body_len:
                # Whole body is here: copy it out of the shared buffer (small frames).
                start = self._start
                if body_len < SMALL_BODY:
                    body = memoryview(self._buf[start : start + body_len])
                else:
                    body = alloc_body(header)
                    body[:] = view[start : start + body_len]
                self._start = start + body_len
                self._header = None
                conn._on_frame(header, body)
                if self._opener is not None or self._held:
                    return True
                limits = conn.limits  # a handshake answer may have raised them (limits_after)
                continue
            # Partial body: receive the rest directly into its own buffer.
            body = alloc_body(header)
            body[:avail] = view[self._start : self._end]
            self._start = self._end = 0
            self._body = body
            self._pos = avail
            break
        if self._start == self._end:
            self._start = self._end = 0
        return False

    def _header_error(self, conn: FrameSink, exc: ProtocolError, raw: memoryview) -> None:
        rid = int.from_bytes(raw[12:20], "big") if exc.code != ErrorCode.BAD_MAGIC else 0
        self._dead = True
        conn._fatal(exc, rid)

    def _parse_sealed(self) -> None:
        """Sealed frames: header checked as for plain ones (and the sealed body bound), then
        body + tag opened with the connection's Opener, counter by counter."""
        conn = self.conn
        opener = self._opener
        assert conn is not None and opener is not None
        view = self._view
        limits = conn.limits
        while not self._dead and not conn._is_closed:
            avail = self._end - self._start
            header = self._header
            if header is None:
                if avail < HEADER_SIZE:
                    break
                start = self._start
                raw = view[start : start + HEADER_SIZE]
                magic, version, msg_type, flags, _, rid, meta_len, payload_len = _unpack_from(raw)
                body_len = meta_len + payload_len
                if magic == MAGIC and version == PROTOCOL_VERSION and meta_len <= limits.max_meta and (
                    payload_len <= limits.max_payload and body_len <= limits.max_body
                    and body_len <= MAX_SEALED_BODY
                ):
                    header = _make_header((msg_type, flags, rid, meta_len, payload_len, version))
                else:
                    try:
                        header = unpack_header(raw, limits)  # raises the typed error, or:
                        raise ProtocolError(
                            ErrorCode.FRAME_TOO_LARGE,
                            f"a sealed body of {body_len} bytes exceeds the limit {MAX_SEALED_BODY}",
                            fatal=True,
                        )
                    except ProtocolError as exc:
                        self._header_error(conn, exc, raw)
                        return
                self._aad = bytes(raw)
                self._header = header
                self._start = start + HEADER_SIZE
                avail -= HEADER_SIZE
            body_len = header.meta_len + header.payload_len
            need = body_len + TAG_SIZE
            if avail >= need:
                start = self._start
                body = memoryview(bytearray(body_len)) if body_len < SMALL_BODY else alloc_body(header)
                try:
                    opener.open_into(self._aad, view[start : start + need], body)
                except SealError as exc:
                    self._dead = True
                    conn._seal_failed(str(exc))
                    return
                self._start = start + need
                self._header = None
                conn._on_frame(header, body)
                continue
            # Partial: body and tag go straight into one aligned buffer, opened in place.
            body = alloc_aligned(need, header.meta_len)
            body[:avail] = view[self._start : self._end]
            self._start = self._end = 0
            self._body = body
            self._pos = avail
            break
        if self._start == self._end:
            self._start = self._end = 0

    def pause(self) -> None:
        if not self.paused and self._transport is not None:
            self.paused = True
            self._transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self._transport is not None and not self._dead:
            self.paused = False
            self._transport.resume_reading()
