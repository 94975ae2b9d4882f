"""An async, multiplexed connection carrying frames over one TCP stream.

- Many requests in flight at once, matched to responses by request id, in any order.
- Streams: a handler may send partial responses (Flags.STREAM) before its final one.
- A late response to a cancelled or timed-out request is dropped (logged at debug).
- Receiving is done with a BufferedProtocol: small frames are parsed out of one reusable
  buffer; a large payload is received straight into its own aligned buffer (one kernel copy,
  no re-assembly), and tensors are built on it.
- Sending hands the header+metadata and each payload buffer to the transport in one
  writelines() call (frames never interleave), then waits only when the transport has asked
  us to pause (backpressure), not on every write.
- A header is validated against the limits before anything is allocated for its body.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from p2pllm.wire.frame import (
    HEADER_SIZE,
    Buffer,
    Frame,
    Header,
    Limits,
    ProtocolError,
    body_to_frame,
    encode_frame,
    payload_nbytes,
    unpack_header,
)
from p2pllm.wire.messages import ErrorCode, Flags, MsgType

log = logging.getLogger(__name__)

RECV_BUFFER = 256 * 1024  # reusable receive buffer for small frames
SMALL_BODY = 64 * 1024  # bodies below this are copied into a plain bytearray
MAX_INFLIGHT_HANDLERS = 512  # pause reading above this many running handlers


class ConnectionClosed(ConnectionError):
    """The connection closed before the answer came."""


class RemoteError(Exception):
    """The peer answered a request with an ERROR frame."""

    def __init__(self, code: int, message: str) -> None:
        try:
            name = ErrorCode(code).name
        except ValueError:
            name = f"code {code}"
        super().__init__(f"{name}: {message}")
        self.code = code
        self.message = message


@dataclass
class Reply:
    """What a handler answers: a message type, metadata and optional payload buffers."""

    msg_type: MsgType = MsgType.ACK
    meta: dict[str, Any] = field(default_factory=dict)
    payload: Sequence[Buffer] = ()


class Request:
    """An incoming request as seen by a handler."""

    __slots__ = ("conn", "frame")

    def __init__(self, conn: Connection, frame: Frame) -> None:
        self.conn = conn
        self.frame = frame

    @property
    def meta(self) -> dict[str, Any]:
        return self.frame.meta

    @property
    def wants_reply(self) -> bool:
        return self.frame.request_id != 0 and not self.frame.flags & Flags.ONEWAY

    async def partial(
        self, msg_type: MsgType, meta: dict[str, Any], payload: Sequence[Buffer] = ()
    ) -> None:
        """Send one partial (streamed) response; the handler's return value ends the stream."""
        if not self.wants_reply:
            return
        await self.conn.send_frame(
            msg_type,
            meta,
            payload,
            flags=Flags.RESPONSE | Flags.STREAM,
            request_id=self.frame.request_id,
        )


Handler = Callable[["Connection", Request], Awaitable[Reply | None]]


class Connection:
    """One peer connection. Create with `connect()` or through `serve()`."""

    def __init__(
        self,
        transport: asyncio.Transport,
        protocol: FrameProtocol,
        handler: Handler,
        limits: Limits,
        name: str = "",
    ) -> None:
        self._transport = transport
        self._protocol = protocol
        self._handler = handler
        self.limits = limits
        self.name = name
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Frame] | asyncio.Queue[Frame | BaseException]] = {}
        self._handlers: dict[int, asyncio.Task[None]] = {}
        self._oneway_tasks: set[asyncio.Task[None]] = set()
        self._keepalive: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._close_reason = ""
        self._close_callbacks: list[Callable[[Connection], None]] = []
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.created = time.monotonic()
        self.last_recv = self.created
        self.bytes_in = 0
        self.bytes_out = 0
        self.frames_in = 0
        self.frames_out = 0
        self.rtt: float | None = None  # seconds, from the last keepalive PING
        # Free-form attributes the daemon attaches after the handshake (peer id, auth state).
        self.info: dict[str, Any] = {}
        peer = transport.get_extra_info("peername")
        self.peername: tuple[str, int] | None = tuple(peer[:2]) if peer else None  # type: ignore[assignment]

    # -- state --------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def close_reason(self) -> str:
        return self._close_reason

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def on_close(self, callback: Callable[[Connection], None]) -> None:
        if self.closed:
            callback(self)
        else:
            self._close_callbacks.append(callback)

    def __repr__(self) -> str:
        return f"<Connection {self.name or self.peername}{' closed' if self.closed else ''}>"

    # -- sending ------------------------------------------------------------------------------

    async def send_frame(
        self,
        msg_type: int,
        meta: dict[str, Any] | None = None,
        payload: Sequence[Buffer] = (),
        *,
        flags: int = 0,
        request_id: int = 0,
    ) -> None:
        if self.closed:
            raise ConnectionClosed(f"connection {self.name} is closed: {self._close_reason}")
        bufs = encode_frame(msg_type, meta, payload, flags=flags, request_id=request_id)
        if len(bufs) == 1:
            self._transport.write(bufs[0])
        else:
            self._transport.writelines(bufs)
        self.frames_out += 1
        self.bytes_out += sum(memoryview(b).nbytes for b in bufs)
        if not self._can_write.is_set():
            await self._can_write.wait()
            if self.closed:
                raise ConnectionClosed(f"connection {self.name} closed: {self._close_reason}")

    async def notify(
        self, msg_type: MsgType, meta: dict[str, Any] | None = None, payload: Sequence[Buffer] = ()
    ) -> None:
        """A one-way message: no response is expected or sent."""
        await self.send_frame(msg_type, meta, payload, flags=Flags.ONEWAY)

    async def request(
        self,
        msg_type: MsgType,
        meta: dict[str, Any] | None = None,
        payload: Sequence[Buffer] = (),
        *,
        timeout: float | None = None,
    ) -> Frame:
        """Send a request and wait for its (final) response. ERROR raises RemoteError."""
        if self.closed:
            raise ConnectionClosed(f"connection {self.name} is closed: {self._close_reason}")
        rid = next(self._ids)
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self.send_frame(msg_type, meta, payload, request_id=rid)
            if timeout is None:
                frame = await fut
            else:
                async with asyncio.timeout(timeout):
                    frame = await fut
        except BaseException:
            if self._pending.pop(rid, None) is not None and not self.closed:
                self._send_cancel(rid)
            raise
        return frame

    async def stream(
        self,
        msg_type: MsgType,
        meta: dict[str, Any] | None = None,
        payload: Sequence[Buffer] = (),
        *,
        idle_timeout: float | None = None,
    ) -> AsyncIterator[Frame]:
        """Send a request; yield its partial responses, then its final one."""
        if self.closed:
            raise ConnectionClosed(f"connection {self.name} is closed: {self._close_reason}")
        rid = next(self._ids)
        queue: asyncio.Queue[Frame | BaseException] = asyncio.Queue()
        self._pending[rid] = queue
        try:
            await self.send_frame(msg_type, meta, payload, request_id=rid)
            while True:
                if idle_timeout is None:
                    item = await queue.get()
                else:
                    async with asyncio.timeout(idle_timeout):
                        item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if not item.is_partial:
                    return
        finally:
            if self._pending.pop(rid, None) is not None and not self.closed:
                self._send_cancel(rid)

    def _send_cancel(self, rid: int) -> None:
        with contextlib.suppress(Exception):
            bufs = encode_frame(MsgType.CANCEL, {"request_id": rid}, flags=Flags.ONEWAY)
            self._transport.write(bufs[0])

    # -- receiving ----------------------------------------------------------------------------

    def _on_frame(self, header: Header, body: memoryview) -> None:
        self.last_recv = time.monotonic()
        self.frames_in += 1
        self.bytes_in += HEADER_SIZE + header.body_len
        is_request = not header.flags & Flags.RESPONSE
        try:
            frame = body_to_frame(header, body)
        except ProtocolError as exc:
            log.debug("%s: bad frame: %s", self, exc)
            if is_request and header.request_id and not header.flags & Flags.ONEWAY:
                self._write_error(header.request_id, exc.code, exc.message)
            elif not is_request:
                self._resolve(header.request_id, exc)
            return
        if not is_request:
            if frame.msg_type == MsgType.ERROR:
                meta = frame.meta
                self._resolve(
                    frame.request_id,
                    RemoteError(int(meta.get("code", ErrorCode.INTERNAL)), str(meta.get("message"))),
                )
            else:
                self._resolve(frame.request_id, frame)
            return
        if frame.msg_type == MsgType.PING:
            if frame.request_id:
                self._write_raw(MsgType.PONG, {"t": frame.meta.get("t")}, frame.request_id)
            return
        if frame.msg_type == MsgType.CANCEL:
            task = self._handlers.get(frame.meta.get("request_id", -1))
            if task is not None:
                task.cancel()
            return
        if frame.msg_type == MsgType.PONG or frame.msg_type == MsgType.ERROR:
            return  # responses without the flag: ignore
        task = asyncio.get_running_loop().create_task(self._handle(frame))
        if frame.request_id and not frame.flags & Flags.ONEWAY:
            old = self._handlers.get(frame.request_id)
            if old is not None:  # a peer reusing an id in flight: the new one answers
                old.cancel()
            self._handlers[frame.request_id] = task
            task.add_done_callback(functools.partial(self._handler_done, frame.request_id))
        else:
            self._oneway_tasks.add(task)
            task.add_done_callback(self._oneway_tasks.discard)
        if len(self._handlers) + len(self._oneway_tasks) > MAX_INFLIGHT_HANDLERS:
            self._protocol.pause()

    def _handler_done(self, rid: int, task: asyncio.Task[None]) -> None:
        if self._handlers.get(rid) is task:
            del self._handlers[rid]
        if len(self._handlers) + len(self._oneway_tasks) < MAX_INFLIGHT_HANDLERS // 2:
            self._protocol.resume()

    def _resolve(self, rid: int, item: Frame | BaseException) -> None:
        waiter = self._pending.get(rid)
        if waiter is None:
            log.debug("%s: dropping late response to request %d", self, rid)
            return
        if isinstance(waiter, asyncio.Queue):
            waiter.put_nowait(item)
            if isinstance(item, BaseException) or not item.is_partial:
                del self._pending[rid]
            return
        if isinstance(item, Frame) and item.is_partial:
            log.debug("%s: partial response to a plain request %d dropped", self, rid)
            return
        del self._pending[rid]
        if waiter.done():
            return
        if isinstance(item, BaseException):
            waiter.set_exception(item)
        else:
            waiter.set_result(item)

    async def _handle(self, frame: Frame) -> None:
        req = Request(self, frame)
        try:
            reply = await self._handler(self, req)
            if req.wants_reply and not self.closed:
                reply = reply or Reply()
                await self.send_frame(
                    reply.msg_type,
                    reply.meta,
                    reply.payload,
                    flags=Flags.RESPONSE,
                    request_id=frame.request_id,
                )
        except ProtocolError as exc:
            if req.wants_reply:
                self._write_error(frame.request_id, exc.code, exc.message)
            if exc.fatal:
                self.close(exc.message)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # really cancelled: by CANCEL, a closing connection or shutdown
            # A CancelledError that escaped a handler without anyone cancelling it.
            log.warning("%s: handler for %s raised a stray CancelledError", self, frame.msg_type.name)
            if req.wants_reply and not self.closed:
                self._write_error(frame.request_id, ErrorCode.INTERNAL, "handler was cancelled")
        except ConnectionClosed as exc:
            # Either this connection closed (nothing can be sent) or one the handler used
            # to reach another peer did: tell our caller which peer went away.
            log.debug("%s: connection closed while handling %s: %s", self, frame.msg_type.name, exc)
            if req.wants_reply and not self.closed:
                self._write_error(frame.request_id, ErrorCode.PEER_DOWN, str(exc))
        except Exception as exc:
            log.warning("%s: handler for %s failed", self, frame.msg_type.name, exc_info=True)
            if req.wants_reply:
                self._write_error(frame.request_id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def _write_raw(self, msg_type: MsgType, meta: dict[str, Any], rid: int) -> None:
        if self.closed:
            return
        buf = encode_frame(msg_type, meta, flags=Flags.RESPONSE, request_id=rid)[0]
        self._transport.write(buf)
        self.frames_out += 1
        self.bytes_out += len(buf)

    def _write_error(self, rid: int, code: ErrorCode, message: str) -> None:
        self._write_raw(MsgType.ERROR, {"code": int(code), "message": message}, rid)

    def _fatal(self, exc: ProtocolError, rid: int) -> None:
        log.info("%s: closing after protocol error: %s", self, exc)
        self._write_error(rid, exc.code, exc.message)
        self.close(exc.message)

    # -- keepalive ----------------------------------------------------------------------------

    def start_keepalive(
        self, interval: float, timeout: float, on_rtt: Callable[[float], None] | None = None
    ) -> None:
        """PING every `interval`; close if nothing was received for `timeout` seconds."""
        if self._keepalive is None:
            self._keepalive = asyncio.get_running_loop().create_task(
                self._keepalive_loop(interval, timeout, on_rtt)
            )

    async def _keepalive_loop(
        self, interval: float, timeout: float, on_rtt: Callable[[float], None] | None
    ) -> None:
        while not self.closed:
            silent = time.monotonic() - self.last_recv
            if silent > timeout:
                self.close(f"no traffic for {silent:.1f}s (keepalive timeout {timeout}s)")
                return
            try:
                t0 = time.perf_counter()
                await self.request(MsgType.PING, {"t": time.time()}, timeout=timeout)
                self.rtt = time.perf_counter() - t0
                if on_rtt is not None:
                    on_rtt(self.rtt)
            except (TimeoutError, RemoteError):
                pass
            except ConnectionClosed:
                return
            await asyncio.sleep(interval)

    # -- closing ------------------------------------------------------------------------------

    def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        self._close_reason = self._close_reason or reason
        self._transport.close()
        self._finish(reason)

    def abort(self, reason: str = "aborted") -> None:
        """Close without flushing (tests use it to emulate a dead peer)."""
        self._close_reason = self._close_reason or reason
        self._transport.abort()
        self._finish(reason)

    def _finish(self, reason: str) -> None:
        if self.closed:
            return
        self._close_reason = self._close_reason or reason
        self._closed.set()
        self._can_write.set()
        err = ConnectionClosed(f"connection {self.name or self.peername} closed: {self._close_reason}")
        for rid, waiter in list(self._pending.items()):
            if isinstance(waiter, asyncio.Queue):
                waiter.put_nowait(err)
            elif not waiter.done():
                waiter.set_exception(err)
            del self._pending[rid]
        for task in list(self._handlers.values()) + list(self._oneway_tasks):
            task.cancel()
        if self._keepalive is not None and self._keepalive is not asyncio.current_task():
            self._keepalive.cancel()
        for cb in self._close_callbacks:
            try:
                cb(self)
            except Exception:
                log.warning("%s: close callback failed", self, exc_info=True)
        self._close_callbacks.clear()


class FrameProtocol(asyncio.BufferedProtocol):
    """Parses frames out of the byte stream; see the module docstring."""

    def __init__(self, make_connection: Callable[[asyncio.Transport, FrameProtocol], Connection]):
        self._make_connection = make_connection
        self.conn: Connection | None = None
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._header: Header | None = None
        self._payload: memoryview | None = None  # direct-receive target
        self._body: memoryview | None = None
        self._meta_len = 0
        self._pos = 0
        self._paused = False
        self._dead = False
        self.made: asyncio.Future[Connection] = asyncio.get_running_loop().create_future()

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
        if self.conn is not None:
            self.conn._finish(f"connection lost: {exc}" if exc else "peer closed the connection")

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn._can_write.clear()

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn._can_write.set()

    def eof_received(self) -> bool | None:
        return False  # close the transport

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._body is not None:
            return self._body[self._pos :]
        if len(self._buf) - self._end < 4096:
            self._compact()
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

    def _parse(self) -> None:
        conn = self.conn
        assert conn is not None
        while not self._dead and not conn.closed:
            avail = self._end - self._start
            if self._header is None:
                if avail < HEADER_SIZE:
                    break
                raw = self._view[self._start : self._start + HEADER_SIZE]
                try:
                    self._header = unpack_header(raw, conn.limits)
                except ProtocolError as exc:
                    rid = int.from_bytes(raw[12:20], "big") if exc.code != ErrorCode.BAD_MAGIC else 0
                    conn._fatal(exc, rid)
                    self._dead = True
                    return
                self._start += HEADER_SIZE
                avail -= HEADER_SIZE
            header = self._header
            body_len = header.body_len
            if avail >= body_len:
                # Whole body is here: copy it out of the shared buffer (small frames).
                chunk = self._view[self._start : self._start + body_len]
                body = memoryview(bytearray(chunk)) if body_len < SMALL_BODY else _alloc_body(header)
                if body_len >= SMALL_BODY:
                    body[:] = chunk
                self._start += body_len
                self._header = None
                conn._on_frame(header, body)
                continue
            # Partial body: receive the rest directly into its own buffer.
            body = _alloc_body(header)
            body[:avail] = self._view[self._start : self._end]
            self._start = self._end = 0
            self._body = body
            self._pos = avail
            break
        if self._start == self._end:
            self._start = self._end = 0

    def pause(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self._transport is not None and not self._dead:
            self._paused = False
            self._transport.resume_reading()


def _alloc_body(header: Header) -> memoryview:
    """An uninitialised buffer for a frame body whose payload starts 64-byte aligned.

    torch's allocator aligns to 64 bytes; the metadata is placed just before the next
    64-byte boundary so the payload (and the tensors built on it) is aligned.
    """
    pad = -header.meta_len % 64
    raw = torch.empty(pad + header.body_len, dtype=torch.uint8).numpy()
    return memoryview(raw).cast("B")[pad:]  # type: ignore[arg-type]


# -- opening connections ---------------------------------------------------------------------


def _factory(
    handler: Handler, limits: Limits, name: str
) -> Callable[[asyncio.Transport, FrameProtocol], Connection]:
    def make(transport: asyncio.Transport, proto: FrameProtocol) -> Connection:
        return Connection(transport, proto, handler, limits, name)

    return make


async def connect(
    host: str,
    port: int,
    handler: Handler,
    *,
    limits: Limits | None = None,
    name: str = "",
    timeout: float = 10.0,
) -> Connection:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, proto = await loop.create_connection(
            lambda: FrameProtocol(_factory(handler, limits or Limits(), name)), host, port
        )
        # uvloop may call connection_made after create_connection returns.
        return await proto.made


async def serve(
    host: str,
    port: int,
    handler: Handler,
    on_connection: Callable[[Connection], None],
    *,
    limits: Limits | None = None,
) -> asyncio.Server:
    """Listen; every accepted connection is passed to `on_connection` as soon as it exists."""
    loop = asyncio.get_running_loop()
    lim = limits or Limits()

    def make(transport: asyncio.Transport, proto: FrameProtocol) -> Connection:
        conn = Connection(transport, proto, handler, lim, "")
        on_connection(conn)
        return conn

    return await loop.create_server(lambda: FrameProtocol(make), host, port, reuse_address=True)


def install_uvloop() -> bool:
    """Use uvloop's event loop policy when it is installed; returns whether it is."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


__all__ = [
    "Connection",
    "ConnectionClosed",
    "FrameProtocol",
    "Handler",
    "Limits",
    "RemoteError",
    "Reply",
    "Request",
    "connect",
    "install_uvloop",
    "payload_nbytes",
    "serve",
]
