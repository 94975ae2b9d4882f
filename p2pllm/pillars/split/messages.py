"""Bodies of the split-inference messages (SHARD_*), validated as they arrive.

Each is a small frozen dataclass built by ``from_meta`` (which raises
``ProtocolError(BAD_REQUEST)`` naming the bad field) and turned back into metadata by
``to_meta``. Byte-level layout: protocol.md section 9.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from p2pllm.engine.sampling import SamplingParams
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode

__all__ = [
    "DTYPES",
    "MAX_SESSION_ID",
    "Hop",
    "OpenSession",
    "ShardParams",
    "forward_meta",
    "parse_forward",
    "sampling_from_meta",
    "sampling_to_meta",
]

# Compute and wire dtypes a shard accepts, by their wire names.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
MAX_SESSION_ID = 64
MAX_SESSIONS = 256


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message)


def _int(m: Mapping[str, Any], key: str, lo: int, hi: int | None = None,
         default: int | None = None) -> int:
    v = m.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise _bad(f"{key} must be an integer {rng}, got {v!r}")
    return v


def _num(m: Mapping[str, Any], key: str, lo: float, default: float) -> float:
    v = m.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < lo:
        raise _bad(f"{key} must be a number >= {lo}, got {v!r}")
    return float(v)


def _str(m: Mapping[str, Any], key: str, max_len: int = 4096) -> str:
    v = m.get(key)
    if not isinstance(v, str) or not 0 < len(v) <= max_len:
        raise _bad(f"{key} must be a non-empty string of at most {max_len} characters")
    return v


def _dtype(m: Mapping[str, Any], key: str) -> str:
    v = m.get(key, "float32")
    if v not in DTYPES:
        raise _bad(f"{key} must be one of {', '.join(DTYPES)}, got {v!r}")
    return str(v)


def _ids(v: Any, key: str) -> tuple[int, ...]:
    if not isinstance(v, list | tuple) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v):
        raise _bad(f"{key} must be a list of non-negative integers")
    return tuple(v)


@dataclass(frozen=True)
class Hop:
    """Where a shard sends its output: a node and the rid of the shard role there."""

    node: str
    rid: str

    @classmethod
    def from_meta(cls, v: Any, key: str) -> Hop | None:
        if v is None:
            return None
        if not isinstance(v, Mapping):
            raise _bad(f"{key} must be a map {{node, rid}} or nil")
        return cls(_str(v, "node", 256), _str(v, "rid", 256))

    def to_meta(self) -> dict[str, str]:
        return {"node": self.node, "rid": self.rid}


@dataclass(frozen=True)
class ShardParams:
    """ASSIGN params of a shard role: which layers of which model, and where outputs go."""

    model: str  # a name under the member's models dir, or a path it can read
    start: int
    end: int
    num_layers: int  # of the whole model: the member checks its copy agrees
    index: int = 0
    count: int = 1
    dtype: str = "float32"  # compute dtype of the weights and KV cache
    wire_dtype: str = "float32"  # dtype of hidden states between shards
    next: Hop | None = None  # the next shard (None on the last one)
    first: Hop | None = None  # the last shard sends sampled tokens back here (the ring)
    max_sessions: int = 8  # KV cache rows
    max_len: int = 2048  # positions per session
    session_idle_s: float = 120.0  # a session silent this long is freed
    batch_decode: bool = False  # run the decode steps of several sessions in one forward
    stage_bytes: int = 0  # what the planner charged this stage (checked against the budget)
    hidden_size: int = 0  # fingerprint of the model the plan was made for (0 = unchecked)
    vocab_size: int = 0

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.num_layers

    @property
    def layers(self) -> str:
        return f"{self.start}-{self.end}"

    @classmethod
    def from_meta(cls, m: Mapping[str, Any]) -> ShardParams:
        num_layers = _int(m, "num_layers", 1)
        start = _int(m, "start", 0, num_layers - 1)
        end = _int(m, "end", start + 1, num_layers)
        count = _int(m, "count", 1, 4096, 1)
        p = cls(
            model=_str(m, "model"),
            start=start,
            end=end,
            num_layers=num_layers,
            index=_int(m, "index", 0, count - 1, 0),
            count=count,
            dtype=_dtype(m, "dtype"),
            wire_dtype=_dtype(m, "wire_dtype"),
            next=Hop.from_meta(m.get("next"), "next"),
            first=Hop.from_meta(m.get("first"), "first"),
            max_sessions=_int(m, "max_sessions", 1, MAX_SESSIONS, 8),
            max_len=_int(m, "max_len", 1, 1 << 20, 2048),
            session_idle_s=_num(m, "session_idle_s", 0.1, 120.0),
            batch_decode=bool(m.get("batch_decode", False)),
            stage_bytes=_int(m, "stage_bytes", 0, None, 0),
            hidden_size=_int(m, "hidden_size", 0, None, 0),
            vocab_size=_int(m, "vocab_size", 0, None, 0),
        )
        if p.is_last and p.first is None:
            raise _bad("the last shard needs 'first': where sampled tokens go")
        if not p.is_last and p.next is None:
            raise _bad(f"shard {p.layers} of {num_layers} layers needs 'next': where hidden "
                       f"states go")
        return p

    def to_meta(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: getattr(self, k) for k in (
                "model", "start", "end", "num_layers", "index", "count", "dtype", "wire_dtype",
                "max_sessions", "max_len", "session_idle_s", "batch_decode", "stage_bytes",
                "hidden_size", "vocab_size")
        }
        out["next"] = self.next.to_meta() if self.next else None
        out["first"] = self.first.to_meta() if self.first else None
        return out


def sampling_to_meta(p: SamplingParams) -> dict[str, Any]:
    return {"temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p,
            "repetition_penalty": p.repetition_penalty, "seed": p.seed}


def sampling_from_meta(v: Any) -> SamplingParams:
    if v is None:
        return SamplingParams()
    if not isinstance(v, Mapping):
        raise _bad("sampling must be a map")
    try:
        return SamplingParams(
            temperature=float(v.get("temperature", 0.0) or 0.0),
            top_k=v.get("top_k", 0) or 0,
            top_p=float(v.get("top_p", 1.0) if v.get("top_p") is not None else 1.0),
            repetition_penalty=float(v.get("repetition_penalty", 1.0) or 1.0),
            seed=v.get("seed"),
        )
    except (TypeError, ValueError) as exc:
        raise _bad(f"bad sampling parameters: {exc}") from None


@dataclass(frozen=True)
class OpenSession:
    """SHARD_OPEN: a session on one shard. The sampling fields matter on the last shard only."""

    session: str
    max_len: int  # positions the session may fill (prompt + generated tokens - 1)
    prompt_len: int = 0
    max_new: int = 0  # tokens the last shard generates at most
    stop_ids: tuple[int, ...] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prompt_ids: tuple[int, ...] | None = None  # for the repetition penalty only

    @classmethod
    def from_meta(cls, m: Mapping[str, Any], *, last: bool) -> OpenSession:
        max_len = _int(m, "max_len", 1, 1 << 20)
        out = cls(session=_str(m, "session", MAX_SESSION_ID), max_len=max_len)
        if not last:
            return out
        prompt_len = _int(m, "prompt_len", 1, max_len)
        prompt_ids = m.get("prompt_ids")
        ids = _ids(prompt_ids, "prompt_ids") if prompt_ids is not None else None
        if ids is not None and len(ids) != prompt_len:
            raise _bad(f"prompt_ids has {len(ids)} ids but prompt_len is {prompt_len}")
        sampling = sampling_from_meta(m.get("sampling"))
        if sampling.repetition_penalty != 1.0 and ids is None:
            raise _bad("a repetition penalty needs prompt_ids")
        max_new = _int(m, "max_new", 1)
        if prompt_len + max_new - 1 > max_len:
            raise _bad(f"prompt_len {prompt_len} + max_new {max_new} - 1 exceeds max_len {max_len}")
        return cls(session=out.session, max_len=max_len, prompt_len=prompt_len, max_new=max_new,
                   stop_ids=_ids(m.get("stop_ids", []), "stop_ids"), sampling=sampling,
                   prompt_ids=ids)

    def to_meta(self) -> dict[str, Any]:
        out: dict[str, Any] = {"session": self.session, "max_len": self.max_len}
        if self.max_new:
            out.update(prompt_len=self.prompt_len, max_new=self.max_new,
                       stop_ids=list(self.stop_ids), sampling=sampling_to_meta(self.sampling))
            if self.prompt_ids is not None:
                out["prompt_ids"] = list(self.prompt_ids)
        return out


def forward_meta(job: str, hop: Hop, session: str, pos: int, sample: bool) -> dict[str, Any]:
    """SHARD_FORWARD metadata (the "tensors" entry is added by the sender)."""
    return {"job": job, "rid": hop.rid, "session": session, "pos": pos, "sample": sample}


def parse_forward(m: Mapping[str, Any]) -> tuple[str, int, bool]:
    """(session, pos, sample) of a SHARD_FORWARD."""
    return _str(m, "session", MAX_SESSION_ID), _int(m, "pos", 0), bool(m.get("sample", False))
