"""Tensor parallelism (issue 15): one model's every layer split over N ranks of a
torch.distributed process group, Megatron style.

Rank r of N holds attention heads ``[r*H/N, (r+1)*H/N)`` (their q rows, and the KV heads
``[r*KV/N, ...)`` those heads read under GQA: the grouping is preserved because N divides
both), columns ``[r*I/N, ...)`` of gate/up, and the matching input columns of o_proj and
down_proj. A layer is then: attention over the rank's heads with its own KV cache, o_proj on
its heads -> all_reduce(sum); the MLP on its columns -> all_reduce(sum): exactly two
all-reduces per block. The embedding, the norms and the LM head are replicated (the simplest
split: every rank computes the same logits; rank 0 picks the token and broadcasts it so the
ranks agree even where kernels could round differently). o_proj / down_proj biases are added
on rank 0 only (the others hold zeros).

Pure engine: no sockets, no daemon. The caller makes the process group (:func:`tp_group`, or
any ``ProcessGroup`` it built) and calls the collectives (:meth:`TPSlice.forward`,
:func:`tp_generate`) on every rank with the same arguments.

The per-rank model is a :class:`~p2pllm.engine.model.ModelSlice` of :func:`rank_config`
(heads, KV heads and intermediate size divided by N), so the engine's attention, KV cache,
rotary tables, fused projections, native few-row linears and quantized linears all apply as
they are; only the layer loop differs (the all-reduces sit between attention and MLP, so the
native one-call-per-layer kernel, which does the whole layer, is not used).
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from p2pllm.engine.config import ModelConfig
from p2pllm.engine.errors import CheckpointError, ModelError
from p2pllm.engine.generate import GenerationResult
from p2pllm.engine.gguf import find_gguf
from p2pllm.engine.kv_cache import KVCache
from p2pllm.engine.layout import can_pack, fuse_projections, pack_linears, quantize_linears
from p2pllm.engine.model import ModelSlice, _lin, _norm
from p2pllm.engine.quant import check_quant
from p2pllm.engine.sampling import SamplingParams, greedy_token, make_generator, sample

__all__ = ["TPSizeError", "TPSlice", "check_tp", "load_tp_rank", "rank_config", "tp_generate",
           "tp_group", "tp_sizes"]


class TPSizeError(ModelError):
    """The model's heads, KV heads or MLP width do not split over that many ranks."""

    def __init__(self, message: str, *, possible: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.possible = list(possible)


def tp_sizes(config: ModelConfig) -> list[int]:
    """Every rank count N that divides the attention heads, the KV heads and the MLP's
    intermediate size (ascending; always holds 1)."""
    c = config
    return [n for n in range(1, c.num_kv_heads + 1)
            if c.num_heads % n == 0 and c.num_kv_heads % n == 0 and c.intermediate_size % n == 0]


def check_tp(config: ModelConfig, n: int) -> None:
    """Raise :class:`TPSizeError` (naming the possible N) unless ``n`` ranks can split it."""
    possible = tp_sizes(config)
    if isinstance(n, bool) or not isinstance(n, int) or n not in possible:
        c = config
        raise TPSizeError(
            f"tensor parallelism over {n!r} ranks is not possible for this model: N must divide "
            f"its {c.num_heads} attention heads, {c.num_kv_heads} KV heads and intermediate "
            f"size {c.intermediate_size}; possible N: {', '.join(map(str, possible))}",
            possible=possible)


def rank_config(config: ModelConfig, n: int) -> ModelConfig:
    """The architecture one of ``n`` ranks computes: heads, KV heads, intermediate / n."""
    check_tp(config, n)
    return dataclasses.replace(config, num_heads=config.num_heads // n,
                               num_kv_heads=config.num_kv_heads // n,
                               intermediate_size=config.intermediate_size // n)


def tp_group(host: str, port: int, rank: int, world: int, *, timeout_s: float = 60.0,
             store: dist.Store | None = None) -> dist.ProcessGroup:
    """A gloo process group of ``world`` ranks on a TCPStore at ``host:port`` (rank 0 hosts
    it unless ``store`` is given). Its own group object, not torch's default group, so one
    process may take part in several. Raises RuntimeError when the peers do not all join
    within ``timeout_s``."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=timeout,
                              wait_for_workers=True)
    return dist.ProcessGroupGloo(store, rank, world, timeout)  # type: ignore[return-value]


# -- loading a rank's slice ----------------------------------------------------------------------

def _part(name: str, c: ModelConfig, rank: int, n: int) -> tuple[int, int, int] | str | None:
    """How rank ``rank`` cuts HF tensor ``name``: (dim, lo, hi), "rank0" (a row-parallel
    bias: whole on rank 0, zeros elsewhere) or None (replicated)."""
    parts = name.split(".")
    if len(parts) < 3 or parts[1] != "layers":
        return None
    mod, kind = parts[-2], parts[-1]
    hd = c.head_dim
    if mod == "q_proj":
        w = c.num_heads // n * hd
        return 0, rank * w, (rank + 1) * w
    if mod in ("k_proj", "v_proj"):
        w = c.num_kv_heads // n * hd
        return 0, rank * w, (rank + 1) * w
    if mod in ("gate_proj", "up_proj"):
        w = c.intermediate_size // n
        return 0, rank * w, (rank + 1) * w
    if mod in ("o_proj", "down_proj"):
        if kind == "bias":
            return "rank0"
        w = (c.num_heads * hd if mod == "o_proj" else c.intermediate_size) // n
        return 1, rank * w, (rank + 1) * w
    return None


class _Reader:
    """A rank's tensors: safetensors read by slice (only those rows, or those columns of
    every row); a GGUF tensor is read whole (dequantized) and then cut."""

    def __init__(self, path: Path) -> None:
        from p2pllm.engine.loader import _reader

        self.path = path
        self.gguf = find_gguf(path) is not None
        self.reader = _reader(path)

    def read(self, name: str, cut: tuple[int, int, int] | None, dtype: torch.dtype,
             aliases: dict[str, str] | None) -> torch.Tensor:
        if self.gguf:
            _, t = next(iter(self.reader.tensors([name], aliases, torch.float32)))
            if cut is not None:
                dim, lo, hi = cut
                t = t.narrow(dim, lo, hi - lo)
            return t.to(dtype).contiguous()
        from safetensors import SafetensorError, safe_open

        files = self.reader.files  # type: ignore[union-attr]
        stored = name if name in files or not aliases else aliases.get(name, name)
        if stored not in files:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        try:
            with safe_open(str(files[stored]), framework="pt") as st:
                view = st.get_slice(stored)
                if cut is None:
                    t = view[:]
                elif cut[0] == 0:
                    t = view[cut[1]:cut[2]]
                else:
                    t = view[:, cut[1]:cut[2]]
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"cannot read {files[stored]}: {e}") from e
        return t.to(dtype).contiguous()


def load_tp_rank(path: str | Path, rank: int, world: int, group: dist.ProcessGroup | None, *,
                 dtype: torch.dtype = torch.float32, quant: str | None = None,
                 pack: bool | None = None) -> TPSlice:
    """Rank ``rank`` of ``world``'s slice of a whole model (HF checkpoint dir or GGUF),
    reading only its rows/columns of a safetensors checkpoint. ``quant`` "int8"/"int4":
    the slice's linears quantized after loading (:mod:`.quant`). ``group``: the process
    group :meth:`TPSlice.forward` reduces over (None: set ``model.group`` before running).
    Raises :class:`TPSizeError` before reading any tensor when ``world`` does not fit."""
    from p2pllm.engine.loader import _set_param, model_build, resolve_model

    quant = check_quant(quant)
    path = Path(path)
    if not path.is_dir() and path.suffix.lower() != ".gguf":
        path = resolve_model(str(path))
    config = ModelConfig.from_dir(path)
    rcfg = rank_config(config, world)
    if not 0 <= rank < world:
        raise ModelError(f"rank {rank} is not in [0, {world})")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ModelError(f"dtype {dtype} is not supported (float32, bfloat16, float16)")
    with model_build():
        with torch.device("meta"):
            model = TPSlice(rcfg, config, rank, world, group)
        reader = _Reader(path)
        tied = {"model.embed_tokens.weight": "lm_head.weight"} \
            if config.tie_word_embeddings else None
        by_key: dict[str, list[str]] = {}
        for pname in dict(model.named_parameters(remove_duplicate=False)):
            by_key.setdefault(model.hf_name(pname), []).append(pname)
        with torch.no_grad():
            for key, names in sorted(by_key.items()):
                cut = _part(key, config, rank, world)
                want = tuple(model.get_parameter(names[0]).shape)
                if cut == "rank0":
                    t = reader.read(key, None, dtype, tied)
                    if rank:
                        t = torch.zeros_like(t)
                else:
                    t = reader.read(key, cut if isinstance(cut, tuple) else None, dtype, tied)
                if tuple(t.shape) != want:
                    raise CheckpointError(f"{path}: tensor {key!r} gives {tuple(t.shape)} on "
                                          f"rank {rank}/{world}, the config implies {want}")
                param = nn.Parameter(t, requires_grad=False)
                for pname in names:
                    _set_param(model, pname, param)
        model.tie_weights()
        model.eval()
        fuse_projections(model)
        if quant != "none":
            quantize_linears(model, quant)
        if pack is None:
            pack = can_pack(dtype, "cpu", config.hidden_size)
        if pack:
            pack_linears(model)
    return model


# -- running ---------------------------------------------------------------------------------------

class TPSlice(ModelSlice):
    """All layers, embedding and head of a model, holding rank ``rank``'s slice of every
    layer (built by :func:`load_tp_rank`). ``config`` is the per-rank one
    (:func:`rank_config`), ``full_config`` the model's. ``forward`` is a collective."""

    def __init__(self, config: ModelConfig, full_config: ModelConfig, rank: int, world: int,
                 group: dist.ProcessGroup | None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(config, 0, config.num_layers, True, True, dtype=dtype)
        self.full_config, self.rank, self.world = full_config, rank, world
        self.group = group
        self.comm_s = 0.0  # seconds inside all_reduce since the last reset_stats()
        self.comm_calls = 0

    def reset_stats(self) -> None:
        self.comm_s, self.comm_calls = 0.0, 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in float32 (a bfloat16 partial sum is widened first, so
        the sum is rounded once, as a local matmul's float32 accumulator is)."""
        if self.group is None:
            raise ModelError("this tensor-parallel slice has no process group")
        t0 = time.perf_counter()
        y = x if x.dtype == torch.float32 else x.float()
        y = y.contiguous()
        self.group.allreduce([y]).wait()
        self.comm_s += time.perf_counter() - t0
        self.comm_calls += 1
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                slots: torch.Tensor | None = None, *, last_only: bool = False) -> torch.Tensor:
        """:meth:`ModelSlice.forward` (token ids in, full-vocab logits out, on every rank)
        with the layers split: two all-reduces per layer."""
        h = self._embed(x)
        b, t = h.shape[0], h.shape[1]
        if positions.shape != (b, t) or positions.dtype not in (torch.int64, torch.int32):
            raise ModelError(f"positions must be integers of shape {(b, t)}, got "
                             f"{positions.dtype} {tuple(positions.shape)}")
        step = self._plan(positions, cache, slots, b, t)
        step.fast = fast = not torch.is_grad_enabled()
        reduce = self.all_reduce
        try:
            for mod in self.layers.values():
                layer: Any = mod
                a = layer.self_attn
                if fast:
                    h = h + reduce(a.forward(_norm(layer.input_layernorm, h), step))
                    h = h + reduce(layer.mlp.forward(_norm(layer.post_attention_layernorm, h),
                                                     True))
                else:
                    h = h + reduce(a(layer.input_layernorm(h), step))
                    h = h + reduce(layer.mlp(layer.post_attention_layernorm(h)))
        except BaseException:
            if cache is not None and step.kv is not None:
                cache.abort(step.kv)
            raise
        if cache is not None and step.kv is not None:
            cache.commit(step.kv)
        assert self.norm is not None and self.lm_head is not None
        if last_only:
            h = h[:, -1:]
        h = _norm(self.norm, h) if fast else self.norm(h)
        return _lin(self.lm_head, h, fast)


def tp_generate(model: TPSlice, prompt_ids: Sequence[int], max_tokens: int = 128,
                params: SamplingParams | None = None, *,
                stop_ids: Iterable[int] | None = None,
                on_token: Callable[[int], None] | None = None,
                generator: torch.Generator | None = None) -> GenerationResult:
    """Generate up to ``max_tokens`` ids after ``prompt_ids``: a collective, called on every
    rank with the same arguments; every rank returns the same ids. Rank 0 picks each token
    (greedy, or sampled with ``params``) and broadcasts it. Stops at ``stop_ids`` (default:
    the config's EOS ids), ``max_tokens`` or the model's maximum length."""
    from p2pllm.engine.generate import generation_limits

    params = params or SamplingParams()
    if model.group is None:
        raise ModelError("this tensor-parallel slice has no process group")
    n_prompt = len(prompt_ids)
    stops, max_len, budget = generation_limits(model.config, n_prompt, max_tokens, stop_ids)
    gen = generator if generator is not None else make_generator(params.seed)
    penalise = params.repetition_penalty != 1.0
    argmax = params.greedy and not penalise
    history = torch.empty(n_prompt + budget, dtype=torch.int64)
    history[:n_prompt] = torch.tensor(list(prompt_ids), dtype=torch.int64)
    out: list[int] = []
    stop_reason = "max_tokens" if budget == max_tokens else "length"
    chosen = torch.zeros(1, dtype=torch.int64)
    group, rank = model.group, model.rank

    def pick(logits: torch.Tensor, n_hist: int) -> int:
        if rank == 0:
            tok = greedy_token(logits) if argmax else sample(
                logits, params, gen, history[:n_hist] if penalise else None)[0]
            chosen.fill_(tok)
        group.broadcast(chosen, 0).wait()
        return int(chosen)

    with torch.inference_mode():
        cache = model.new_cache(1, max_len)
        t0 = time.perf_counter()
        logits = model(history[:n_prompt].unsqueeze(0), torch.arange(n_prompt).unsqueeze(0),
                       cache, last_only=True)[0, -1]
        t_prefill = time.perf_counter()
        token = pick(logits, n_prompt)
        t1 = time.perf_counter()
        tok_t = torch.empty(1, 1, dtype=torch.int64)
        pos_t = torch.empty(1, 1, dtype=torch.int64)
        while True:
            out.append(token)
            history[n_prompt + len(out) - 1] = token
            if on_token is not None:
                on_token(token)
            if token in stops or len(out) >= budget:
                stop_reason = "eos" if token in stops else stop_reason
                break
            tok_t.fill_(token)
            pos_t.fill_(n_prompt + len(out) - 1)
            logits = model(tok_t, pos_t, cache, last_only=True)[0, -1]
            token = pick(logits, n_prompt + len(out))
        t2 = time.perf_counter()
    decode_s = t2 - t1
    return GenerationResult(
        text="", prompt_tokens=n_prompt, generated_tokens=len(out), token_ids=out,
        seconds=t2 - t0, tokens_per_s=(len(out) - 1) / decode_s if len(out) > 1 else 0.0,
        time_to_first_token_s=t1 - t0, mode="tp", stop_reason=stop_reason,
        prefill_s=t_prefill - t0)
