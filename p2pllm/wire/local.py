"""A connection from a node to itself, without a socket.

A daemon's roles talk to roles on the same daemon through a :class:`LocalConnection`: the
same request / stream / notify / CANCEL machinery as a TCP :class:`Connection` (each request
handled in a task of its own, one-way frames in order, partial responses, errors raised as
RemoteError, late responses dropped), but a frame is handed over in-process instead of being
written to a socket and parsed back:

- metadata is encoded and decoded exactly as on the wire (same types come out, same size
  limits), so a handler cannot tell the difference;
- payload buffers are copied once into one contiguous, writable buffer (aligned like a
  received one), which is what handlers expect of `req.frame.payload` and keeps the sender
  free to reuse its tensors;
- nothing crosses a socket: `bytes_in`/`bytes_out` stay 0, as do `wire_bytes` and
  `sent_bytes` of its frames, while `frames_in`/`frames_out` count the hand-overs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from p2pllm.wire.connection import Connection, Handler, RemoteError
from p2pllm.wire.frame import _MSG_TYPES, Buffer, Frame, Limits, _unpackb, payload_nbytes
from p2pllm.wire.messages import ErrorCode, Flags
from p2pllm.wire.receive import alloc_aligned

log = logging.getLogger(__name__)

_RESPONSE = int(Flags.RESPONSE)
_ONEWAY = int(Flags.ONEWAY)


class LocalConnection(Connection):
    """Both ends of a loopback link in one object: what it sends, it receives."""

    def __init__(self, handler: Handler, limits: Limits | None = None, name: str = "local") -> None:
        super().__init__(None, None, handler, limits or Limits(), name)

    def _write(
        self, msg_type: int, meta: dict[str, Any] | None, payload: Sequence[Buffer], flags: int, rid: int
    ) -> int:
        meta_bytes = self._pack(meta) if meta else b""
        plen = payload_nbytes(payload) if payload else 0
        self.frames_out += 1
        too_big = None
        if len(meta_bytes) > self.limits.max_meta:
            too_big = f"metadata length {len(meta_bytes)} exceeds the limit {self.limits.max_meta}"
        elif plen > self.limits.max_payload:
            too_big = f"payload length {plen} exceeds the limit {self.limits.max_payload}"
        t = _MSG_TYPES.get(msg_type)
        if too_big is not None or t is None:
            message = too_big or f"unknown message type 0x{msg_type:04x}"
            code = ErrorCode.FRAME_TOO_LARGE if too_big else ErrorCode.UNKNOWN_TYPE
            if flags & _RESPONSE or (rid and not flags & _ONEWAY):
                self._resolve(rid, RemoteError(int(code), message))
            else:
                log.debug("%s: dropping a one-way frame: %s", self, message)
            return 0
        if plen:
            body = alloc_aligned(plen)
            pos = 0
            for buf in payload:
                view = memoryview(buf).cast("B")
                n = view.nbytes
                body[pos : pos + n] = view
                pos += n
        else:
            body = memoryview(b"")
        meta_out = _unpackb(meta_bytes, raw=False, strict_map_key=True, use_list=True) if meta_bytes else {}
        self.frames_in += 1
        self._on_decoded(Frame(t, flags, rid, meta_out, body))
        return 0
