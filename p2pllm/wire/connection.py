"""An async, multiplexed connection carrying frames over one TCP stream.

Size: one module because Connection is one state machine (send, receive, streams,
cancellation, keepalive, close) whose invariant, every waiter resolved exactly once, is
easiest to check with all of it in view; the byte parsing is in :mod:`.receive`.

- Many requests in flight at once, matched to responses by request id, in any order.
- Streams: a handler may send partial responses (Flags.STREAM) before its final one.
- A late response to a cancelled or timed-out request is dropped (logged at debug).
- Each incoming request runs in a task of its own while it is handled (CANCEL cancels it; it
  may take long); a finished request task parks to take a later request (a few per
  connection), so a request usually costs a wake-up rather than a new task. One-way
  frames get no task each: they are handled in arrival order by one per-connection task
  that parks when idle (a one-way handler that awaits holds the later one-way frames of its
  connection; one that must wait long starts its own task).
- Receiving (:mod:`p2pllm.wire.receive`) parses small frames out of one reusable buffer and
  receives a large payload straight into its own aligned buffer; tensors are built on it.
- Sending hands the header+metadata and each payload buffer to the transport in one
  writelines() call (frames never interleave), then waits only when the transport has asked
  us to pause (backpressure), not on every write.
- Byte counts come from here: `bytes_in`/`bytes_out` per connection, and on every Frame
  `wire_bytes` (and `sent_bytes` on a response), so nobody re-encodes a frame to count it.
- Sealing (protocol.md 6.3): after `enable_sealing(send_key, recv_key)` every frame is
  sealed both ways (:mod:`.seal`); the switch happens at a frame boundary the handshake names
  (the server: right after it received AUTH; the client: right after it sent AUTH). Sending
  a sealed frame: under 64 KiB its body is joined and encrypted into new bytes (fewest Python
  steps); up to 1 MiB it is gathered into one buffer (header, metadata, payload, room for the
  tag) and encrypted there in place; from 1 MiB it is encrypted piece by piece straight into
  the buffer sent (no gather copy). A frame that does not open, or an exhausted counter,
  closes the connection. Higher layers (request / stream / notify / partial / cancel /
  keepalive) see no difference.
- :class:`~p2pllm.wire.local.LocalConnection` is the same machinery without a socket, for
  a node talking to itself (never sealed).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from p2pllm.wire.frame import (
    _MSG_TYPES,
    HEADER_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    Buffer,
    Frame,
    Header,
    Limits,
    ProtocolError,
    _unpackb,
    body_to_frame,
    meta_packer,
    payload_nbytes,
)
from p2pllm.wire.frame import HEADER as _HEADER
from p2pllm.wire.messages import ErrorCode, Flags, MsgType
from p2pllm.wire.receive import SMALL_BODY, FrameProtocol, FrameSink, alloc_aligned
from p2pllm.wire.seal import MAX_SEALED_BODY, STREAM_SEAL_MIN, TAG_SIZE, Opener, Sealer, SealError

log = logging.getLogger(__name__)

MAX_INFLIGHT_HANDLERS = 512  # pause reading above this many running handlers / queued frames
MAX_IDLE_WORKERS = 8  # request tasks kept parked per connection for the next requests

_RESPONSE = int(Flags.RESPONSE)
_STREAM = int(Flags.STREAM)
_ONEWAY = int(Flags.ONEWAY)
_pack_head = _HEADER.pack


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
        return self.frame.request_id != 0 and not self.frame.flags & _ONEWAY

    @property
    def wire_bytes(self) -> int:
        """Bytes this request took on the wire (0 when it was handed over in-process)."""
        return self.frame.wire_bytes

    async def partial(
        self, msg_type: MsgType, meta: dict[str, Any], payload: Sequence[Buffer] = ()
    ) -> int:
        """Send one partial (streamed) response; the handler's return value ends the stream.
        Returns the bytes it took on the wire."""
        if not self.wants_reply:
            return 0
        return await self.conn.send_frame(
            msg_type, meta, payload, flags=_RESPONSE | _STREAM, request_id=self.frame.request_id
        )


Handler = Callable[["Connection", Request], Awaitable[Reply | None]]
_ACK = Reply()  # what a handler that returns None answers (read, never changed)
_Future = asyncio.Future
_Waiter = asyncio.Future[Frame] | asyncio.Queue[Frame | BaseException]


class Connection(FrameSink):
    """One peer connection. Create with `connect()` or through `serve()`."""

    def __init__(
        self,
        transport: asyncio.Transport | None,
        protocol: FrameProtocol | None,
        handler: Handler,
        limits: Limits,
        name: str = "",
    ) -> None:
        self._transport = transport
        self._protocol = protocol
        self._handler = handler
        self.limits = limits
        self.name = name
        self._loop = asyncio.get_running_loop()
        self._ids = itertools.count(1)
        self._pack = meta_packer()
        self._pending: dict[int, _Waiter] = {}
        self._handlers: dict[int, asyncio.Task[None]] = {}  # request id -> the task handling it
        self._idle: list[tuple[asyncio.Task[None], asyncio.Future[Frame]]] = []  # parked _serve tasks
        self._oneway: deque[Frame] = deque()
        self._pump: asyncio.Task[None] | None = None
        self._pump_wake: asyncio.Future[None] | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._is_closed = False
        self._closed = asyncio.Event()
        self._close_reason = ""
        self._close_callbacks: list[Callable[[Connection], None]] = []
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._paused_writing = False  # mirrors `not _can_write.is_set()`, cheap to test
        self.created = time.monotonic()
        self.last_recv = self.created
        self.bytes_in = 0
        self.bytes_out = 0
        self.frames_in = 0
        self.frames_out = 0
        self.rtt: float | None = None  # seconds, from the last keepalive PING
        self._sealer: Sealer | None = None  # set once frames are sealed (both ways)
        self._overhead = 0  # bytes a frame takes on the wire beyond header+body: the tag
        # (send key, recv key, message type, "sent"|"received"): switch after that frame;
        # (b"", b"", message type, "hold"): hold reading after the response of that type
        self._seal_arm: tuple[bytes, bytes, int, str] | None = None
        self._limits_arm: tuple[int, Limits] | None = None  # (message type, limits): limits_after
        # Free-form attributes the daemon attaches after the handshake (peer id, auth state).
        self.info: dict[str, Any] = {}
        peer = transport.get_extra_info("peername") if transport is not None else None
        self.peername: tuple[str, int] | None = tuple(peer[:2]) if peer else None  # type: ignore[assignment]

    # -- state --------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._is_closed

    @property
    def close_reason(self) -> str:
        return self._close_reason

    @property
    def in_flight(self) -> int:
        """Requests and streams this side awaits answers to, plus the peer's requests and
        one-way frames being handled here (a drained link closes at 0, protocol.md 6.2)."""
        return len(self._pending) + len(self._handlers) + len(self._oneway)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def on_close(self, callback: Callable[[Connection], None]) -> None:
        if self._is_closed:
            callback(self)
        else:
            self._close_callbacks.append(callback)

    def __repr__(self) -> str:
        return f"<Connection {self.name or self.peername}{' closed' if self._is_closed else ''}>"

    @property
    def sealed(self) -> bool:
        """Whether frames on this connection are sealed (protocol.md 6.3)."""
        return self._sealer is not None

    def enable_sealing(
        self,
        send_key: bytes,
        recv_key: bytes,
        *,
        after_sent: MsgType | None = None,
        after_received: MsgType | None = None,
    ) -> None:
        """Seal every later frame both ways, from a frame boundary (protocol.md 6.3):

        - no `after_*`: from now on (the next frame written, the next header read);
        - `after_sent=T`: right after this connection writes its next request of type T
          (the client: its AUTH), both directions at that moment;
        - `after_received=T`: right after this connection receives a request of type T (the
          server: the client's AUTH), both directions, before that request is handled, so
          its answer is sealed.

        Switching while a received frame is part-way in closes the connection (the peer sent
        a frame the handshake does not allow there)."""
        if self._protocol is None:
            raise TypeError(f"{type(self).__name__} carries no bytes and is never sealed")
        if self._sealer is not None:
            raise RuntimeError(f"{self}: already sealed")
        if after_sent is not None and after_received is not None:
            raise ValueError("give after_sent or after_received, not both")
        if after_sent is not None:
            self._seal_arm = (send_key, recv_key, int(after_sent), "sent")  # replaces a hold
        elif after_received is not None:
            self._seal_arm = (send_key, recv_key, int(after_received), "received")
        else:
            self._switch_sealing(send_key, recv_key)

    def hold_reading_after(self, response_to: MsgType) -> None:
        """Read no frame after the response to the next request of type `response_to`
        (the client: the HELLO answer) until `enable_sealing` switches, which then opens what
        waited as sealed frames, or `resume_plain_reading()`. So the client reads every frame
        after the HELLO answer sealed (protocol.md 6.3) though it has the keys only later."""
        if self._protocol is None:
            raise TypeError(f"{type(self).__name__} carries no bytes and is never sealed")
        self._seal_arm = (b"", b"", int(response_to), "hold")

    def limits_after(self, response_to: MsgType, limits: Limits) -> None:
        """Read with `limits` from the frame after the response to the next request of type
        `response_to` (the client without a secret: the HELLO answer is the one frame read
        under the limits before trust, protocol.md 2.1; what the server sends right after it
        is read under the full ones)."""
        self._limits_arm = (int(response_to), limits)

    def resume_plain_reading(self) -> None:
        """Undo hold_reading_after (the peer uses no secret: frames stay plain)."""
        if self._seal_arm is not None and self._seal_arm[3] == "hold":
            self._seal_arm = None
        if self._protocol is not None and self._sealer is None:
            self._protocol.release()

    def _switch_sealing(self, send_key: bytes, recv_key: bytes) -> None:
        self._seal_arm = None
        protocol = self._protocol
        assert protocol is not None
        if protocol.mid_frame:
            self._seal_failed("a frame was part-way in when the connection switched to sealed frames")
            return
        self._sealer = Sealer(send_key)
        self._overhead = TAG_SIZE
        protocol.set_opener(Opener(recv_key))  # parses, opened, what waited (hold_reading_after)

    def _seal_failed(self, reason: str) -> None:
        """A sealed frame did not open, or a counter ran out: close, no ERROR frame (the peer
        could not read it, or is not who it claims to be). Logged once: the connection ends."""
        if self._is_closed:
            return
        log.warning("%s: closing: %s", self, reason)
        self.close(reason)

    def _closed_error(self) -> ConnectionClosed:
        return ConnectionClosed(f"connection {self.name or self.peername} is closed: {self._close_reason}")

    # -- sending ------------------------------------------------------------------------------

    def _write(
        self, msg_type: int, meta: dict[str, Any] | None, payload: Sequence[Buffer], flags: int, rid: int
    ) -> int:
        """Put one frame on the transport; returns its size in bytes."""
        if self._sealer is not None:
            return self._write_sealed(msg_type, meta, payload, flags, rid)
        meta_bytes = self._pack(meta) if meta else b""
        plen = payload_nbytes(payload) if payload else 0
        head = _pack_head(MAGIC, PROTOCOL_VERSION, msg_type, flags, 0, rid, len(meta_bytes), plen)
        transport = self._transport
        assert transport is not None
        if plen:
            transport.writelines([head + meta_bytes, *payload])
        else:
            transport.write(head + meta_bytes)
        n = HEADER_SIZE + len(meta_bytes) + plen
        self.frames_out += 1
        self.bytes_out += n
        arm = self._seal_arm
        if arm is not None and arm[3] == "sent" and msg_type == arm[2] and not flags & _RESPONSE:
            self._switch_sealing(arm[0], arm[1])  # the frame the handshake switches after
        return n

    def _write_sealed(
        self, msg_type: int, meta: dict[str, Any] | None, payload: Sequence[Buffer], flags: int, rid: int
    ) -> int:
        """One sealed frame: header (the associated data), then metadata and payload
        encrypted (gathered into one buffer and encrypted there in place when large), then
        the tag."""
        sealer = self._sealer
        assert sealer is not None
        meta_bytes = self._pack(meta) if meta else b""
        mlen = len(meta_bytes)
        plen = payload_nbytes(payload) if payload else 0
        body_len = mlen + plen
        if body_len > MAX_SEALED_BODY:
            raise ProtocolError(
                ErrorCode.FRAME_TOO_LARGE,
                f"a sealed frame's body is at most {MAX_SEALED_BODY} bytes, this one {body_len}",
            )
        head = _pack_head(MAGIC, PROTOCOL_VERSION, msg_type, flags, 0, rid, mlen, plen)
        n = HEADER_SIZE + body_len + TAG_SIZE
        transport = self._transport
        assert transport is not None
        try:
            if body_len < SMALL_BODY:  # one join, one encrypt (fewer Python steps than in place)
                plain = b"".join((meta_bytes, *payload)) if plen else meta_bytes
                transport.write(head + sealer.seal(head, plain))
            elif body_len >= STREAM_SEAL_MIN:  # encrypted piece by piece into the buffer sent
                out = alloc_aligned(n)
                out[:HEADER_SIZE] = head
                pieces: list[memoryview | bytes] = [meta_bytes]
                pieces += [memoryview(buf).cast("B") for buf in payload]
                sealer.seal_pieces_into(head, pieces, out[HEADER_SIZE:])
                transport.write(out)
            else:  # gathered, then encrypted in place
                out = alloc_aligned(n)
                out[:HEADER_SIZE] = head
                pos = HEADER_SIZE + mlen
                out[HEADER_SIZE:pos] = meta_bytes
                for buf in payload:
                    view = memoryview(buf).cast("B")
                    end = pos + view.nbytes
                    out[pos:end] = view
                    pos = end
                sealer.seal_into(head, out[HEADER_SIZE:], body_len)
                transport.write(out)
        except SealError as exc:
            self._seal_failed(str(exc))
            raise self._closed_error() from None
        self.frames_out += 1
        self.bytes_out += n
        return n

    async def send_frame(
        self,
        msg_type: int,
        meta: dict[str, Any] | None = None,
        payload: Sequence[Buffer] = (),
        *,
        flags: int = 0,
        request_id: int = 0,
    ) -> int:
        """Send one frame; returns the bytes it took on the wire."""
        if self._is_closed:
            raise self._closed_error()
        n = self._write(msg_type, meta, payload, flags, request_id)
        if self._paused_writing:
            await self._can_write.wait()
            if self._is_closed:
                raise self._closed_error()
        return n

    async def notify(
        self, msg_type: MsgType, meta: dict[str, Any] | None = None, payload: Sequence[Buffer] = ()
    ) -> int:
        """A one-way message: no response is expected or sent. Returns its bytes on the wire."""
        return await self.send_frame(msg_type, meta, payload, flags=_ONEWAY)

    def notify_nowait(
        self, msg_type: MsgType, meta: dict[str, Any] | None = None, payload: Sequence[Buffer] = ()
    ) -> int:
        """`notify` from plain (non-async) code: the frame is on the transport when this
        returns; it never waits, so a sender that may outpace the peer awaits
        `wait_writable()` afterwards (what `notify` does). Returns its bytes on the wire."""
        if self._is_closed:
            raise self._closed_error()
        return self._write(msg_type, meta, payload, _ONEWAY, 0)

    async def request(
        self,
        msg_type: MsgType,
        meta: dict[str, Any] | None = None,
        payload: Sequence[Buffer] = (),
        *,
        timeout: float | None = None,
    ) -> Frame:
        """Send a request and wait for its (final) response. ERROR raises RemoteError.

        The response's `wire_bytes` is what it took on the wire, its `sent_bytes` what the
        request took."""
        if self._is_closed:
            raise self._closed_error()
        rid = next(self._ids)
        fut: asyncio.Future[Frame] = self._loop.create_future()
        self._pending[rid] = fut
        try:
            sent = self._write(msg_type, meta, payload, 0, rid)
            if self._paused_writing:
                await self._can_write.wait()
            if timeout is None:
                frame = await fut
            else:
                async with asyncio.timeout(timeout):
                    frame = await fut
        except BaseException:
            if self._pending.pop(rid, None) is not None and not self._is_closed:
                self._send_cancel(rid)
            raise
        frame.sent_bytes = sent
        return frame

    async def stream(
        self,
        msg_type: MsgType,
        meta: dict[str, Any] | None = None,
        payload: Sequence[Buffer] = (),
        *,
        idle_timeout: float | None = None,
    ) -> AsyncGenerator[Frame, None]:
        """Send a request; yield its partial responses, then its final one (each frame's
        `sent_bytes` is the request's size on the wire)."""
        if self._is_closed:
            raise self._closed_error()
        rid = next(self._ids)
        queue: asyncio.Queue[Frame | BaseException] = asyncio.Queue()
        self._pending[rid] = queue
        try:
            sent = await self.send_frame(msg_type, meta, payload, request_id=rid)
            while True:
                if idle_timeout is None:
                    item = await queue.get()
                else:
                    async with asyncio.timeout(idle_timeout):
                        item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                item.sent_bytes = sent
                yield item
                if not item.flags & _STREAM:
                    return
        finally:
            if self._pending.pop(rid, None) is not None and not self._is_closed:
                self._send_cancel(rid)

    def _send_cancel(self, rid: int) -> None:
        with contextlib.suppress(Exception):
            self._write(MsgType.CANCEL, {"request_id": rid}, (), _ONEWAY, 0)

    def _write_raw(self, msg_type: MsgType, meta: dict[str, Any], rid: int) -> None:
        """An immediate response (PONG, ERROR) written from a callback, no waiting."""
        if self._is_closed:
            return
        self._write(msg_type, meta, (), _RESPONSE, rid)

    def _write_error(self, rid: int, code: ErrorCode, message: str) -> None:
        self._write_raw(MsgType.ERROR, {"code": int(code), "message": message}, rid)

    def _fatal(self, exc: ProtocolError, rid: int) -> None:
        log.info("%s: closing after protocol error: %s", self, exc)
        self._write_error(rid, exc.code, exc.message)
        self.close(exc.message)

    # -- receiving ----------------------------------------------------------------------------

    def _on_frame(self, header: Header, body: memoryview) -> None:
        """A complete frame from the socket (called by the receive protocol)."""
        self.last_recv = time.monotonic()
        self.frames_in += 1
        meta_len = header.meta_len
        n = HEADER_SIZE + meta_len + header.payload_len + self._overhead
        self.bytes_in += n
        limits_arm = self._limits_arm
        if limits_arm is not None and header.msg_type == limits_arm[0] and header.flags & _RESPONSE:
            self._limits_arm = None
            self.limits = limits_arm[1]
        arm = self._seal_arm
        if arm is not None and header.msg_type == arm[2]:
            if arm[3] == "received" and not header.flags & _RESPONSE:
                self._switch_sealing(arm[0], arm[1])  # before this frame is handled: its answer is sealed
            elif arm[3] == "hold" and header.flags & _RESPONSE and self._protocol is not None:
                self._seal_arm = None
                self._protocol.hold()  # the frames after this one wait for the keys
        try:
            msg_type = _MSG_TYPES.get(header.msg_type)
            if msg_type is None or not meta_len:
                frame = body_to_frame(header, body)
                frame.wire_bytes = n
            else:
                try:
                    meta = _unpackb(body[:meta_len], raw=False, strict_map_key=True, use_list=True)
                except Exception:
                    meta = None
                if type(meta) is not dict:
                    frame = body_to_frame(header, body)  # raises the typed error
                    frame.wire_bytes = n
                else:
                    frame = Frame(msg_type, header.flags, header.request_id, meta, body[meta_len:], n)
        except ProtocolError as exc:
            log.debug("%s: bad frame: %s", self, exc)
            if not header.flags & _RESPONSE:
                if header.request_id and not header.flags & _ONEWAY:
                    self._write_error(header.request_id, exc.code, exc.message)
            else:
                self._resolve(header.request_id, exc)
            return
        self._on_decoded(frame)

    def _on_decoded(self, frame: Frame) -> None:
        flags = frame.flags
        if flags & _RESPONSE:
            if frame.msg_type is MsgType.ERROR:
                meta = frame.meta
                code = meta.get("code")  # a peer's junk must not raise here (a protocol callback)
                self._resolve(
                    frame.request_id,
                    RemoteError(code if type(code) is int else int(ErrorCode.INTERNAL), str(meta.get("message"))),
                )
            else:
                self._resolve(frame.request_id, frame)
            return
        t = frame.msg_type
        rid = frame.request_id
        if t is MsgType.PING:
            if rid and not flags & _ONEWAY:  # a one-way PING wants no PONG (section 3)
                self._write_raw(MsgType.PONG, {"t": frame.meta.get("t")}, rid)
            return
        if t is MsgType.CANCEL:
            cancel_id = frame.meta.get("request_id")
            task = self._handlers.get(cancel_id) if type(cancel_id) is int else None  # junk: ignored
            if task is not None:
                task.cancel()
            return
        if t is MsgType.PONG or t is MsgType.ERROR:
            return  # responses without the flag: ignore
        if rid and not flags & _ONEWAY:
            old = self._handlers.get(rid)
            if old is not None:  # a peer reusing an id in flight: the new one answers
                old.cancel()
            if self._idle:
                task, wake = self._idle.pop()
                self._handlers[rid] = task
                wake.set_result(frame)
            else:
                self._handlers[rid] = self._loop.create_task(self._serve(frame))
        else:
            self._oneway.append(frame)
            if self._pump is None:
                self._pump = self._loop.create_task(self._pump_oneway())
            else:
                pump_wake = self._pump_wake
                if pump_wake is not None:
                    self._pump_wake = None
                    pump_wake.set_result(None)
        if len(self._handlers) + len(self._oneway) > MAX_INFLIGHT_HANDLERS and self._protocol:
            self._protocol.pause()

    async def _serve(self, frame: Frame) -> None:
        """A request task: handles `frame`, then parks to take the next request (up to
        MAX_IDLE_WORKERS parked per connection), so a request usually costs a wake-up, not a
        new task. CANCEL cancels the task while it handles that request only."""
        task = asyncio.current_task()
        assert task is not None
        idle = self._idle
        handler = self._handler
        while True:
            rid = frame.request_id
            try:
                reply = await handler(self, Request(self, frame))
                if not self._is_closed:
                    if reply is None:
                        reply = _ACK
                    self._write(reply.msg_type, reply.meta, reply.payload, _RESPONSE, rid)
                    if self._paused_writing:
                        await self._can_write.wait()
            except asyncio.CancelledError:
                if self._is_closed:
                    task = None  # type: ignore[assignment]  # see the park below
                    raise
                if not task.cancelling():
                    self._failed(frame, None)
                # else cancelled by CANCEL (or a coordinator stopping its job): that request is over.
            except Exception as exc:
                self._failed(frame, exc)
            finally:
                if task is not None and self._handlers.get(rid) is task:
                    del self._handlers[rid]
            while task.uncancel() > 0:  # the next request starts with no cancellation pending
                pass
            if self._protocol is not None and self._protocol.paused:
                self._maybe_resume()
            if self._is_closed or len(idle) >= MAX_IDLE_WORKERS:
                return
            wake: asyncio.Future[Frame] = self._loop.create_future()
            idle.append((task, wake))
            try:
                frame = await wake
            except asyncio.CancelledError:
                # Cancelled while parked (the connection closed). Drop the local first: else
                # task -> its CancelledError -> traceback -> this frame -> task is a cycle that
                # keeps the closed connection alive until a full GC (rare in a daemon).
                task = None  # type: ignore[assignment]
                raise

    def _maybe_resume(self) -> None:
        if self._protocol is not None and (
            len(self._handlers) + len(self._oneway) < MAX_INFLIGHT_HANDLERS // 2
        ):
            self._protocol.resume()

    async def _pump_oneway(self) -> None:
        """Handle one-way frames in arrival order; park on a future when there are none."""
        queue = self._oneway
        while not self._is_closed:
            while queue:
                await self._handle(queue.popleft())
                if self._protocol is not None and self._protocol.paused:
                    self._maybe_resume()
            if self._is_closed:  # a handler closed it (GOODBYE): do not park forever
                return
            wake = self._pump_wake = self._loop.create_future()
            await wake

    def _resolve(self, rid: int, item: Frame | BaseException) -> None:
        waiter = self._pending.get(rid)
        if type(waiter) is _Future and type(item) is Frame and not item.flags & _STREAM:
            del self._pending[rid]  # the common case: the final answer to a plain request
            if not waiter.done():
                waiter.set_result(item)
            return
        if waiter is None:
            log.debug("%s: dropping late response to request %d", self, rid)
            return
        if isinstance(waiter, asyncio.Queue):
            waiter.put_nowait(item)
            if isinstance(item, BaseException) or not item.flags & _STREAM:
                del self._pending[rid]
            return
        if isinstance(item, Frame) and item.flags & _STREAM:
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
        """Run the handler for one frame (the one-way pump's path; requests take _serve's)."""
        try:
            reply = await self._handler(self, Request(self, frame))
            if frame.request_id and not frame.flags & _ONEWAY and not self._is_closed:
                if reply is None:
                    reply = _ACK
                self._write(reply.msg_type, reply.meta, reply.payload, _RESPONSE, frame.request_id)
                if self._paused_writing:
                    await self._can_write.wait()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                task = None  # no task -> traceback -> frame -> task cycle (see _serve)
                raise  # really cancelled: a closing connection or shutdown
            self._failed(frame, None)
        except Exception as exc:
            self._failed(frame, exc)

    def _failed(self, frame: Frame, exc: Exception | None) -> None:
        """A handler raised `exc` (None: a CancelledError nobody asked for): answer the request
        with the matching ERROR and log it."""
        wants_reply = frame.request_id != 0 and not frame.flags & _ONEWAY
        name = frame.msg_type.name
        rid = frame.request_id
        if isinstance(exc, ProtocolError):
            if wants_reply:
                self._write_error(rid, exc.code, exc.message)
            if exc.fatal:
                self.close(exc.message)
        elif exc is None:
            log.warning("%s: handler for %s raised a stray CancelledError", self, name)
            if wants_reply:
                self._write_error(rid, ErrorCode.INTERNAL, "handler was cancelled")
        elif isinstance(exc, ConnectionClosed):
            # Either this connection closed (nothing can be sent) or one the handler used
            # to reach another peer did: tell our caller which peer went away.
            log.debug("%s: connection closed while handling %s: %s", self, name, exc)
            if wants_reply:
                self._write_error(rid, ErrorCode.PEER_DOWN, str(exc))
        else:
            log.warning("%s: handler for %s failed", self, name, exc_info=exc)
            if wants_reply:
                self._write_error(rid, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    # -- keepalive ----------------------------------------------------------------------------

    def start_keepalive(
        self, interval: float, timeout: float, on_rtt: Callable[[float], None] | None = None
    ) -> None:
        """PING every `interval`; close if nothing was received for `timeout` seconds.

        Silence is counted in time the event loop ran: when this loop itself was stalled (a
        synchronous call that overran), the stall is not the peer's silence. A stall shows as
        this task waking late from its sleep; that lateness is left out until the next frame
        arrives. And before closing it lets the loop run the reads that may already wait on
        the socket (after a stall the timer can run ahead of them), then looks again."""
        if self._keepalive is None:
            self._keepalive = self._loop.create_task(self._keepalive_loop(interval, timeout, on_rtt))

    async def _keepalive_loop(
        self, interval: float, timeout: float, on_rtt: Callable[[float], None] | None
    ) -> None:
        stalls: list[tuple[float, float]] = []  # (due, woke): the late wake-ups of this task
        while not self._is_closed:
            last = self.last_recv
            if stalls and stalls[0][1] <= last:
                stalls = [st for st in stalls if st[1] > last]
            stalled = sum(woke - max(due, last) for due, woke in stalls)  # of them, after `last`
            silent = time.monotonic() - last
            if silent - stalled > timeout:
                # Two loop turns: one polls the socket, the next runs its read callbacks.
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                if self._is_closed:
                    return
                if self.last_recv == last:
                    stall = f", {stalled:.1f}s of it a stall of this loop" if stalled >= 0.05 else ""
                    self.close(f"no traffic for {silent:.1f}s{stall} (keepalive timeout {timeout}s)")
                    return
                continue
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
            due = time.monotonic() + interval
            await asyncio.sleep(interval)
            woke = time.monotonic()
            if woke > due:  # the loop did not come back to this task from `due` until now
                stalls.append((due, woke))

    # -- closing ------------------------------------------------------------------------------

    def close(self, reason: str = "closed") -> None:
        if self._is_closed:
            return
        self._close_reason = self._close_reason or reason
        if self._transport is not None:
            self._transport.close()
        self._finish(reason)

    def abort(self, reason: str = "aborted") -> None:
        """Close without flushing (tests use it to emulate a dead peer)."""
        self._close_reason = self._close_reason or reason
        if self._transport is not None:
            self._transport.abort()
        self._finish(reason)

    def _finish(self, reason: str) -> None:
        if self._is_closed:
            return
        self._is_closed = True
        self._close_reason = self._close_reason or reason
        self._closed.set()
        self._paused_writing = False
        self._can_write.set()
        err = ConnectionClosed(f"connection {self.name or self.peername} closed: {self._close_reason}")
        for rid, waiter in list(self._pending.items()):
            if isinstance(waiter, asyncio.Queue):
                waiter.put_nowait(err)
            elif not waiter.done():
                waiter.set_exception(err)
            del self._pending[rid]
        for task in list(self._handlers.values()):
            task.cancel()
        for task, _ in self._idle:
            task.cancel()
        self._idle.clear()
        self._oneway.clear()
        self._protocol = None  # conn <-> protocol is a cycle: freed by refcount once closed
        current = asyncio.current_task()
        if self._pump is not None and self._pump is not current:
            self._pump.cancel()
        if self._keepalive is not None and self._keepalive is not current:
            self._keepalive.cancel()
        # Drop the tasks: a cancelled one's traceback holds its frame, which holds this
        # connection (a cycle through self._pump / self._keepalive otherwise).
        self._pump = self._pump_wake = self._keepalive = None
        for cb in self._close_callbacks:
            try:
                cb(self)
            except Exception:
                log.warning("%s: close callback failed", self, exc_info=True)
        self._close_callbacks.clear()

    # -- receive-protocol callbacks (FrameSink) -----------------------------------------------

    def _lost(self, reason: str) -> None:
        self._finish(reason)

    async def wait_writable(self) -> None:
        """Return once the transport takes writes again: at once unless it paused writing
        (its buffer past the high-water mark because the peer reads nothing)."""
        if self._paused_writing:
            await self._can_write.wait()

    @property
    def writing_paused(self) -> bool:
        return self._paused_writing

    def _pause_writing(self) -> None:
        self._paused_writing = True
        self._can_write.clear()

    def _resume_writing(self) -> None:
        self._paused_writing = False
        self._can_write.set()


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
        conn = await proto.made
        assert isinstance(conn, Connection)
        return conn


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
