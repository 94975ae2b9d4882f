"""What a shard computes, without any I/O: its model slice, a KV cache row per session (the
engine's block cache: rows take blocks as positions arrive and give them back when they
leave), the check of what a peer sent, one forward over one or several sessions, and the
sampler of the last shard. The shard role (shard.py) runs :meth:`ShardEngine.run` in a
worker thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from p2pllm.engine.errors import ModelError
from p2pllm.engine.kv_cache import (
    DEFAULT_BLOCK_SIZE,
    GROW_CHUNK_BYTES,
    KVBudget,
    grow_chunk_tokens,
)
from p2pllm.engine.model import ModelSlice
from p2pllm.engine.sampling import SamplingParams, make_generator, sample
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode

__all__ = ["Sampler", "ShardEngine", "Step", "slice_param_count"]


@dataclass(eq=False)
class Step:
    """One session's input to one forward: T new positions starting at ``pos``."""

    row: int
    pos: int
    x: torch.Tensor  # ids (T,) on the first shard, hidden states (T, H) elsewhere
    sample: bool  # the last shard samples after this step

    @property
    def tokens(self) -> int:
        return int(self.x.shape[0])


class Sampler:
    """The last shard's sampling state for one session (what generate_ids keeps locally)."""

    def __init__(self, params: SamplingParams, prompt_len: int, max_new: int,
                 stop_ids: Sequence[int], prompt_ids: Sequence[int] | None = None) -> None:
        self.params = params
        self.prompt_len = prompt_len
        self.max_new = max_new
        self.stops = frozenset(stop_ids)
        self.generator = make_generator(params.seed)
        self.penalise = params.repetition_penalty != 1.0
        # greedy without a penalty: the first maximum, as sample() draws it, in one op
        # (sample() also builds the one-hot distribution, which the shard never reads)
        self.argmax = params.greedy and not self.penalise
        self.history: torch.Tensor | None = None
        if self.penalise:
            if prompt_ids is None:
                raise ValueError("a repetition penalty needs the prompt ids")
            self.history = torch.empty(prompt_len + max_new, dtype=torch.int64)
            self.history[:prompt_len] = torch.tensor(list(prompt_ids), dtype=torch.int64)
        self.generated = 0

    def next(self, logits: torch.Tensor) -> tuple[int, str | None]:
        """Draw the next token from (V,) logits -> (token, why generation ends or None)."""
        n = self.prompt_len + self.generated
        if self.argmax:
            token = int((logits if logits.dtype == torch.float32 else logits.float()).argmax())
        else:
            hist = self.history[:n] if self.history is not None else None
            token, _ = sample(logits, self.params, self.generator, hist)
        if self.history is not None:
            self.history[n] = token
        self.generated += 1
        if token in self.stops:
            return token, "eos"
        if self.generated >= self.max_new:
            return token, "max_tokens"
        return token, None

    @property
    def next_pos(self) -> int:
        """Position of the token just drawn (where it is fed back)."""
        return self.prompt_len + self.generated - 1


class ShardEngine:
    """A model slice and its session cache; :meth:`run` is the only heavy call."""

    def __init__(self, model: ModelSlice, *, rows: int, max_len: int,
                 wire_dtype: torch.dtype = torch.float32,
                 chunk_bytes: int = GROW_CHUNK_BYTES) -> None:
        self.model = model
        self.config = model.config
        self.wire_dtype = wire_dtype
        c = model.config
        self.max_len = min(max_len, c.max_position_embeddings)
        self.max_rows = rows
        # Room for every row at full length, so a session admitted by take_row never finds
        # the pool empty; blocks are taken only as positions arrive, from small storage
        # chunks taken from ``kv_budget`` (the role sets its limit: the daemon's memory
        # budget), so the memory held follows the tokens held.
        bs = DEFAULT_BLOCK_SIZE
        per_position = ((model.end - model.start) * 2 * c.num_kv_heads * c.head_dim
                        * model.dtype.itemsize)
        self.cache = model.new_cache(0, self.max_len,
                                     max_total_tokens=rows * -(-self.max_len // bs) * bs,
                                     chunk_tokens=grow_chunk_tokens(per_position, self.max_len,
                                                                    chunk_bytes=chunk_bytes))
        self.kv_budget = KVBudget()
        self.cache.budget = self.kv_budget
        # What one-session steps reuse (see run(): each torch call on a step's path costs
        # ~20 us right after a forward has streamed the weights through the caches)
        self.device = model.device
        self._on_cpu = self.device.type == "cpu"
        self._slot_of: dict[int, torch.Tensor] = {}  # row -> its (1,) slots tensor
        self._pos1 = torch.zeros(1, 1, dtype=torch.int64, device=self.device)
        self._input = ("ids", "int64", 8) if model.has_embed else (
            "hidden", _name(wire_dtype), wire_dtype.itemsize)

    # -- rows ---------------------------------------------------------------------------------

    @property
    def rows_free(self) -> int:
        return self.max_rows - self.cache.batch

    def take_row(self) -> int | None:
        if self.cache.batch >= self.max_rows:
            return None
        return self.cache.add_row()

    def give_row(self, row: int) -> None:
        """Free a session's row and its blocks; the other rows are not touched."""
        self.cache.remove_row(row)

    # -- input from a peer ----------------------------------------------------------------------

    def check_input(self, tensors: dict[str, torch.Tensor], pos: int, limit: int) -> torch.Tensor:
        """The step input a peer sent, checked: ids (T,) on the first shard, hidden states
        (T, hidden) of the wire dtype elsewhere; positions [pos, pos + T) within ``limit``.
        Raises ProtocolError(BAD_TENSOR / BAD_REQUEST). Returns a copy it may keep."""
        m, c = self.model, self.config
        if m.has_embed:
            x = tensors.get("ids")
            if x is None or set(tensors) != {"ids"}:
                raise ProtocolError(ErrorCode.BAD_TENSOR, f"the first shard takes one tensor "
                                    f"'ids', got {sorted(tensors)}")
            if x.dim() != 1 or x.dtype not in (torch.int64, torch.int32) or x.shape[0] < 1:
                raise ProtocolError(ErrorCode.BAD_TENSOR, f"ids must be int64 (T,) with T >= 1, "
                                    f"got {x.dtype} {tuple(x.shape)}")
            lo, hi = torch.aminmax(x)
            if int(lo) < 0 or int(hi) >= c.vocab_size:
                raise ProtocolError(ErrorCode.BAD_TENSOR,
                                    f"token id out of range [0, {c.vocab_size})")
            x = x.to(torch.int64, copy=True)
        else:
            x = tensors.get("hidden")
            if x is None or set(tensors) != {"hidden"}:
                raise ProtocolError(ErrorCode.BAD_TENSOR, f"shard at layer {m.start} takes one "
                                    f"tensor 'hidden', got {sorted(tensors)}")
            want = (x.shape[0] if x.dim() == 2 else "T", c.hidden_size)
            if x.dim() != 2 or x.shape[1] != c.hidden_size or x.shape[0] < 1:
                raise ProtocolError(ErrorCode.BAD_TENSOR, f"hidden states must be (T, "
                                    f"{c.hidden_size}), got {tuple(x.shape)} (expected {want})")
            if x.dtype != self.wire_dtype:
                raise ProtocolError(ErrorCode.BAD_TENSOR, f"hidden states must be "
                                    f"{_name(self.wire_dtype)} (the job's wire dtype), got "
                                    f"{_name(x.dtype)}")
            x = x.clone()
        if pos + x.shape[0] > limit:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"positions {pos}..{pos + x.shape[0]} "
                                f"exceed the session's length {limit}")
        return x

    def take_input(self, descs: Any, payload: memoryview, pos: int,
                   limit: int) -> torch.Tensor | None:
        """:meth:`check_input` of the usual step, straight from a frame: when ``descs`` is
        the one tensor this shard takes, of the wire dtype (int64 ids), a well-formed shape
        and exactly the payload's bytes, within ``limit``, the tensor :meth:`check_input`
        would return, built from a copy of the payload in one torch call (unpacking views,
        then checking and copying takes ~8, each ~20 us with cold caches). None for anything
        else: the caller then takes the full path, which names what is wrong."""
        if (type(descs) is not list or len(descs) != 1 or type(payload) is not memoryview
                or payload.format != "B" or not payload.c_contiguous):
            return None
        d = descs[0]
        name, dtype, itemsize = self._input
        if type(d) is not dict or d.get("name") != name or d.get("dtype") != dtype:
            return None
        shape = d.get("shape")
        if type(shape) is not list or not shape or type(shape[0]) is not int:
            return None
        t = shape[0]
        if t < 1 or pos + t > limit:
            return None
        if name == "ids":
            if len(shape) != 1 or payload.nbytes != t * 8:
                return None
            ids = payload.cast("q")
            if min(ids) < 0 or max(ids) >= self.config.vocab_size:
                return None
            return torch.frombuffer(bytearray(payload), dtype=torch.int64)
        h = self.config.hidden_size
        if len(shape) != 2 or shape[1] != h or type(shape[1]) is not int \
                or payload.nbytes != t * h * itemsize:
            return None
        return torch.frombuffer(bytearray(payload), dtype=self.wire_dtype).view(t, h)

    # -- the forward ----------------------------------------------------------------------------

    def run(self, steps: Sequence[Step]) -> list[torch.Tensor]:
        """One forward over ``steps`` (one session, or several one-token steps).

        Returns per step: (V,) float logits of its last position on the last shard, else its
        hidden states (T, hidden) in the wire dtype, ready to send.
        """
        m = self.model
        dev = self.device
        with torch.inference_mode():
            if len(steps) == 1:  # the fewest torch calls (see __init__)
                s = steps[0]
                x = (s.x if self._on_cpu and s.x.device.type == "cpu" else s.x.to(dev)).unsqueeze(0)
                n = s.tokens
                if n == 1:
                    positions = self._pos1
                    positions.fill_(s.pos)
                else:
                    positions = torch.arange(s.pos, s.pos + n, device=dev).unsqueeze(0)
                slots = self._slot_of.get(s.row)
                if slots is None:
                    slots = self._slot_of[s.row] = torch.tensor([s.row], device=dev)
                out = m(x, positions, self.cache, slots=slots, last_only=True)
                if m.has_head:
                    o = out[0, -1]  # (V,), as float32 on the CPU
                    if o.dtype != torch.float32:
                        o = o.float()
                    return [o if self._on_cpu else o.cpu()]
                o = out[0]  # (T, H)
                if o.dtype != self.wire_dtype:
                    o = o.to(self.wire_dtype)
                return [o if self._on_cpu else o.cpu()]
            if any(s.tokens != 1 for s in steps):
                raise ModelError("only one-token steps are batched")
            rows = [s.row for s in steps]
            x = torch.stack([s.x for s in steps]).to(dev)  # (B, 1) or (B, 1, H)
            positions = torch.tensor([[s.pos] for s in steps], device=dev)
            slots = torch.tensor(rows, device=dev)
            out = m(x, positions, self.cache, slots=slots, last_only=True)
            if m.has_head:
                return [out[i, -1].float().cpu() for i in range(len(steps))]  # (V,)
            if out.dtype != self.wire_dtype:
                out = out.to(self.wire_dtype)
            return [out[i].cpu() for i in range(len(steps))]  # (T, H)


def slice_param_count(model: ModelSlice) -> int:
    """Distinct parameters a slice holds (a tied embedding/head once)."""
    return model.num_parameters()


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
