"""Weight layouts for fast inference, applied to a built model from outside.

* **Fused projections.** q/k/v (and gate/up) weights are copied into one buffer and the
  modules' parameters become views of it: the parameters, their names and training are
  unchanged, and the no-grad path runs one matmul instead of three (two).
* **oneDNN packing** (bfloat16 on CPU). ``F.linear`` on bfloat16 weights runs a generic
  kernel that is compute-bound for one token (about float32's speed); oneDNN's matmul on
  prepacked weights runs at memory bandwidth, so bfloat16 reads half float32's bytes per
  token for real. Packing swaps weights for their mkldnn-layout copies (sibling projections
  share one packed fused tensor, each module keeping its ``rows``); ``hf_state_dict``
  unpacks. A packed slice is for inference: packed weights take no gradient (input
  gradients still flow, so adapters can train on top), and it cannot change dtype; call
  :func:`unpack_linears` first.
* **Weight-only quantization** (:func:`quantize_linears`, ``--quant int8|int4``): every
  engine Linear becomes a :class:`~p2pllm.engine.quant.QuantLinear` (fused groups share one
  quantized weight, each module keeping its ``rows``); inference only, like packing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from p2pllm.engine import model as _model
from p2pllm.engine import native
from p2pllm.engine.model import AFTER_APPLY, MLP, Attention, Fused, Linear, shadow_attributes
from p2pllm.engine.quant import (
    QuantFused,
    QuantLinear,
    QuantWeight,
    check_quant,
    gguf_dequantize,
    quantized_nbytes,
    repack_gguf,
)

__all__ = ["can_pack", "fuse_projections", "pack_linears", "preallocate_fused",
           "quantizable_weights", "quantize_linears", "unpack_linears", "weight_nbytes"]


PACK_FLOAT32_MIN_HIDDEN = 512  # float32 packs from hidden 512 (SmolLM2 576); tiny models don't


def can_pack(dtype: torch.dtype, device: torch.device | str = "cpu", hidden_size: int = 0) -> bool:
    """Whether packing helps: never where the native kernels are built (:mod:`.native`,
    with ``model.NATIVE_DENSE`` on: the default); else bfloat16 on a CPU whose oneDNN has
    native BF16 support, and float32 on a CPU with oneDNN for a model of ``hidden_size`` >=
    PACK_FLOAT32_MIN_HIDDEN.

    The native kernels read the plain float32/bfloat16 weights (one thread pinned, SmolLM2's
    30 layers without the head: float32 22.5 ms, bfloat16 12.1 ms a token, the weights
    streamed from memory; the native decode layer takes only plain weights), and without
    packing a tied head needs no copy and the weights stay trainable. Up to 16 rows go
    native; a longer prompt runs ``F.linear`` / oneDNN on the plain weights.

    Without them (``P2PLLM_NATIVE=0``, no compiler) -- float32, SmolLM2, one thread, CPU time of the thread (the box is shared; wall clock
    swung 2x between runs), medians of 6 rounds: packed decode 24.4 vs 29.6 ms a token
    (1.21x over oneDNN on the plain weight), 64-token prefill 89 vs 105 ms. It costs a
    tied head its own packed copy (SmolLM2 +113 MB) and the weights' trainability (the
    training paths load with ``pack=False``). A tiny model's linears are cheaper through
    ``F.linear`` (a oneDNN call costs ~10 us more), hence the size floor."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if _model.NATIVE_DENSE and dtype in (torch.float32, torch.bfloat16) and native.kernels() is not None:
        return False  # the native kernels decode faster from the plain weights
    if dtype == torch.float32:
        return hidden_size >= PACK_FLOAT32_MIN_HIDDEN
    if dtype != torch.bfloat16:
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def packs_tied_head(dtype: torch.dtype) -> bool:
    """Whether :func:`pack_linears` gives a tied head its own packed copy: bfloat16 yes;
    float32 no -- oneDNN on the plain table costs SmolLM2 ~1.1 ms a token more (4.5 vs
    3.4 ms, CPU time), a copy would cost 113 MB and change what the model is advertised
    to take (float32 parameter bytes)."""
    return dtype != torch.float32


def _groups(model: nn.Module) -> list[tuple[nn.Module, str, tuple[nn.Module, ...]]]:
    out: list[tuple[nn.Module, str, tuple[nn.Module, ...]]] = []
    for m in model.modules():
        if isinstance(m, Attention):
            out.append((m, "fused_qkv", (m.q_proj, m.k_proj, m.v_proj)))
        elif isinstance(m, MLP):
            out.append((m, "fused_gate_up", (m.gate_proj, m.up_proj)))
    return out


def fuse_projections(model: nn.Module) -> int:
    """Fuse q/k/v and gate/up of every layer (dense weights); returns how many groups."""
    n = 0
    for owner, attr, mods in _groups(model):
        current = getattr(owner, attr)
        if isinstance(current, QuantFused) and current.usable(mods):
            n += 1  # quantized: nothing to fuse
            continue
        if isinstance(current, Fused) and not current.weight.is_mkldnn and current.usable(mods):
            n += 1  # already fused (e.g. preallocated by the loader)
            continue
        fused = _fuse_dense(mods)
        setattr(owner, attr, fused)
        n += fused is not None
    shadow_attributes(model)
    return n


def preallocate_fused(model: nn.Module, dtype: torch.dtype,
                      device: torch.device | str) -> None:
    """Give every q/k/v and gate/up group (still on the meta device) one real, uninitialised
    buffer, its modules' parameters being views of it: the loader then copies the checkpoint
    tensors straight into place, with no concatenation afterwards."""
    for owner, attr, mods in _groups(model):
        lins = [m for m in mods if type(m) is Linear]
        if len(lins) != len(mods) or not all(m.weight.is_meta for m in lins):
            continue
        has_bias = [m.bias is not None for m in lins]
        if any(has_bias) and not all(has_bias):
            continue
        splits = tuple(int(m.weight.shape[0]) for m in lins)
        weight = torch.empty(sum(splits), lins[0].in_features, dtype=dtype, device=device)
        bias = torch.empty(sum(splits), dtype=dtype, device=device) if all(has_bias) else None
        lo = 0
        for m, size in zip(lins, splits, strict=True):
            m.weight = nn.Parameter(weight[lo:lo + size])
            if bias is not None:
                m.bias = nn.Parameter(bias[lo:lo + size])
            lo += size
        ptrs = [m.weight.data_ptr() for m in lins]
        if bias is not None:
            ptrs += [m.bias.data_ptr() for m in lins]
        setattr(owner, attr, Fused(weight, bias, splits, tuple(ptrs)))


def _fuse_dense(mods: tuple[nn.Module, ...]) -> Fused | None:
    lins = [m for m in mods if type(m) is Linear]
    if len(lins) != len(mods) or any(m.weight.is_mkldnn or m.weight.is_meta for m in lins):
        return None
    has_bias = [m.bias is not None for m in lins]
    if any(has_bias) and not all(has_bias):
        return None
    with torch.no_grad():
        weight = torch.cat([m.weight.detach() for m in lins])
        bias = torch.cat([m.bias.detach() for m in lins]) if all(has_bias) else None
    splits = tuple(int(m.weight.shape[0]) for m in lins)
    lo = 0
    for m, size in zip(lins, splits, strict=True):
        m.weight = nn.Parameter(weight[lo:lo + size], requires_grad=m.weight.requires_grad)
        if bias is not None:
            m.bias = nn.Parameter(bias[lo:lo + size], requires_grad=m.bias.requires_grad)
        m.rows = None
        lo += size
    ptrs = [m.weight.data_ptr() for m in lins]
    if bias is not None:
        ptrs += [m.bias.data_ptr() for m in lins]
    return Fused(weight, bias, splits, tuple(ptrs))


def pack_linears(model: nn.Module) -> int:
    """Pack every engine Linear's weight for oneDNN; fused groups share one packed tensor.
    Returns how many tensors were packed. A tied head gets its own packed copy, so the
    embedding keeps its dense table (float32: no copy, see :func:`packs_tied_head`)."""
    n = 0
    for owner, attr, mods in _groups(model):
        fused = getattr(owner, attr)
        if not isinstance(fused, Fused) or fused.weight.is_mkldnn or not fused.usable(mods):
            continue
        packed = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(fused.weight, None),
                              requires_grad=False)
        bias = None if fused.bias is None else nn.Parameter(fused.bias, requires_grad=False)
        lo = 0
        for m, size in zip(mods, fused.splits, strict=True):
            assert isinstance(m, Linear)
            m.weight = packed
            m.bias = bias  # type: ignore[assignment]
            m.rows = (lo, lo + size)
            lo += size
        setattr(owner, attr, Fused(packed, bias, fused.splits))
        n += 1
    head = getattr(model, "lm_head", None)
    embed = getattr(model, "embed_tokens", None)
    for m in model.modules():
        if type(m) is Linear and not m.weight.is_mkldnn:
            if (m is head and embed is not None and m.weight is embed.weight
                    and not packs_tied_head(m.weight.dtype)):
                continue  # float32: the tied head stays on the embedding's table
            m.weight = nn.Parameter(
                torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), None),
                requires_grad=False)
            n += 1
    shadow_attributes(model)
    return n


def unpack_linears(model: nn.Module) -> int:
    """Undo :func:`pack_linears`: dense, trainable, fused weights again."""
    n = 0
    dense: dict[int, torch.Tensor] = {}
    for m in model.modules():
        if isinstance(m, Linear) and m.weight.is_mkldnn:
            w = dense.setdefault(id(m.weight), m.weight.detach().to_dense())
            rows = m.rows
            if rows is not None:
                w = w[rows[0]:rows[1]]
                if m.bias is not None:
                    m.bias = nn.Parameter(m.bias.detach()[rows[0]:rows[1]].clone())
            m.weight = nn.Parameter(w.clone() if rows is not None else w)
            m.rows = None
            n += 1
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    fuse_projections(model)
    return n


_GROUP_NAMES = {Attention: ("q_proj", "k_proj", "v_proj"), MLP: ("gate_proj", "up_proj")}


def quantize_linears(model: nn.Module, mode: str,
                     raw: Callable[[str], Any | None] | None = None) -> int:
    """Replace every engine Linear of ``model`` (a ModelSlice) by a quantized one (``mode``
    int8 or int4; "none" does nothing); q/k/v and gate/up share one fused quantized weight.
    The head is int8 in both modes. ``raw(hf_name)``: the weight as stored -- a GGUF
    :class:`~p2pllm.engine.gguf.RawTensor` of Q8_0/Q4_x blocks (repacked, not re-rounded),
    a float tensor, or None (use the module's own weight); the loader passes it for weights
    it left on the meta device (:func:`quantizable_weights`). Returns how many weights were
    quantized."""
    mode = check_quant(mode)
    if mode == "none":
        return 0
    names = {id(m): name for name, m in model.named_modules()}
    hf_name = getattr(model, "hf_name", lambda n: "model." + n)
    n = 0

    def quantized(mods: list[Linear], kind: str) -> QuantWeight:
        stored = [raw(hf_name(names[id(m)] + ".weight")) if raw and m.weight.is_meta else None
                  for m in mods]
        blocks = [r for r in stored if r is not None and not isinstance(r, torch.Tensor)]
        joined = _cat_raw(blocks) if len(blocks) == len(mods) else None
        if joined is not None:
            return repack_gguf(joined, kind)
        parts = [_dense_rows(m) if r is None else _float(r) for m, r in zip(mods, stored,
                                                                           strict=True)]
        return QuantWeight.from_float(torch.cat(parts), kind)

    with torch.no_grad():
        for owner in list(model.modules()):
            attrs = _GROUP_NAMES.get(type(owner))
            if attrs is None:
                continue
            mods = [getattr(owner, a) for a in attrs]
            if not all(type(m) is Linear for m in mods):
                continue  # wrapped (e.g. peft): leave the group alone
            has_bias = [m.bias is not None for m in mods]
            if any(has_bias) and not all(has_bias):
                continue
            qw = quantized(mods, mode)
            bias = torch.cat([_dense_bias(m) for m in mods]) if all(has_bias) else None
            splits, lo = tuple(m.out_features for m in mods), 0
            for a, size in zip(attrs, splits, strict=True):
                b = None if bias is None else bias[lo:lo + size]
                setattr(owner, a, QuantLinear(qw, b, (lo, lo + size)))
                lo += size
            setattr(owner, "fused_qkv" if isinstance(owner, Attention) else "fused_gate_up",
                    QuantFused(qw, bias, splits))
            n += 1
        for name, m in list(model.named_modules()):
            if type(m) is not Linear:
                continue
            kind = "int8" if name == "lm_head" else mode
            qm = QuantLinear(quantized([m], kind), None if m.bias is None else _dense_bias(m))
            owner_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner_name) if owner_name else model, attr, qm)
            n += 1
    shadow_attributes(model)
    return n


def weight_nbytes(model: nn.Module, dtype: torch.dtype, quant: str | None = None,
                  packed: bool = False) -> int:
    """Bytes of weights ``model`` (a ModelSlice, on the meta device will do) holds once it is
    loaded as ``dtype`` and quantized as :func:`quantize_linears` does it with ``quant``: its
    linears' codes and scales (q/k/v and gate/up fused, the head int8, a tied head a quantized
    copy of the embedding), every other parameter (embedding, norms, biases) in ``dtype``.
    ``packed``: float linears packed by :func:`pack_linears` (a tied head its own copy)."""
    mode = check_quant(quant)
    if packed and mode == "none":
        head = getattr(model, "lm_head", None)
        embed = getattr(model, "embed_tokens", None)
        if (head is not None and embed is not None and head.weight is embed.weight
                and packs_tied_head(dtype)):
            return weight_nbytes(model, dtype) + head.weight.numel() * dtype.itemsize
    quantized: set[int] = set()
    total = 0
    if mode != "none":
        grouped: set[int] = set()
        for owner in model.modules():
            attrs = _GROUP_NAMES.get(type(owner))
            mods = [getattr(owner, a) for a in attrs] if attrs else []
            if not mods or not all(type(m) is Linear for m in mods):
                continue
            has_bias = [m.bias is not None for m in mods]
            if any(has_bias) and not all(has_bias):
                continue
            total += quantized_nbytes(sum(m.out_features for m in mods), mods[0].in_features,
                                      mode)
            grouped.update(id(m) for m in mods)
        for name, m in model.named_modules():
            if type(m) is not Linear:
                continue
            if id(m) not in grouped:
                total += quantized_nbytes(m.out_features, m.in_features,
                                          "int8" if name == "lm_head" else mode)
            quantized.add(id(m.weight))
        embed = getattr(model, "embed_tokens", None)
        if embed is not None:  # a tied head's weight is the embedding, which stays float
            quantized.discard(id(embed.weight))
    seen: set[int] = set()
    for _, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or id(p) in quantized:
            continue
        seen.add(id(p))
        total += p.numel() * dtype.itemsize
    return total


def quantizable_weights(model: nn.Module) -> set[str]:
    """HF names of the weights :func:`quantize_linears` replaces (every engine Linear's but
    a tied head's, which is the embedding): the loader need not read them as floats."""
    hf_name = getattr(model, "hf_name", lambda n: "model." + n)
    out = {hf_name(f"{name}.weight") for name, m in model.named_modules() if type(m) is Linear}
    out.discard("model.embed_tokens.weight")
    return out


def _float(r: Any) -> torch.Tensor:
    """A stored weight as float32: a tensor, or GGUF blocks of several types."""
    if isinstance(r, torch.Tensor):
        return r.float()
    return gguf_dequantize(int(r.ggml_type), (int(r.shape[0]), int(r.shape[1])),
                           torch.from_numpy(r.blocks))


def _dense_rows(m: Linear) -> torch.Tensor:
    w = m.weight.detach()
    if w.is_mkldnn:
        w = w.to_dense()
        if m.rows is not None:
            w = w[m.rows[0]:m.rows[1]]
    return w.float()


def _dense_bias(m: Linear) -> torch.Tensor:
    assert m.bias is not None
    b = m.bias.detach()
    if m.weight.is_mkldnn and m.rows is not None and b.shape[0] != m.out_features:
        b = b[m.rows[0]:m.rows[1]]
    return b.clone()


def _cat_raw(parts: list[Any]) -> Any | None:
    """GGUF RawTensors of one type stacked along their rows (a fused group's weight); None
    when they differ in type (then the group is quantized from its float values)."""
    if len(parts) == 1:
        return parts[0]
    import numpy as np

    types = {int(p.ggml_type) for p in parts}
    first = parts[0]
    if len(types) != 1:
        return None
    rows = sum(int(p.shape[0]) for p in parts)
    blocks = np.concatenate([p.blocks for p in parts])
    return type(first)(first.ggml_type, (rows, int(first.shape[1])), blocks)


AFTER_APPLY.append(fuse_projections)  # ModelSlice.to() re-fuses through this hook
