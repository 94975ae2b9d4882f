"""Frame layout: a fixed 32-byte header, a msgpack metadata map, an optional raw payload.

All byte-level facts of a frame live here and in protocol.md (kept in step).

    offset size  field
    0      4     magic            b"P2PL"
    4      2     version          u16, PROTOCOL_VERSION
    6      2     msg_type         u16, MsgType
    8      2     flags            u16, Flags
    10     2     reserved         u16, must be 0
    12     8     request_id       u64
    20     4     meta_len         u32, bytes of msgpack metadata that follow the header
    24     8     payload_len      u64, bytes of raw payload that follow the metadata

Network byte order (big-endian) throughout: struct format "!4sHHHHQIQ".
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack

from p2pllm.wire.messages import ErrorCode, Flags, MsgType

MAGIC = b"P2PL"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("!4sHHHHQIQ")
HEADER_SIZE = HEADER.size  # 32
_pack = HEADER.pack
_unpack_from = HEADER.unpack_from
_unpackb = msgpack.unpackb
MAX_REQUEST_ID = 2**64 - 1

DEFAULT_MAX_META = 1 << 20  # 1 MiB of metadata
DEFAULT_MAX_PAYLOAD = 1 << 30  # 1 GiB of tensor payload
PREAUTH_MAX_BODY = 64 * 1024  # metadata + payload of a frame before the handshake completed

Buffer = bytes | bytearray | memoryview


class ProtocolError(Exception):
    """An error with a wire error code; sent to the peer as an ERROR frame.

    `fatal` errors (the stream can no longer be parsed) close the connection after the
    ERROR frame is sent.
    """

    def __init__(self, code: ErrorCode, message: str, *, fatal: bool = False) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.fatal = fatal


@dataclass(frozen=True)
class Limits:
    """Upper bounds checked against a header before any byte of the body is allocated.

    `max_body` bounds meta_len + payload_len together (0: max_meta + max_payload, i.e. no
    bound beyond the two); PREAUTH_LIMITS uses it for frames before the handshake."""

    max_meta: int = DEFAULT_MAX_META
    max_payload: int = DEFAULT_MAX_PAYLOAD
    max_body: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.max_meta < 2**32:
            raise ValueError(f"max_meta must be in (0, 2**32), got {self.max_meta}")
        if not 0 <= self.max_payload < 2**64:
            raise ValueError(f"max_payload must be in [0, 2**64), got {self.max_payload}")
        if self.max_body < 0:
            raise ValueError(f"max_body must be >= 0, got {self.max_body}")
        if self.max_body == 0:
            object.__setattr__(self, "max_body", self.max_meta + self.max_payload)


# Before a connection is authenticated (protocol.md 2.1): at most 64 KiB of metadata and
# payload together per frame.
PREAUTH_LIMITS = Limits(max_meta=PREAUTH_MAX_BODY, max_payload=PREAUTH_MAX_BODY, max_body=PREAUTH_MAX_BODY)


class Header(NamedTuple):
    """A parsed header (a tuple: built once per received frame, on the hot path)."""

    msg_type: int
    flags: int
    request_id: int
    meta_len: int
    payload_len: int
    version: int = PROTOCOL_VERSION

    @property
    def body_len(self) -> int:
        return self.meta_len + self.payload_len


@dataclass(slots=True)
class Frame:
    """A decoded frame. `payload` is a view of the received buffer (no copy).

    Byte counts come from the connection that carried the frame, so nobody re-encodes a
    frame to count it: `wire_bytes` is what this frame took on the wire (header, metadata,
    payload), and on a response `sent_bytes` is what the request it answers took; both are 0
    for a frame handed over in-process (a role calling a role on its own daemon).
    """

    msg_type: MsgType
    flags: int  # a Flags bit set, kept as a plain int (cheap on the hot path)
    request_id: int
    meta: dict[str, Any] = field(default_factory=dict)
    payload: memoryview = field(default_factory=lambda: memoryview(b""))
    wire_bytes: int = 0
    sent_bytes: int = 0

    @property
    def is_response(self) -> bool:
        return bool(self.flags & Flags.RESPONSE)

    @property
    def is_partial(self) -> bool:
        return bool(self.flags & Flags.STREAM)


def pack_header(
    msg_type: int, flags: int, request_id: int, meta_len: int, payload_len: int
) -> bytes:
    return _pack(MAGIC, PROTOCOL_VERSION, msg_type, flags, 0, request_id, meta_len, payload_len)


def unpack_header(data: Buffer, limits: Limits) -> Header:
    """Parse and validate a header. Raises ProtocolError; nothing is allocated for the body."""
    if len(data) < HEADER_SIZE:
        raise ProtocolError(ErrorCode.BAD_META, "truncated header", fatal=True)
    magic, version, msg_type, flags, _reserved, request_id, meta_len, payload_len = (
        _unpack_from(data)
    )
    if magic == MAGIC and version == PROTOCOL_VERSION and meta_len <= limits.max_meta and (
        payload_len <= limits.max_payload and meta_len + payload_len <= limits.max_body
    ):
        return Header(msg_type, flags, request_id, meta_len, payload_len, version)
    if magic != MAGIC:
        raise ProtocolError(
            ErrorCode.BAD_MAGIC, f"bad magic {bytes(magic)!r}, expected {MAGIC!r}", fatal=True
        )
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.BAD_VERSION,
            f"peer speaks protocol version {version}, this node speaks {PROTOCOL_VERSION}",
            fatal=True,
        )
    if meta_len > limits.max_meta:
        raise ProtocolError(
            ErrorCode.FRAME_TOO_LARGE,
            f"metadata length {meta_len} exceeds the limit {limits.max_meta}",
            fatal=True,
        )
    if payload_len > limits.max_payload:
        raise ProtocolError(
            ErrorCode.FRAME_TOO_LARGE,
            f"payload length {payload_len} exceeds the limit {limits.max_payload}",
            fatal=True,
        )
    if meta_len + payload_len > limits.max_body:
        raise ProtocolError(
            ErrorCode.FRAME_TOO_LARGE,
            f"frame body of {meta_len + payload_len} bytes (metadata + payload) exceeds the limit "
            f"{limits.max_body}",
            fatal=True,
        )
    return Header(msg_type, flags, request_id, meta_len, payload_len, version)


def encode_meta(meta: Mapping[str, Any]) -> bytes:
    return msgpack.packb(meta, use_bin_type=True)


def meta_packer() -> Callable[[Mapping[str, Any]], bytes]:
    """A reusable metadata encoder (same bytes as :func:`encode_meta`, without building a
    Packer per call). Not thread-safe: one per connection, used on its event loop."""
    # buf_size: msgpack's default initial buffer is 256 KiB per Packer, i.e. per connection
    # (a flood of short-lived connections held that much each); it grows when a meta needs it.
    return msgpack.Packer(use_bin_type=True, buf_size=4096).pack  # type: ignore[no-any-return]


def decode_meta(data: Buffer) -> dict[str, Any]:
    if len(data) == 0:
        return {}
    try:
        meta = _unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(ErrorCode.BAD_META, f"invalid msgpack metadata: {exc}") from exc
    if not isinstance(meta, dict):
        raise ProtocolError(
            ErrorCode.BAD_META, f"metadata must be a map, got {type(meta).__name__}"
        )
    return meta


def payload_nbytes(payload: Sequence[Buffer]) -> int:
    return sum(memoryview(b).nbytes for b in payload)


def encode_frame(
    msg_type: int,
    meta: Mapping[str, Any] | None = None,
    payload: Sequence[Buffer] = (),
    *,
    flags: int = 0,
    request_id: int = 0,
) -> list[Buffer]:
    """The buffers of one frame, in order; payload buffers are passed through uncopied."""
    meta_bytes = encode_meta(meta) if meta else b""
    head = pack_header(msg_type, flags, request_id, len(meta_bytes), payload_nbytes(payload))
    return [head + meta_bytes, *payload]


def decode_frame(data: Buffer, limits: Limits | None = None) -> Frame:
    """Decode one complete frame from a contiguous buffer (tests and tools)."""
    view = memoryview(data)
    header = unpack_header(view, limits or Limits())
    end = HEADER_SIZE + header.body_len
    if len(view) < end:
        raise ProtocolError(ErrorCode.BAD_META, "truncated frame", fatal=True)
    return body_to_frame(header, view[HEADER_SIZE:end])


_MSG_TYPES: dict[int, MsgType] = {int(t): t for t in MsgType}


def body_to_frame(header: Header, body: memoryview) -> Frame:
    """Build a Frame from a header and its body (metadata then payload)."""
    msg_type = _MSG_TYPES.get(header.msg_type)
    if msg_type is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type 0x{header.msg_type:04x}")
    meta_len = header.meta_len
    meta = decode_meta(body[:meta_len]) if meta_len else {}
    return Frame(msg_type, header.flags, header.request_id, meta, body[meta_len:],
                 HEADER_SIZE + len(body))
