"""Frame and tensor codec: round trips, property tests, and the documented bad-input reactions."""

from __future__ import annotations

import struct

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pllm.wire.frame import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    Limits,
    ProtocolError,
    decode_frame,
    encode_frame,
    unpack_header,
)
from p2pllm.wire.messages import ErrorCode, Flags, MsgType
from p2pllm.wire.tensors import DTYPES, pack_tensors, tensor_meta, unpack_tensors


def join(bufs) -> bytes:
    return b"".join(bytes(b) for b in bufs)


def test_header_layout_is_32_bytes_big_endian() -> None:
    bufs = encode_frame(MsgType.PING, {"t": 1.5}, flags=Flags.ONEWAY, request_id=0x0102030405060708)
    data = join(bufs)
    assert HEADER_SIZE == 32
    assert data[:4] == b"P2PL"
    assert data[4:6] == PROTOCOL_VERSION.to_bytes(2, "big")
    assert data[6:8] == int(MsgType.PING).to_bytes(2, "big")
    assert data[8:10] == int(Flags.ONEWAY).to_bytes(2, "big")
    assert data[10:12] == b"\x00\x00"
    assert data[12:20] == bytes([1, 2, 3, 4, 5, 6, 7, 8])
    meta = msgpack.packb({"t": 1.5}, use_bin_type=True)
    assert data[20:24] == len(meta).to_bytes(4, "big")
    assert data[24:32] == (0).to_bytes(8, "big")
    assert data[32:] == meta


meta_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(
    msg_type=st.sampled_from(list(MsgType)),
    flags=st.sampled_from([0, 1, 2, 3, 4]),
    rid=st.integers(0, 2**64 - 1),
    meta=st.dictionaries(st.text(max_size=10), meta_values, max_size=6),
    payload=st.binary(max_size=300),
)
def test_frame_round_trip(msg_type, flags, rid, meta, payload) -> None:
    data = join(encode_frame(msg_type, meta, [payload] if payload else [], flags=flags, request_id=rid))
    frame = decode_frame(data)
    assert frame.msg_type == msg_type
    assert int(frame.flags) == flags
    assert frame.request_id == rid
    assert frame.meta == meta
    assert bytes(frame.payload) == payload


@settings(max_examples=80, deadline=None)
@given(
    specs=st.lists(
        st.tuples(
            st.sampled_from(sorted(DTYPES)),
            st.lists(st.integers(0, 5), min_size=0, max_size=4),
        ),
        max_size=5,
    ),
    seed=st.integers(0, 1000),
)
def test_tensor_round_trip_random_dtypes_and_shapes(specs, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, (dname, shape) in enumerate(specs):
        dtype = DTYPES[dname]
        if dtype.is_floating_point:
            t = torch.randn(shape, generator=g).to(dtype)
        elif dtype == torch.bool:
            t = torch.randint(0, 2, shape, generator=g).bool()
        else:
            t = torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g).to(dtype)
        tensors[f"t{i}"] = t
    meta, bufs = tensor_meta(tensors, {"job": "x"})
    frame = decode_frame(bytearray(join(encode_frame(MsgType.SHARD_FORWARD, meta, bufs))))
    out = unpack_tensors(frame.meta["tensors"], frame.payload)
    assert list(out) == list(tensors)
    for k, t in tensors.items():
        assert out[k].dtype == t.dtype and out[k].shape == t.shape
        assert torch.equal(out[k], t)


def test_send_side_does_not_copy_tensor() -> None:
    t = torch.arange(1000, dtype=torch.float32)
    _, bufs = pack_tensors({"x": t})
    t[0] = 42.0  # the buffer views the tensor's storage
    assert torch.frombuffer(bytearray(bufs[0]), dtype=torch.float32)[0].item() == 42.0


def test_receive_side_tensor_views_the_payload() -> None:
    t = torch.arange(16, dtype=torch.float32)
    meta, bufs = tensor_meta({"x": t})
    data = bytearray(join(encode_frame(MsgType.SHARD_FORWARD, meta, bufs)))
    frame = decode_frame(data)
    out = unpack_tensors(frame.meta["tensors"], frame.payload)["x"]
    data[-4:] = struct.pack("<f", -1.0)  # mutate the received buffer in place
    assert out[-1].item() == -1.0


def test_wrong_magic_is_fatal() -> None:
    data = bytearray(join(encode_frame(MsgType.PING, {})))
    data[:4] = b"XXXX"
    with pytest.raises(ProtocolError) as ei:
        decode_frame(data)
    assert ei.value.code == ErrorCode.BAD_MAGIC and ei.value.fatal


def test_wrong_version_names_both_versions() -> None:
    data = bytearray(join(encode_frame(MsgType.PING, {})))
    data[4:6] = (PROTOCOL_VERSION + 1).to_bytes(2, "big")
    with pytest.raises(ProtocolError) as ei:
        decode_frame(data)
    assert ei.value.code == ErrorCode.BAD_VERSION
    assert str(PROTOCOL_VERSION + 1) in ei.value.message and str(PROTOCOL_VERSION) in ei.value.message


def test_oversize_lengths_rejected_from_header_alone() -> None:
    lim = Limits(max_meta=100, max_payload=1000)
    big_payload = HEADER.pack(MAGIC, PROTOCOL_VERSION, MsgType.PING, 0, 0, 1, 0, 2**63)
    with pytest.raises(ProtocolError) as ei:
        unpack_header(big_payload, lim)
    assert ei.value.code == ErrorCode.FRAME_TOO_LARGE
    big_meta = HEADER.pack(MAGIC, PROTOCOL_VERSION, MsgType.PING, 0, 0, 1, 101, 0)
    with pytest.raises(ProtocolError) as ei:
        unpack_header(big_meta, lim)
    assert ei.value.code == ErrorCode.FRAME_TOO_LARGE


def test_invalid_msgpack_and_non_map_metadata() -> None:
    for body in (b"\xc1", msgpack.packb([1, 2, 3])):
        data = HEADER.pack(MAGIC, PROTOCOL_VERSION, MsgType.PING, 0, 0, 1, len(body), 0) + body
        with pytest.raises(ProtocolError) as ei:
            decode_frame(data)
        assert ei.value.code == ErrorCode.BAD_META and not ei.value.fatal


def test_unknown_message_type() -> None:
    data = HEADER.pack(MAGIC, PROTOCOL_VERSION, 0x7777, 0, 0, 1, 0, 0)
    with pytest.raises(ProtocolError) as ei:
        decode_frame(data)
    assert ei.value.code == ErrorCode.UNKNOWN_TYPE and not ei.value.fatal


@pytest.mark.parametrize(
    "descs",
    [
        [{"name": "x", "dtype": "complex64", "shape": [2]}],
        [{"name": "x", "dtype": "float32", "shape": [100]}],  # more bytes than payload
        [{"name": "x", "dtype": "float32", "shape": [1]}],  # fewer bytes than payload
        [{"name": "x", "dtype": "float32", "shape": [-1]}],
        [{"dtype": "float32", "shape": [2]}],
        "nope",
    ],
)
def test_bad_tensor_descriptors(descs) -> None:
    payload = memoryview(bytearray(8))
    with pytest.raises(ProtocolError) as ei:
        unpack_tensors(descs, payload)
    assert ei.value.code == ErrorCode.BAD_TENSOR
