"""One decoder layer for one new token of one cache row: the no-grad decode step, lean.

A decode step of a small model is mostly per-op overhead: SmolLM2 int4 spends ~8 ms a token
in its matmul kernels and ~2 ms in ~56 other ops a layer (views, dtype casts, checks), each
~1 us. :func:`decode_layer` computes exactly what ``DecoderLayer.forward`` computes on its
no-grad path (same kernels, same roundings, so the same bits) in about half the ops:

* quantized linears hand their bfloat16 output on as it is: rotary, the cache write and
  the residual add read bfloat16 into float32 math (promotion converts exactly, as the
  ``.to(float32)`` it replaces did), and the RMSNorm and SiLU*up products are written
  straight into the kernel's bfloat16 input (the same float32 math, one rounding on store);
* the cache row's keys/values are written and read through views of its run (no
  transposes: with one token they are views);
* no nn.Module dispatch, no per-layer mask or plan lookups.

:func:`plan_decode` says whether a layer qualifies (engine modules, fused projections
usable, no biases or q/k norms, one row whose blocks are one run); any other layer runs
the general path, so the two mix freely within a step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from p2pllm.engine.quant import QuantFused, QuantLinear

__all__ = ["decode_layer", "layer_ok", "native_args", "native_layer"]

_silu = torch._C._nn.silu
_vector_norm = torch.linalg.vector_norm
_f32, _bf16 = torch.float32, torch.bfloat16


def layer_ok(layer: Any, norm_type: Any, linear_type: Any, fused_type: Any) -> bool:
    """Whether :func:`decode_layer` computes this DecoderLayer exactly (checked each step:
    a peft wrapper or a reassigned weight makes it False)."""
    a, m = layer.self_attn, layer.mlp
    if type(layer.input_layernorm) is not norm_type or type(
            layer.post_attention_layernorm) is not norm_type:
        return False
    if a.q_norm is not None or a.k_norm is not None:
        return False
    qkv, gu = a.fused_qkv, m.fused_gate_up
    if qkv is None or gu is None or qkv.bias is not None or gu.bias is not None:
        return False
    if type(qkv) is QuantFused:
        return (type(gu) is QuantFused and qkv.usable((a.q_proj, a.k_proj, a.v_proj))
                and gu.usable((m.gate_proj, m.up_proj))
                and type(a.o_proj) is QuantLinear and a.o_proj.rows is None
                and a.o_proj.bias is None and type(m.down_proj) is QuantLinear
                and m.down_proj.rows is None and m.down_proj.bias is None)
    return (type(qkv) is fused_type and type(gu) is fused_type
            and qkv.usable((a.q_proj, a.k_proj, a.v_proj)) and gu.usable((m.gate_proj, m.up_proj))
            and type(a.o_proj) is linear_type and a.o_proj.rows is None and a.o_proj.bias is None
            and type(m.down_proj) is linear_type and m.down_proj.rows is None
            and m.down_proj.bias is None)


def _rms(norm: Any, x: torch.Tensor, out: torch.dtype) -> torch.Tensor:
    """RMSNorm.fast(x), written as ``out`` (one rounding of the float32 product)."""
    if x.dtype != _f32:
        return norm.fast(x)
    n = _vector_norm(x, 2, -1, True)
    y = x * torch.addcmul(norm._eps, n, n, value=norm._inv_dim).rsqrt_()
    if out == _f32:
        return y.mul_(norm.weight)
    return torch.mul(y, norm.weight, out=torch.empty(y.shape, dtype=out))


def _quant_mm(qw: Any, x: torch.Tensor) -> torch.Tensor:
    """The kernel on a (1, K) input: torch's layout bfloat16 -> bfloat16, native float32 ->
    float32."""
    if qw.layout == "native":
        return qw.mm_native(x)
    if qw.kind == "int8":
        return torch._weight_int8pack_mm(x, qw.packed, qw.scales)
    return torch._weight_int4pack_mm_for_cpu(x, qw.packed, qw.group, qw.scales)


def decode_layer(layer: Any, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 kc: torch.Tensor, vc: torch.Tensor, write: int, first: int, s: int,
                 dense: Any, bf16_attention_fp32: bool) -> torch.Tensor:
    """``layer`` on h (1, 1, hidden); the new key/value go to slot ``write`` of the row's
    run ``kc``/``vc`` (1, kv_heads, slots, hd), which then attends over slots
    ``[first, first + s)``. ``dense(x, w)``: the model's no-grad dense linear."""
    a, m = layer.self_attn, layer.mlp
    nh, nkv, hd = a.num_heads, a.num_kv_heads, a.head_dim
    qkv_f, gu_f = a.fused_qkv, m.fused_gate_up
    quant = type(qkv_f) is QuantFused
    kdt = _bf16 if quant and qkv_f.qweight.layout == "torch" else h.dtype  # kernels' input
    width = h.shape[-1]
    # 1. q/k/v, rotary (float32 math on a quantized kernel's bfloat16 output)
    if quant:
        x = _rms(layer.input_layernorm, h, kdt).view(1, width)
        qkv = _quant_mm(qkv_f.qweight, x)
    else:
        qkv = dense(_rms(layer.input_layernorm, h, h.dtype).view(1, width), qkv_f.weight)
    nqk = (nh + nkv) * hd
    qk = qkv[:, :nqk].view(1, 1, nh + nkv, hd)
    qk = torch.addcmul(qk * cos, torch.roll(qk, hd // 2, -1), sin)
    # 2. the cache: this token's key/value, then the row's keys/values
    kc.narrow(2, write, 1).copy_(qk[:, :, nh:].view(1, nkv, 1, hd))
    vc.narrow(2, write, 1).copy_(qkv[:, nqk:].view(1, nkv, 1, hd))
    keys, values = kc.narrow(2, first, s), vc.narrow(2, first, s)
    q = qk[:, :, :nh].view(1, nh, 1, hd)
    gqa = nh != nkv
    if keys.dtype == _bf16 and bf16_attention_fp32:
        out = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(),
                                             scale=a.scale, enable_gqa=gqa).to(_bf16)
    else:
        out = F.scaled_dot_product_attention(q, keys, values, scale=a.scale, enable_gqa=gqa)
    # 3. output projection, residual
    out = out.view(1, nh * hd)
    if quant:
        o = _quant_mm(a.o_proj.qweight, out.to(kdt))
    else:
        o = dense(out, a.o_proj.weight)
    h = h + o.view(1, 1, -1)
    # 4. MLP, residual
    inter = gu_f.splits[0]
    if quant:
        gu = _quant_mm(gu_f.qweight, _rms(layer.post_attention_layernorm, h, kdt).view(1, width))
        if kdt == _bf16:
            act = torch.mul(_silu(gu[:, :inter].float()), gu[:, inter:],
                            out=torch.empty(1, inter, dtype=_bf16))
        else:
            act = _silu(gu[:, :inter]).mul_(gu[:, inter:])
        d = _quant_mm(m.down_proj.qweight, act)
    else:
        gu = dense(_rms(layer.post_attention_layernorm, h, h.dtype).view(1, width), gu_f.weight)
        d = dense(_silu(gu[:, :inter]).mul_(gu[:, inter:]), m.down_proj.weight)
    return h + d.view(1, 1, -1)


# -- the native layer ---------------------------------------------------------------------------

_DENSE_KINDS = {_f32: 0, _bf16: 1}


def _weight_args(m: Any, linear_type: Any) -> tuple[list[torch.Tensor], int] | None:
    """A linear module or fused group as the native layer takes it: (tensors, kind)."""
    if type(m) is QuantFused or type(m) is QuantLinear:
        if m.bias is not None or (type(m) is QuantLinear and m.rows is not None):
            return None
        qw = m.qweight
        if qw.layout != "native":
            return None
        if qw.kind == "int8":
            assert qw.scale32 is not None
            return [qw.packed, qw.scale32], 2
        return [qw.packed, qw.scales], 3
    if type(m) is linear_type:
        if m.rows is not None or m.bias is not None:
            return None
        w = m.weight
    else:  # a dense Fused group
        if m.bias is not None:
            return None
        w = m.weight
    kind = _DENSE_KINDS.get(w.dtype)
    if kind is None or w.is_mkldnn or not w.is_contiguous() or w.device.type != "cpu":
        return None
    return [w], kind  # read only: no autograd is involved


def native_args(layer: Any, norm_type: Any, linear_type: Any,
                fused_type: Any) -> tuple[Any, ...] | None:
    """The weights of a DecoderLayer as :func:`native_layer` takes them, or None when the
    native layer cannot compute it exactly as the module would (checked each step, like
    :func:`layer_ok`: a peft wrapper or a reassigned weight makes it None)."""
    a, m = layer.self_attn, layer.mlp
    n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
    if type(n1) is not norm_type or type(n2) is not norm_type:
        return None
    if a.q_norm is not None or a.k_norm is not None:
        return None
    qkv_f, gu_f = a.fused_qkv, m.fused_gate_up
    if qkv_f is None or gu_f is None:
        return None
    if type(qkv_f) is QuantFused:
        if not (qkv_f.usable((a.q_proj, a.k_proj, a.v_proj))
                and type(gu_f) is QuantFused and gu_f.usable((m.gate_proj, m.up_proj))):
            return None
    elif not (type(qkv_f) is fused_type and type(gu_f) is fused_type
              and qkv_f.usable((a.q_proj, a.k_proj, a.v_proj))
              and gu_f.usable((m.gate_proj, m.up_proj))):
        return None
    if len(gu_f.splits) != 2 or gu_f.splits[0] != gu_f.splits[1]:
        return None
    parts = [_weight_args(x, linear_type) for x in (qkv_f, a.o_proj, gu_f, m.down_proj)]
    if any(p is None for p in parts):
        return None
    out: list[Any] = [n1.weight, n2.weight, float(n1.eps)]
    for p in parts:
        assert p is not None
        out += [p[0], p[1]]
    return tuple(out)


def native_layer(kern: Any, args: tuple[Any, ...], layer: Any, h: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                 write: int, first: int, s: int) -> torch.Tensor:
    """``layer`` (its :func:`native_args`) on h (1, T, hidden) in one native call: the T new
    keys/values go to slots ``write ..`` of the row's run, query t attends over slots
    ``[first, first + s - T + t + 1)`` (the last ``window`` of them with a sliding window)."""
    a = layer.self_attn
    window = a.window if a.window is not None else 0
    return kern.decoder_layer(h, *args, cos, sin, kc, vc, write, first, s, window,
                              a.num_heads, a.num_kv_heads, a.head_dim, a.scale)
