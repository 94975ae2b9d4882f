"""Tensors on the wire: raw little-endian bytes in the payload, dtype and shape in metadata.

A frame carries zero or more tensors. Their descriptors sit in ``meta["tensors"]`` as a list
of ``{"name": str, "dtype": str, "shape": [int, ...]}`` in payload order; the payload is their
bytes back to back (C-contiguous, native little-endian, no padding). Going out, each tensor's
own storage is handed to the socket as a memoryview (no copy); coming in, each tensor is a view
built on the received buffer (no copy). No pickle, ever.

This module is also the one table of dtype names (:data:`ITEMSIZE`, :data:`DTYPE_NAMES`,
:data:`COMPUTE_DTYPES`) for the whole project; torch is imported only when a name becomes a
torch dtype (:func:`torch_dtype`, :data:`DTYPES`), so importing it (the CLI, the schemas) does
not load torch.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from p2pllm.wire.frame import Buffer, ProtocolError
from p2pllm.wire.messages import ErrorCode

if TYPE_CHECKING:
    import torch

if sys.byteorder != "little":  # pragma: no cover - every platform we target is little-endian
    raise ImportError("p2pllm's tensor wire format assumes a little-endian host")

# Every dtype the wire carries, by name, with its element size in bytes (protocol.md 5).
ITEMSIZE: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
DTYPE_NAMES: tuple[str, ...] = tuple(ITEMSIZE)
# What model weights, KV caches and hidden states between hosts may be (--dtype, --wire-dtype).
COMPUTE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
MAX_DIMS = 8

_TORCH: dict[str, torch.dtype] = {}
_NAMES: dict[torch.dtype, str] = {}


def _table() -> dict[str, torch.dtype]:
    if not _TORCH:
        import torch

        for name in DTYPE_NAMES:
            _TORCH[name] = getattr(torch, name)
        _NAMES.update({v: k for k, v in _TORCH.items()})
    return _TORCH


def __getattr__(name: str) -> Any:
    if name == "DTYPES":  # {name: torch.dtype}, built on first use (it needs torch)
        return dict(_table())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a wire name; ProtocolError(BAD_TENSOR) for a name the wire lacks."""
    try:
        return _table()[name]
    except (KeyError, TypeError):
        raise ProtocolError(
            ErrorCode.BAD_TENSOR, f"unsupported dtype {name!r}; supported: {sorted(DTYPE_NAMES)}"
        ) from None


dtype_from_name = torch_dtype


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype; ValueError for one the wire cannot carry."""
    _table()
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot go on the wire") from None


def tensor_buffer(t: torch.Tensor) -> memoryview:
    """A byte view of a CPU tensor's storage; copies only if it is not contiguous or on GPU."""
    import torch

    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    # uint8 view of the same storage: no copy; numpy gives a buffer-protocol object.
    return memoryview(t.view(-1).view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


def describe(name: str, t: torch.Tensor) -> dict[str, Any]:
    _table()
    if t.dtype not in _NAMES:
        raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot go on the wire")
    return {"name": name, "dtype": _NAMES[t.dtype], "shape": list(t.shape)}


def pack_tensors(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[list[dict[str, Any]], list[Buffer]]:
    """Descriptors for meta["tensors"] and the payload buffers, in the same order."""
    descs: list[dict[str, Any]] = []
    bufs: list[Buffer] = []
    for name, t in tensors.items():
        descs.append(describe(name, t))
        buf = tensor_buffer(t)
        if buf.nbytes:
            bufs.append(buf)
    return descs, bufs


def unpack_tensors(descs: Any, payload: memoryview) -> dict[str, torch.Tensor]:
    """Tensors viewing `payload`, validated against their descriptors (typed errors)."""
    import torch

    if descs is None:
        descs = []
    if not isinstance(descs, list):
        raise ProtocolError(ErrorCode.BAD_TENSOR, "meta['tensors'] must be a list")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    total = payload.nbytes
    for i, d in enumerate(descs):
        if not isinstance(d, dict):
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"tensor descriptor {i} is not a map")
        name = d.get("name")
        shape = d.get("shape")
        if not isinstance(name, str):
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"tensor descriptor {i} has no name")
        if name in out:
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"tensor {name!r} appears twice")
        dname = d.get("dtype")
        dtype = torch_dtype(dname)  # type: ignore[arg-type]
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(isinstance(s, int) and s >= 0 for s in shape)
        ):
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"tensor {name!r}: bad shape {shape!r}")
        itemsize = ITEMSIZE[dname]  # type: ignore[index]
        nbytes = math.prod(shape) * itemsize
        if offset + nbytes > total:
            raise ProtocolError(
                ErrorCode.BAD_TENSOR,
                f"tensor {name!r} needs {nbytes} bytes at offset {offset}, "
                f"payload has {total}",
            )
        if nbytes == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            raw = payload[offset : offset + nbytes]
            flat = torch.frombuffer(raw, dtype=torch.uint8)
            out[name] = flat.view(dtype).view(shape)
        offset += nbytes
    if offset != total:
        raise ProtocolError(
            ErrorCode.BAD_TENSOR, f"payload has {total} bytes, tensors describe {offset}"
        )
    return out


def tensor_meta(
    tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], Sequence[Buffer]]:
    """Convenience: metadata with its "tensors" entry filled in, and the payload buffers."""
    descs, bufs = pack_tensors(tensors)
    out = dict(meta or {})
    out["tensors"] = descs
    return out, bufs
