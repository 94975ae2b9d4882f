"""Weight-only quantized linear layers: int8 (per output channel) and int4 (groups of 32).

Kernels. Where the native kernels build (:mod:`.native`, C++ compiled on first use: the
default), a weight takes their layout; otherwise (``P2PLLM_NATIVE=0``, no compiler) torch's
``torch._weight_int8pack_mm`` / ``aten._weight_int4pack_mm_for_cpu`` layout. Measured, one
thread pinned (``taskset -c 1``), the linears of SmolLM2's 30 layers (no head) with the
weights streamed from memory, per token: native float32 22.5 ms, bfloat16 12.1 ms, int8
7.4 ms, int4 8.5 ms. Torch's int8 kernel took ~10.7 ms; its int4 kernel ~4.3 ms, faster
for one row but compute-bound, and both are fast only on bfloat16 activations (a float32
input takes a scalar path: 200-560 ms), so a torch-layout :class:`QuantLinear` rounds its
input to bfloat16 and the kernel's output is bfloat16 (cast back to the input's dtype).
The native kernels take float32 (or bfloat16) activations and any number of rows, give a
row's output the same bits whatever rows run with it (a speculative window verifies what
one-token decode gives), and keep int4's (d, min) in float32, so the codes (and int8's
bfloat16 scales) are the only approximation: hence the default. torchao
(pip-installable) was not taken: on CPU its int4/int8 weight-only layouts call the same two
aten kernels. fbgemm's dynamic int8 linear (activations quantized per tensor) is deprecated
and coarser.

* **int8**: symmetric per-output-channel, ``w ~ q * scale[n]`` (``_weight_int8pack_mm`` takes
  no groups). GGUF Q8_0 blocks (one scale per 32) are dequantized and re-quantized per
  channel: :func:`repack_gguf` equals ``quantize_int8(dequantize(raw))`` by construction.
  Its scales are kept in bfloat16 in both layouts (the native one multiplies by their
  float32 widening), so both layouts hold the same weight.
* **int4**: asymmetric, groups of 32 along the input, ``w ~ (q - 8) * scale + zero`` with
  q in 0..15 (:func:`quantize_int4`'s convention, torch's kernel's). The native layout keeps
  GGUF's own form instead: the 16 bytes of a group in Q4 order (byte j = code j | code
  j + 16 << 4) and a float32 (d, min) per group, ``w = d * q + min``. GGUF Q4_0
  (``d * (q - 8)``: min = -8d) and Q4_1 (``d * q + m``) map onto either with the same codes
  (no re-rounding of the nibbles): natively exactly (f16 d and m are exact in float32);
  torch's kernel takes scale and zero (m + 8d) only in bfloat16, which moves a weight by
  < 2^-7 of its block's largest magnitude (f16 has 3 more mantissa bits).
  A layer whose input width is not a multiple of 32 falls back to int8; a head stays int8
  (as llama.cpp's Q4 files keep the token embedding in Q8_0).

Pure weight code: no model structure here; :mod:`.layout` swaps these into a built slice.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from p2pllm.engine import native

__all__ = ["GGUF_QUANT_TYPES", "GROUP", "QUANT_MODES", "QuantFused", "QuantLinear", "QuantWeight",
           "check_quant", "dequantize_int4", "dequantize_int8", "quantize_int4",
           "quantize_int8", "quantized_nbytes", "repack_gguf"]

QUANT_MODES = ("none", "int8", "int4")
GROUP = 32
_KERNEL_DTYPE = torch.bfloat16
# GGML type ids (ggml.h): stable across versions, so no import of the gguf package here
_Q4_0, _Q4_1, _Q8_0 = 2, 3, 8
GGUF_QUANT_TYPES = (_Q4_0, _Q4_1, _Q8_0)  # what repack_gguf takes


def check_quant(quant: str | None) -> str:
    """The quant mode, validated (None means "none")."""
    q = "none" if quant is None else quant
    if q not in QUANT_MODES:
        raise ValueError(f"quant {quant!r} is not one of {', '.join(QUANT_MODES)}")
    return q


# -- the math (pure functions) ----------------------------------------------------------------


_CHUNK_ROWS = 4096  # rows quantized at a time: a vocabulary-sized head needs no big temporaries


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K), scale float32 (N,)): symmetric per row, ``w ~ q * scale[:, None]``."""
    n = w.shape[0]
    q = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.empty(n)
    for i in range(0, n, _CHUNK_ROWS):
        part = w[i:i + _CHUNK_ROWS].detach().float()
        amax = part.abs().amax(dim=1)
        s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q[i:i + _CHUNK_ROWS] = torch.round(part / s[:, None]).clamp_(-127, 127)
        scale[i:i + _CHUNK_ROWS] = s
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def quantize_int4(w: torch.Tensor, group: int = GROUP
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 (N, K) in 0..15, scale (N, K/group), zero (N, K/group)), float32:
    ``w ~ (q - 8) * scale + zero`` per group of ``group`` inputs (min/max asymmetric)."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"input width {k} is not a multiple of the group size {group}")
    g = w.detach().float().reshape(n, k // group, group)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scale = (hi - lo) / 15.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15)
    zero = lo + 8.0 * scale
    return q.to(torch.uint8).reshape(n, k), scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    groups = scale.shape[1]
    g = q.float().reshape(n, groups, k // groups)
    return ((g - 8.0) * scale.float()[..., None] + zero.float()[..., None]).reshape(n, k)


def _gguf_blocks(raw: Any) -> tuple[int, tuple[int, int], torch.Tensor]:
    """(ggml type id, (N, K), blocks as a uint8 torch tensor (N, bytes per row))."""
    ggml_type = int(raw.ggml_type)
    n, k = (int(s) for s in raw.shape)
    blocks = torch.from_numpy(raw.blocks).reshape(n, -1)
    return ggml_type, (n, k), blocks


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian f16 from (..., 2) uint8 bytes, as float32."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _q4_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(N, blocks, 16) bytes -> (N, blocks, 32) values 0..15 (low nibbles first)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def repack_gguf(raw: Any, mode: str) -> QuantWeight:
    """A GGUF tensor (a :class:`p2pllm.engine.gguf.RawTensor`: ``ggml_type``, ``shape``
    (out, in), ``blocks`` uint8 (rows, bytes per row)) as this module's quantized weight.

    int4 from Q4_0/Q4_1 keeps the nibbles (scales and zeros in bfloat16); int8 from Q8_0
    (or from a Q4 file, or int4 from Q8_0) goes through the float values."""
    ggml_type, (n, k), blocks = _gguf_blocks(raw)
    if mode == "int4" and ggml_type in (_Q4_0, _Q4_1) and n % 16 == 0:
        b = blocks.reshape(n, k // 32, -1)
        d = _f16(b[..., 0:2])
        if ggml_type == _Q4_0:
            q, mn = _q4_nibbles(b[..., 2:18]), -8.0 * d
        else:
            q, mn = _q4_nibbles(b[..., 4:20]), _f16(b[..., 2:4])
        return QuantWeight.int4_min(q.reshape(n, k), d, mn, 32)
    if mode == "int8" or n % 16:
        parts = [quantize_int8(gguf_dequantize(ggml_type, (b.shape[0], k), b))
                 for b in blocks.split(_CHUNK_ROWS)]  # no whole float copy of a big head
        return QuantWeight.int8(torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts]))
    return QuantWeight.from_float(gguf_dequantize(ggml_type, (n, k), blocks), mode)


def gguf_dequantize(ggml_type: int, shape: tuple[int, int], blocks: torch.Tensor) -> torch.Tensor:
    """Float32 values of Q8_0/Q4_0/Q4_1 blocks (N, bytes per row) (the same math as
    :func:`p2pllm.engine.gguf.dequantize`, kept here so the repacking needs no reader)."""
    n, k = shape
    b = blocks.reshape(n, k // 32, -1)
    d = _f16(b[..., 0:2])[..., None]
    if ggml_type == _Q8_0:
        return (b[..., 2:34].contiguous().view(torch.int8).float() * d).reshape(n, k)
    if ggml_type == _Q4_0:
        return ((_q4_nibbles(b[..., 2:18]).float() - 8.0) * d).reshape(n, k)
    if ggml_type == _Q4_1:
        m = _f16(b[..., 2:4])[..., None]
        return (_q4_nibbles(b[..., 4:20]).float() * d + m).reshape(n, k)
    raise ValueError(f"GGML type {ggml_type} has no quantized repacking (Q8_0, Q4_0, Q4_1)")


# -- the kernels' layouts ---------------------------------------------------------------------


def quantized_nbytes(n: int, k: int, mode: str, group: int = GROUP) -> int:
    """Bytes a quantized (N, K) weight takes (:meth:`QuantWeight.nbytes` without building it):
    int4 N*K/2 codes and, per group, a scale and a zero (bfloat16 for torch's kernel, float32
    for the native one), when the kernel takes the shape (as :meth:`QuantWeight.from_float`
    and :func:`repack_gguf` decide), else int8 N*K codes and a scale per row (bfloat16; the
    native kernel also keeps a float32 copy)."""
    nat = native_layout()
    if mode == "int4" and k % group == 0 and n % 16 == 0:
        per_group = 8 if nat and group == 32 else 2 * _KERNEL_DTYPE.itemsize  # int4_min
        return n * k // 2 + (k // group) * n * per_group
    if mode not in ("int4", "int8"):
        raise ValueError(f"quant mode {mode!r} is not int8 or int4")
    return n * k + n * (_KERNEL_DTYPE.itemsize + (4 if nat else 0))


def native_layout() -> bool:
    """Whether new quantized weights take the native kernels' layout (:mod:`.native` built)."""
    return native.kernels() is not None


class QuantWeight:
    """A quantized (N, K) weight in a kernel's layout; not a module and not a buffer, so
    ``module.to(dtype)`` leaves its integer codes and scales alone.

    Two layouts, chosen when the weight is made: **native** (:mod:`.native` built: the
    default) -- int8 codes with their bfloat16 scales widened to float32, int4 codes in
    GGUF's Q4 order (16 bytes a group of 32) with a float32 (scale, min) per group,
    ``w = scale * q + min``; any number
    of input rows, float32 activations, the same bits for a row whether it runs alone or
    among others -- or **torch** -- ``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu``
    with their packed codes, bfloat16 scales and bfloat16 activations."""

    def __init__(self, kind: str, shape: tuple[int, int], packed: torch.Tensor,
                 scales: torch.Tensor, group: int = 0, layout: str = "torch") -> None:
        self.kind, self.shape, self.packed, self.scales, self.group = (
            kind, shape, packed, scales, group)
        self.layout = layout
        # int8, native: the bfloat16 scales widened (the same values as the torch layout's)
        self.scale32 = scales.float().contiguous() if layout == "native" and kind == "int8" \
            else None

    @classmethod
    def int8(cls, q: torch.Tensor, scale: torch.Tensor) -> QuantWeight:
        n, k = q.shape
        return cls("int8", (n, k), q.contiguous(), scale.to(_KERNEL_DTYPE).contiguous(),
                   layout="native" if native_layout() else "torch")

    @classmethod
    def int4(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
             group: int) -> QuantWeight:
        """From codes q (N, K) in 0..15 with ``w = (q - 8) * scale + zero`` per group."""
        return cls.int4_min(q, scale, zero.float() - 8.0 * scale.float(), group)

    @classmethod
    def int4_min(cls, q: torch.Tensor, d: torch.Tensor, mn: torch.Tensor,
                 group: int) -> QuantWeight:
        """From codes q (N, K) in 0..15 with ``w = d * q + mn`` per group (GGUF Q4_1's form)."""
        n, k = q.shape
        if native_layout() and group == 32:
            g = q.to(torch.uint8).reshape(n, k // 32, 32)
            packed = (g[..., :16] | (g[..., 16:] << 4)).reshape(n, k // 2).contiguous()
            dm = torch.stack([d.float(), mn.float()], dim=-1).contiguous()  # (N, K/g, 2)
            return cls("int4", (n, k), packed, dm, group, layout="native")
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        zero = mn.float() + 8.0 * d.float()
        sz = torch.stack([d.float().t(), zero.t()], dim=-1)  # (K/g, N, 2)
        return cls("int4", (n, k), packed, sz.to(_KERNEL_DTYPE).contiguous(), group)

    @classmethod
    def from_float(cls, w: torch.Tensor, mode: str, group: int = GROUP) -> QuantWeight:
        """Quantize a float weight; int4 falls back to int8 when the kernel cannot take the
        shape (input width not a multiple of ``group``, outputs not a multiple of 16)."""
        n, k = w.shape
        if mode == "int4" and k % group == 0 and n % 16 == 0:
            return cls.int4(*quantize_int4(w, group), group)
        if mode not in ("int4", "int8"):
            raise ValueError(f"quant mode {mode!r} is not int8 or int4")
        return cls.int8(*quantize_int8(w))

    def nbytes(self) -> int:
        extra = 0 if self.scale32 is None else self.scale32.numel() * 4
        return (self.packed.numel() * self.packed.element_size()
                + self.scales.numel() * self.scales.element_size() + extra)

    def dequantize(self) -> torch.Tensor:
        """The float32 (N, K) weight these codes stand for (exactly what ``matmul``
        multiplies by; torch's int4 layout up to bfloat16 output rounding)."""
        n, k = self.shape
        if self.kind == "int8":
            return dequantize_int8(self.packed, self.scales)
        if self.layout == "native":
            b = self.packed.reshape(n, k // 32, 16)
            codes = torch.cat([b & 0x0F, b >> 4], dim=-1).float()
            dm = self.scales
            return (codes * dm[..., 0:1] + dm[..., 1:2]).reshape(n, k)
        eye = torch.eye(k, dtype=_KERNEL_DTYPE)
        out = torch.empty(n, k)
        for i in range(0, k, 256):  # identity rows in chunks: exact bf16 products of codes
            part = torch.ops.aten._weight_int4pack_mm_for_cpu(eye[i:i + 256], self.packed,
                                                              self.group, self.scales)
            out[:, i:i + 256] = part.float().t()
        return out

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ w.T`` for x (..., K): native, in x's dtype (float32 or bfloat16, computed
        in float32); torch's layout, in bfloat16."""
        k = self.shape[1]
        x2 = x.reshape(-1, k)
        if self.layout == "native":
            if x2.dtype not in (torch.float32, torch.bfloat16):
                x2 = x2.float()
            y = self.mm_native(x2.contiguous())
        else:
            if x2.dtype != _KERNEL_DTYPE:
                x2 = x2.to(_KERNEL_DTYPE)
            if self.kind == "int8":
                y = torch._weight_int8pack_mm(x2, self.packed, self.scales)
            else:
                y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scales)
        return y.view(*x.shape[:-1], self.shape[0])

    def mm_native(self, x2: torch.Tensor) -> torch.Tensor:
        """The native kernel on a contiguous (M, K) float32/bfloat16 input."""
        kern = native.built()  # the layout was made with them: they exist in this process
        assert kern is not None
        if self.kind == "int8":
            return kern.linear_int8(x2, self.packed, self.scale32)
        return kern.linear_int4(x2, self.packed, self.scales)


class QuantLinear(nn.Module):
    """A linear layer with a quantized weight (inference only: no weight gradient; the input
    gradient does not flow either, so train on a float base).

    ``rows``: this module's output rows of a weight shared with sibling projections (q/k/v,
    gate/up), as the engine's packed :class:`~p2pllm.engine.model.Linear` does."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None,
                 rows: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.qweight = weight
        self.rows = rows
        n, k = weight.shape
        self.in_features = k
        self.out_features = n if rows is None else rows[1] - rows[0]
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.qweight.matmul(x)
        rows = self.rows
        if rows is not None:
            y = y[..., rows[0]:rows[1]]
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        bias = self.bias
        return y if bias is None else y.add_(bias)

    def dequantized(self) -> torch.Tensor:
        """This module's float32 (out, in) weight."""
        w = self.qweight.dequantize()
        rows = self.rows
        return w if rows is None else w[rows[0]:rows[1]]

    def extra_repr(self) -> str:
        q = self.qweight
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"kind={q.kind}, group={q.group}, rows={self.rows}")


class QuantFused:
    """One quantized weight computing sibling projections (q/k/v or gate/up) in one matmul;
    the same interface as :class:`p2pllm.engine.model.Fused` (``splits``, ``usable``, call)."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None,
                 splits: tuple[int, ...]) -> None:
        self.qweight, self.bias, self.splits = weight, bias, splits

    def usable(self, mods: tuple[nn.Module, ...]) -> bool:
        return all(type(m) is QuantLinear and m.qweight is self.qweight for m in mods)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.qweight.matmul(x)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if self.bias is None else y.add_(self.bias)
