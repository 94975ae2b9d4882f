"""Llama-family decoder (llama, mistral, qwen2, qwen3) that can run any contiguous layer range.

Module and parameter names follow the Hugging Face checkpoint names without the leading
``model.`` (``layers.{i}.self_attn.q_proj.weight`` with the GLOBAL layer index ``i``,
``embed_tokens.weight``, ``norm.weight``, ``lm_head.weight``), so a slice's state maps 1:1
onto a checkpoint and peft ``target_modules`` such as ``q_proj`` find their layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from p2pllm.engine import native
from p2pllm.engine.config import ModelConfig
from p2pllm.engine.decode import decode_layer, layer_ok, native_args, native_layer
from p2pllm.engine.errors import ModelError, SequenceTooLongError
from p2pllm.engine.kv_cache import DEFAULT_BLOCK_SIZE, KVCache, KVPlan
from p2pllm.engine.quant import QuantFused, QuantLinear
from p2pllm.engine.rope import RotaryTable

__all__ = ["Linear", "ModelSlice", "RMSNorm"]

# Called with a slice after .to() / .half() / ... gave its parameters new storage.
# :mod:`.layout` registers its re-fusing here, so the model does not import the layout.
AFTER_APPLY: list[Callable[[nn.Module], object]] = []


class Linear(nn.Linear):
    """nn.Linear whose weight may also be a oneDNN-packed tensor (see :mod:`.layout`).

    A packed (mkldnn-layout) weight may be shared by sibling projections (q/k/v, gate/up):
    then ``rows`` says which output rows are this module's. Packed weights serve inference;
    when autograd needs the input's gradient, the weight is unpacked on the fly, so adapters
    can still train on top.
    """

    rows: tuple[int, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if not w.is_mkldnn:
            return F.linear(x, w, self.bias)
        rows = self.rows
        bias: torch.Tensor | None = self.bias
        if torch.is_grad_enabled() and x.requires_grad:
            dense = w.to_dense()
            if rows is not None:
                dense = dense[rows[0]:rows[1]]
                bias = None if bias is None else bias[rows[0]:rows[1]]
            return F.linear(x, dense, bias)
        y = _onednn(x, w, bias, "none", [], "")
        return y if rows is None else y[..., rows[0]:rows[1]]


@dataclass(eq=False)
class Fused:
    """One weight computing sibling projections (q/k/v or gate/up) in a single matmul.

    Dense: ``weight`` is the storage whose row blocks ARE the modules' weight parameters
    (``ptrs`` records their addresses, so reassigning one is noticed). Packed: ``weight`` is
    the oneDNN tensor all the modules share.
    """

    weight: torch.Tensor  # (sum(splits), in)
    bias: torch.Tensor | None
    splits: tuple[int, ...]
    ptrs: tuple[int, ...] = ()

    def usable(self, mods: tuple[nn.Module, ...]) -> bool:
        """Whether ``mods`` still compute exactly this fused weight."""
        w = self.weight
        if w.is_mkldnn:
            return all(type(m) is Linear and m.weight is w for m in mods)
        ptrs, n = self.ptrs, len(mods)
        for i, m in enumerate(mods):
            if type(m) is not Linear or m.weight.data_ptr() != ptrs[i]:
                return False  # wrapped (e.g. by peft) or reassigned: use the modules
            if self.bias is not None and (m.bias is None or m.bias.data_ptr() != ptrs[n + i]):
                return False
        return True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.is_mkldnn:
            return _onednn(x, self.weight, self.bias, "none", [], "")
        return _dense_linear(x, self.weight, self.bias)


_onednn: Callable[..., torch.Tensor] = torch.ops.mkldnn._linear_pointwise
with contextlib.suppress(AttributeError, RuntimeError):  # the overload: ~1-3 us less a call
    _onednn = torch.ops.mkldnn._linear_pointwise.default
# Fast paths of the no-grad forward, each a switch so tests can compare it with the plain path
ONEDNN_FLOAT32 = torch.backends.mkldnn.is_available()  # wide float32 linears through oneDNN
ONEDNN_MIN_NUMEL = 1 << 17  # 512 KiB of float32 (see _dense_linear)
BF16_DECODE_ATTENTION_FP32 = True  # one bfloat16 query attends in float32 (see Attention)
DECODE_LAYER = True  # one token of one cache row: the lean layer of :mod:`.decode`
NATIVE_DENSE = True  # few-row float32/bfloat16 linears through :mod:`.native` when built
NATIVE_MAX_ROWS = 16  # up to this many input rows (decode, a speculative window)
NATIVE_LAYER = True  # up to NATIVE_MAX_ROWS tokens of one cache row: one native call a layer
NATIVE_PAGED = True  # one token per row of a batch: native attention over the paged cache


def _dense_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """No-grad ``F.linear`` of a plain weight.

    Up to ``NATIVE_MAX_ROWS`` input rows of a float32 or bfloat16 weight go through the
    native kernel (:mod:`.native`): it streams the weight once for all rows at memory
    bandwidth and gives a row the same bits whatever the other rows are. More rows (a
    prompt) and a float32 weight of at least ``ONEDNN_MIN_NUMEL`` elements go through
    oneDNN's matmul on the plain weight (a call costs ~10 us more than ``F.linear``, so a
    small weight, a tiny model's, keeps ``F.linear``)."""
    if (NATIVE_DENSE and w.dtype == x.dtype and w.device.type == "cpu"
            and w.dtype in (torch.float32, torch.bfloat16) and w.is_contiguous()):
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if 0 < rows <= NATIVE_MAX_ROWS:
            kern = native.kernels()
            if kern is not None:
                y = kern.linear_dense(x.reshape(rows, x.shape[-1]).contiguous(), w)
                y = y.view(*x.shape[:-1], w.shape[0])
                return y if b is None else y.add_(b)
    if (ONEDNN_FLOAT32 and w.dtype == torch.float32 and x.dtype == torch.float32
            and w.numel() >= ONEDNN_MIN_NUMEL and w.device.type == "cpu"
            and w.is_contiguous() and x.is_contiguous()):
        return _onednn(x, w, b, "none", [], "")
    return F.linear(x, w, b)


def _dense_decode(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """No-grad linear without bias of a plain or oneDNN-packed weight (for :mod:`.decode`)."""
    return _onednn(x, w, None, "none", [], "") if w.is_mkldnn else _dense_linear(x, w, None)


def _lin(m: nn.Module, x: torch.Tensor, fast: bool) -> torch.Tensor:
    """``m(x)``; on the no-grad fast path, an engine Linear runs without nn.Module dispatch.

    Any other module (a peft LoRA wrapper, say) is always called normally.
    """
    if fast and type(m) is Linear:
        w = m.weight
        if w.is_mkldnn:
            y = _onednn(x, w, m.bias, "none", [], "")
            rows = m.rows
            return y if rows is None else y[..., rows[0]:rows[1]]
        return _dense_linear(x, w, m.bias)
    if fast and type(m) is QuantLinear:
        return m.forward(x)
    return m(x)


_silu = torch._C._nn.silu  # F.silu without its Python wrapper
_vector_norm = torch.linalg.vector_norm


def _rotate(x: torch.Tensor, step: _Step) -> torch.Tensor:
    """Rotary embedding of (B, T, heads, hd): x*cos + rotate_half(x)*sin."""
    return torch.addcmul(x * step.cos, torch.roll(x, x.shape[-1] // 2, -1), step.sin)


def shadow_attributes(root: nn.Module) -> None:
    """Copy the submodules and parameters of the engine's modules into their ``__dict__``.

    Attribute lookups then skip ``nn.Module.__getattr__`` (~1 us each, ~150 per decode step
    of a small model). Safe: ``nn.Module.__setattr__`` drops the copy whenever a submodule or
    parameter is reassigned (a peft wrapper, ``load_state_dict(assign=True)``), so lookups
    fall back to the registered value; call again after bulk changes to regain the speed.
    """
    for m in root.modules():
        if isinstance(m, _SHADOWED):
            m.__dict__.update(m._parameters)
            m.__dict__.update(m._modules)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.shape = (dim,)
        self._eps = torch.tensor(eps, dtype=torch.float32, device="cpu")  # 0-dim: any device
        self._inv_dim = 1.0 / dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return torch.rms_norm(x, self.shape, self.weight, self.eps)  # no Python wrapper
        # As transformers: normalise in fp32, cast back, then scale.
        y = torch.rms_norm(x.float(), self.shape, None, self.eps)
        return self.weight * y.to(x.dtype)

    def fast(self, x: torch.Tensor) -> torch.Tensor:
        """The same without autograd, in 5 cheap ops instead of torch.rms_norm's ~10 (the
        mean of squares comes from the 2-norm: equal up to one rounding)."""
        xf = x if x.dtype == torch.float32 else x.float()
        n = _vector_norm(xf, 2, -1, True)
        y = xf * torch.addcmul(self._eps, n, n, value=self._inv_dim).rsqrt_()
        if x.dtype == torch.float32:
            return y.mul_(self.weight)
        return self.weight * y.to(x.dtype)


@dataclass
class _Step:
    """What every layer of one forward pass needs to know about its attention.

    Built once per forward by :meth:`ModelSlice._plan`; shapes are noted as
    B = sequences, T = new tokens per sequence, S = keys attended to.
    """

    cos: torch.Tensor  # (B or 1, T, 1, hd)
    sin: torch.Tensor
    cache: KVCache | None = None
    kv: KVPlan | None = None  # where each layer reads and writes the cache
    start: int | None = None  # shared cache length of all rows, or None when they differ
    kv_len: int = 0  # S
    causal: bool = False  # SDPA is_causal (no prefix, no window)
    masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)
    query_pos: torch.Tensor | None = None  # (B, T) positions, to build window masks lazily
    fast: bool = False  # no autograd: skip nn.Module dispatch for the engine's own modules


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        h, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
        self.layer = layer
        self.window = config.sliding_windows[layer]
        self.scale = hd ** -0.5
        self.q_proj = Linear(h, self.num_heads * hd, bias=config.attention_bias)
        self.k_proj = Linear(h, self.num_kv_heads * hd, bias=config.attention_bias)
        self.v_proj = Linear(h, self.num_kv_heads * hd, bias=config.attention_bias)
        self.o_proj = Linear(self.num_heads * hd, h, bias=config.o_bias)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)
        self.fused_qkv: Fused | QuantFused | None = None  # set by layout.fuse_projections

    def forward(self, x: torch.Tensor, step: _Step) -> torch.Tensor:
        b, t, _ = x.shape
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        fast, fused = step.fast, self.fused_qkv
        # 1-2. projections and rotary embedding, (B, T, heads, hd)
        if fast and fused is not None and fused.usable((self.q_proj, self.k_proj, self.v_proj)):
            qkv = fused(x).view(b, t, nh + 2 * nkv, hd)
            v = qkv[:, :, nh + nkv:]
            if self.q_norm is None or self.k_norm is None:
                qk = _rotate(qkv[:, :, :nh + nkv], step)  # q and k rotated in one go
                q, k = qk[:, :, :nh], qk[:, :, nh:]
            else:
                q = _rotate(_norm(self.q_norm, qkv[:, :, :nh]), step)
                k = _rotate(_norm(self.k_norm, qkv[:, :, nh:nh + nkv]), step)
        else:
            q = _lin(self.q_proj, x, fast).view(b, t, nh, hd)
            k = _lin(self.k_proj, x, fast).view(b, t, nkv, hd)
            v = _lin(self.v_proj, x, fast).view(b, t, nkv, hd)
            if self.q_norm is not None and self.k_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = _rotate(q, step), _rotate(k, step)
        # 3. keys / values to attend to, (B, kv_heads, S, hd)
        if step.cache is None:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)
        else:
            if fast and t == 1 and NATIVE_PAGED and step.kv is not None and step.kv.span is None \
                    and (kern := native.kernels()) is not None:
                # one token per row of a batch: attend to the rows' blocks in place
                out = step.cache.attend_paged(kern, self.layer, q[:, 0], k, v, step.kv,
                                              self.window, self.scale)
                return _lin(self.o_proj, out.to(q.dtype).view(b, 1, nh * hd), fast)
            keys, values = self._cached(k, v, step)
        # 4. attention, (B, heads, T, hd)
        mask = self._mask(step)
        if (fast and t == 1 and mask is None and keys.dtype == torch.bfloat16
                and BF16_DECODE_ATTENTION_FP32):
            # one query in bfloat16: torch's bf16 CPU flash kernel takes ~75 us a layer at
            # SmolLM2's shapes (100 keys), the float32 one on float copies ~21 us; same math
            # (bf16 SDPA accumulates in float32 too), one bf16 rounding of the output
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2).float(), keys.float(), values.float(), scale=self.scale,
                enable_gqa=self.num_heads != self.num_kv_heads).to(keys.dtype)
            return _lin(self.o_proj, out.view(b, 1, self.num_heads * hd), fast)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask,
            is_causal=step.causal and mask is None and t > 1, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads)
        return _lin(self.o_proj, out.transpose(1, 2).reshape(b, t, self.num_heads * hd), fast)

    def _cached(self, k: torch.Tensor, v: torch.Tensor,
                step: _Step) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values (B, T, kv_heads, hd) into the cache and return the
        keys/values to attend to, (B, kv_heads, S, hd) -- only the window's last keys when
        one new token per row at a shared length has a sliding window (then no mask)."""
        assert step.cache is not None and step.kv is not None
        return step.cache.update(self.layer, k, v, step.kv, self.window)

    def _mask(self, step: _Step) -> torch.Tensor | None:
        """Boolean mask (B, 1, T, S) or None, per window size, shared by the layers."""
        window = self.window
        if window is not None and step.kv_len <= window:
            window = None  # every key is inside the window
        if window not in step.masks:
            step.masks[window] = _build_mask(step, window)
        return step.masks[window]


def _build_mask(step: _Step, window: int | None) -> torch.Tensor | None:
    qpos = step.query_pos
    assert qpos is not None
    b, t = qpos.shape
    if window is None:
        if step.causal or (t == 1 and step.start is not None):
            return None  # plain causal, or one new token that sees the whole prefix
    elif step.start is not None and t == 1 and step.cache is not None:
        return None  # handled by slicing the cache in Attention._cached
    keys = torch.arange(step.kv_len, device=qpos.device)
    q = qpos[:, :, None]
    if step.cache is None:
        q = torch.arange(t, device=qpos.device)[None, :, None]  # no prefix: key j is token j
    mask = keys[None, None, :] <= q
    if window is not None:
        mask &= keys[None, None, :] > q - window
    return mask.unsqueeze(1)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(h, i, bias=bias)
        self.up_proj = Linear(h, i, bias=bias)
        self.down_proj = Linear(i, h, bias=bias)
        self.fused_gate_up: Fused | QuantFused | None = None  # set by layout.fuse_projections

    def forward(self, x: torch.Tensor, fast: bool = False) -> torch.Tensor:
        fused = self.fused_gate_up
        if fast and fused is not None and fused.usable((self.gate_proj, self.up_proj)):
            gate_up = fused(x)
            i = fused.splits[0]
            h = _silu(gate_up[..., :i]).mul_(gate_up[..., i:])
        else:
            h = F.silu(_lin(self.gate_proj, x, fast)) * _lin(self.up_proj, x, fast)
        return _lin(self.down_proj, h, fast)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h: torch.Tensor, step: _Step) -> torch.Tensor:
        if step.fast:  # the same math, without nn.Module dispatch
            h = h + self.self_attn.forward(_norm(self.input_layernorm, h), step)
            return h + self.mlp.forward(_norm(self.post_attention_layernorm, h), True)
        h = h + self.self_attn(self.input_layernorm(h), step)
        return h + self.mlp(self.post_attention_layernorm(h))


def _norm(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """No-grad RMSNorm (or whatever module replaced it)."""
    return m.fast(x) if type(m) is RMSNorm else m(x)


_SHADOWED = (Linear, RMSNorm, Attention, MLP, DecoderLayer)


class ModelSlice(nn.Module):
    """Layers ``[start, end)`` of a model, with the embedding and/or the head if asked.

    Build one with :func:`p2pllm.engine.loader.load_slice`; constructing it directly gives
    randomly initialised weights (useful on the meta device, or for training from scratch).
    """

    def __init__(self, config: ModelConfig, start: int = 0, end: int | None = None,
                 has_embed: bool | None = None, has_head: bool | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 ) -> None:
        super().__init__()
        end = config.num_layers if end is None else end
        if not 0 <= start <= end <= config.num_layers:
            raise ModelError(f"layer range [{start}, {end}) is not within the model's "
                             f"{config.num_layers} layers")
        self.config = config
        self.start, self.end = start, end
        self.has_embed = start == 0 if has_embed is None else has_embed
        self.has_head = end == config.num_layers if has_head is None else has_head
        if start == end and not (self.has_embed or self.has_head):
            raise ModelError("an empty slice: no layers, no embedding, no head")
        h, v = config.hidden_size, config.vocab_size
        self.embed_tokens = nn.Embedding(v, h) if self.has_embed else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(config, i) for i in range(start, end)})
        self.norm = RMSNorm(h, config.rms_norm_eps) if self.has_head else None
        self.lm_head = Linear(h, v, bias=False) if self.has_head else None
        self._rope: RotaryTable | None = None  # built on first use, for the params' dtype
        self.tie_weights()
        self.to(dtype=dtype) if device is None else self.to(dtype=dtype, device=device)

    # -- structure ----------------------------------------------------------------------------

    def tie_weights(self) -> None:
        """Share the embedding with the head when the config ties them and both are here."""
        if (self.config.tie_word_embeddings and self.embed_tokens is not None
                and self.lm_head is not None):
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return self._weight().dtype

    @property
    def device(self) -> torch.device:
        return self._weight().device

    def _weight(self) -> torch.Tensor:
        for p in self.parameters():
            if p.is_floating_point():
                return p
        raise ModelError("slice has no floating-point parameters")

    def _rope_table(self) -> RotaryTable:
        rope = self._rope
        if rope is None:
            w = self._weight()
            rope = self._rope = RotaryTable(self.config, w.dtype, w.device)
        return rope

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        self._rope = None  # dtype or device may change: rebuild the tables on next use
        out = super()._apply(fn, recurse)
        for hook in AFTER_APPLY:  # .to() gave each parameter its own storage: fuse again
            hook(self)
        return out

    def num_parameters(self) -> int:
        """Parameters of this slice, each Hugging Face tensor once (a tied embedding/head
        counts once, fused or packed projections count as their parts)."""
        return (sum(_numel(p, rows) for _, p, rows in self._hf_params())
                + sum(m.in_features * m.out_features for _, m in self.quant_linears()))

    def quant_linears(self) -> list[tuple[str, QuantLinear]]:
        """(HF weight name, module) of the quantized linears (see :mod:`.quant`) whose weight
        no parameter holds (a quantized tied head is the embedding's copy: left out)."""
        have = {key for key, _, _ in self._hf_params()}
        out: list[tuple[str, QuantLinear]] = []
        for mod_name, mod in self.named_modules():
            if type(mod) is QuantLinear:
                key = self.hf_name(f"{mod_name}.weight")
                if key not in have:
                    have.add(key)
                    out.append((key, mod))
        return out

    def hf_name(self, name: str) -> str:
        """Hugging Face checkpoint name of one of this module's parameter names."""
        if name.startswith("lm_head."):
            if self.config.tie_word_embeddings:
                return "model.embed_tokens.weight"
            return name
        return "model." + name

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """This slice's weights keyed by Hugging Face checkpoint names (dense, detached).

        Tensors may share storage (fused projections are views of one buffer): clone them
        before handing them to ``safetensors.torch.save_file`` (``save_hf_checkpoint`` does).
        """
        out: dict[str, torch.Tensor] = {}
        dense: dict[int, torch.Tensor] = {}
        for key, p, rows in self._hf_params():
            t = p.detach()
            if t.is_mkldnn:
                t = dense.setdefault(id(p), t.to_dense())
            out[key] = t if rows is None else t[rows[0]:rows[1]]
        for key, m in self.quant_linears():  # dequantized, in the slice's dtype
            out[key] = m.dequantized().to(self.dtype)
        return out

    def _hf_params(self) -> list[tuple[str, torch.Tensor, tuple[int, int] | None]]:
        """(HF name, parameter, rows of it that are this tensor or None), each name once."""
        out: list[tuple[str, torch.Tensor, tuple[int, int] | None]] = []
        seen: set[str] = set()
        for mod_name, mod in self.named_modules():
            for p_name, p in mod._parameters.items():
                key = self.hf_name(f"{mod_name}.{p_name}" if mod_name else p_name)
                if p is None or key in seen:
                    continue
                seen.add(key)
                rows = mod.rows if isinstance(mod, Linear) else None
                if rows is not None and p.shape[0] == rows[1] - rows[0]:
                    rows = None  # the parameter is this module's alone
                out.append((key, p, rows))
        return out

    def new_cache(self, batch: int = 1, max_len: int | None = None, *,
                  max_total_tokens: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                  chunk_tokens: int | None = None) -> KVCache:
        """A KV cache for this slice's layers with ``batch`` rows made up front (more with
        ``add_row``), each of up to ``max_len`` positions (default: the model's maximum),
        all together of up to ``max_total_tokens`` (default: ``batch`` full rows). Blocks of
        ``block_size`` positions are taken as positions arrive, from storage allocated in
        chunks of ``chunk_tokens`` (default ``max_len``) positions (see :mod:`.kv_cache`)."""
        limit = self.config.max_position_embeddings
        max_len = limit if max_len is None else max_len
        if max_len > limit:
            raise SequenceTooLongError(f"max_len {max_len} exceeds the model's maximum length "
                                       f"({limit} positions)")
        if max_total_tokens is None:
            max_total_tokens = max(batch, 1) * -(-max_len // block_size) * block_size
        c = self.config
        return KVCache(num_layers=self.end - self.start, rows=batch, num_kv_heads=c.num_kv_heads,
                       max_len=max_len, max_total_tokens=max_total_tokens, head_dim=c.head_dim,
                       block_size=block_size, chunk_tokens=chunk_tokens, dtype=self.dtype,
                       device=self.device, start=self.start)

    # -- running ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                slots: torch.Tensor | None = None, *, last_only: bool = False) -> torch.Tensor:
        """Run the slice on B sequences of T new tokens each.

        x: token ids (B, T) if ``has_embed``, else hidden states (B, T, hidden).
        positions: (B, T) absolute positions of those tokens; with a cache, row r's tokens
        must start at that row's cached length.
        cache / slots: write the new keys/values into ``cache`` rows ``slots`` (B,)
        (default rows 0..B-1) and attend over each row's prefix; no cache = plain causal
        attention over the T tokens, differentiable.
        last_only: only compute the head on the last token (logits (B, 1, vocab)).
        Returns logits (B, T, vocab) if ``has_head`` else hidden states (B, T, hidden).
        """
        # 1. inputs
        h = self._embed(x)
        b, t = h.shape[0], h.shape[1]
        if positions.shape != (b, t) or positions.dtype not in (torch.int64, torch.int32):
            raise ModelError(f"positions must be integers of shape {(b, t)}, got "
                             f"{positions.dtype} {tuple(positions.shape)}")
        step = self._plan(positions, cache, slots, b, t)
        step.fast = not torch.is_grad_enabled()
        # 2. layers
        try:
            if step.fast and b == 1 and DECODE_LAYER and step.kv is not None \
                    and step.kv.span is not None and cache is not None and (
                        t == 1 or (t <= NATIVE_MAX_ROWS and NATIVE_LAYER
                                   and native.kernels() is not None)):
                h = self._decode_layers(h, step, cache, step.kv)
            elif step.fast:
                for layer in self.layers.values():
                    h = layer.forward(h, step) if type(layer) is DecoderLayer else layer(h, step)
            else:
                for layer in self.layers.values():
                    h = layer(h, step)
        except BaseException:
            if cache is not None and step.kv is not None:
                cache.abort(step.kv)  # give back the blocks this step reserved
            raise
        # 3. the cache now holds the new tokens
        if cache is not None and step.kv is not None:
            cache.commit(step.kv)
        # 4. head
        if self.norm is None or self.lm_head is None:
            return h
        if last_only:
            h = h[:, -1:]
        h = _norm(self.norm, h) if step.fast else self.norm(h)
        return _lin(self.lm_head, h, step.fast)

    def _decode_layers(self, h: torch.Tensor, step: _Step, cache: KVCache,
                       kv: KVPlan) -> torch.Tensor:
        """The layers on T new tokens of one cache row whose blocks are one run: each layer
        in one native call (:func:`.decode.native_layer`) when the kernels are built and it
        qualifies, else (one token) through :func:`.decode.decode_layer` when it qualifies,
        else its own forward."""
        views, first = cache.span_views(kv)
        s, t = kv.kv_len, kv.t
        write = first + kv.starts[0]
        cos, sin, lo0 = step.cos, step.sin, cache.start
        bf16_fp32 = BF16_DECODE_ATTENTION_FP32
        kern = native.kernels() if NATIVE_LAYER else None
        for layer in self.layers.values():
            if type(layer) is not DecoderLayer:
                h = layer(h, step)
                continue
            attn = layer.self_attn
            args = native_args(layer, RMSNorm, Linear, Fused) if kern is not None else None
            if args is not None and h.dtype in (torch.float32, torch.bfloat16):
                kc, vc = views[attn.layer - lo0]
                h = native_layer(kern, args, layer, h.contiguous(), cos, sin, kc, vc, write,
                                 first, s)
            elif t == 1 and layer_ok(layer, RMSNorm, Linear, Fused):
                window = attn.window
                lo = s - window if window is not None and s > window else 0
                kc, vc = views[attn.layer - lo0]
                h = decode_layer(layer, h, cos, sin, kc, vc, write, first + lo, s - lo,
                                 _dense_decode, bf16_fp32)
            else:
                h = layer.forward(h, step)
        return h

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is not None:
            if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
                raise ModelError(f"this slice embeds tokens: expected integer token ids (B, T), "
                                 f"got {x.dtype} {tuple(x.shape)}")
            lo, hi = torch.aminmax(x) if x.numel() else (0, 0)
            if int(lo) < 0 or int(hi) >= self.config.vocab_size:
                raise ModelError(f"token id out of range [0, {self.config.vocab_size})")
            return self.embed_tokens(x)
        h = self.config.hidden_size
        if x.dim() != 3 or x.shape[2] != h or not x.is_floating_point():
            raise ModelError(f"this slice starts at layer {self.start}: expected hidden states "
                             f"(B, T, {h}), got {x.dtype} {tuple(x.shape)}")
        dtype = self._rope_table().dtype  # the weights' dtype, cached
        return x if x.dtype == dtype else x.to(dtype)

    def _plan(self, positions: torch.Tensor, cache: KVCache | None, slots: torch.Tensor | None,
              b: int, t: int) -> _Step:
        """Validate positions against the cache and precompute what the layers share."""
        if t == 0:
            raise ModelError("no tokens to run")
        if cache is None:
            lo, hi = int(positions.min()), int(positions.max())
            if lo < 0 or hi >= self.config.max_position_embeddings:
                raise SequenceTooLongError(
                    f"position {hi if lo >= 0 else lo} is outside the model's maximum length "
                    f"({self.config.max_position_embeddings} positions)")
            rope = self._rope_table()
            rope.ensure(hi + 1)
            cos, sin = rope.lookup(positions)
            return _Step(cos=cos, sin=sin, kv_len=t, causal=True, query_pos=positions)

        # 1. which cache rows, at which lengths
        if slots is None:
            row_ids = list(range(b))
            if not all(cache.has_row(r) for r in row_ids):
                raise ModelError(f"{b} sequences but the cache has no rows {row_ids}")
        else:
            row_ids = [int(s) for s in slots.tolist()]
            if len(row_ids) != b or not all(cache.has_row(r) for r in row_ids):
                raise ModelError(f"slots must be {b} ids of the cache's rows {cache.rows}")
            if len(set(row_ids)) != b:
                raise ModelError("slots must be distinct")
        lengths = [cache.length(r) for r in row_ids]
        starts = positions[:, 0].tolist()
        if starts != lengths:
            raise ModelError(f"positions start at {starts} but the cache rows hold {lengths}")
        end = max(lengths) + t
        limit = self.config.max_position_embeddings
        if end > limit:
            raise SequenceTooLongError(f"sequence of {end} positions exceeds the model's "
                                       f"maximum length ({limit} positions)")
        # 2. blocks for the new positions (raises before changing anything when over a cap)
        kv = cache.plan(row_ids, t)
        # 3. rotary tables and masks
        rope = self._rope_table()
        rope.ensure(end)
        if kv.uniform:
            cos, sin = rope.span(lengths[0], t)
            return _Step(cos=cos, sin=sin, cache=cache, kv=kv, start=lengths[0], kv_len=end,
                         causal=lengths[0] == 0, query_pos=positions)
        cos, sin = rope.lookup(positions)
        return _Step(cos=cos, sin=sin, cache=cache, kv=kv, start=None, kv_len=end,
                     query_pos=positions)


def _numel(p: torch.Tensor, rows: tuple[int, int] | None) -> int:
    if rows is None:
        return p.numel()
    return (rows[1] - rows[0]) * (p.numel() // p.shape[0])

