"""Bodies of the speculative-decoding messages (protocol.md section 8): build and validate.

Every ``from_meta`` parses what a peer sent and raises :class:`ProtocolError` (BAD_REQUEST or
BAD_TENSOR) for anything malformed, so handlers never see a half-valid message. Every
``to_meta`` returns ``(meta, payload buffers)`` ready for ``Connection.request``.

Greedy windows carry token ids only (a msgpack list in the metadata). Sampling windows add
the draft distribution of each position as a sparse top-k: three tensors in the payload,
``q_len`` (γ,) int32 entries per position, ``q_ids`` (Σk,) int32 and ``q_probs`` (Σk,)
float16, CSR style.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from p2pllm.engine.sampling import SamplingParams
from p2pllm.pillars.speculative.acceptance import SparseDist
from p2pllm.wire.frame import Buffer, ProtocolError
from p2pllm.wire.messages import ErrorCode
from p2pllm.wire.tensors import tensor_meta, unpack_tensors

__all__ = [
    "MAX_PROMPT",
    "MAX_WINDOW",
    "DraftRun",
    "OpenReply",
    "OpenRequest",
    "VerifyReply",
    "VerifyWindow",
    "error_code",
    "params_from_meta",
    "params_to_meta",
]

MAX_WINDOW = 64  # drafted tokens per round, at most
MAX_PROMPT = 1 << 17  # prompt tokens, at most
MAX_TOKENS = 1 << 20  # tokens to generate, at most
MAX_Q_ENTRIES = 1 << 16  # entries of one position's sparse q, at most
Q_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def error_code(code: int) -> ErrorCode:
    """The ErrorCode of a peer's ERROR (INTERNAL for a number this version does not know)."""
    try:
        return ErrorCode(code)
    except ValueError:
        return ErrorCode.INTERNAL


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message)


def _int(meta: Mapping[str, Any], key: str, lo: int, hi: int, default: int | None = None) -> int:
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _bad(f"{key!r} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _ids(meta: Mapping[str, Any], key: str, max_len: int, min_len: int = 0) -> tuple[int, ...]:
    value = meta.get(key)
    if not isinstance(value, list) or not min_len <= len(value) <= max_len:
        raise _bad(f"{key!r} must be a list of {min_len}..{max_len} token ids")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in value):
        raise _bad(f"{key!r} must hold token ids (integers in [0, 2^31))")
    return tuple(value)


def _mass(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value <= 1.0:
        raise _bad(f"'q_mass' must be a number in (0, 1], got {value!r}")
    return float(value)


def _str(meta: Mapping[str, Any], key: str) -> str:
    value = meta.get(key)
    if not isinstance(value, str) or not value:
        raise _bad(f"{key!r} must be a non-empty string")
    return value


# ---------------------------------------------------------------------------------------------
# Sampling parameters
# ---------------------------------------------------------------------------------------------


def params_to_meta(params: SamplingParams) -> dict[str, Any]:
    return {
        "temperature": float(params.temperature),
        "top_k": int(params.top_k),
        "top_p": float(params.top_p),
        "repetition_penalty": float(params.repetition_penalty),
    }


def params_from_meta(raw: Any, seed: int | None = None) -> SamplingParams:
    """SamplingParams from a peer's map; ValueError from the dataclass becomes BAD_REQUEST."""
    if not isinstance(raw, dict):
        raise _bad("'params' must be a map")
    unknown = set(raw) - {"temperature", "top_k", "top_p", "repetition_penalty"}
    if unknown:
        raise _bad(f"unknown sampling parameters {sorted(unknown)}")
    try:
        temperature = float(raw.get("temperature", 0.0))
        top_p = float(raw.get("top_p", 1.0))
        penalty = float(raw.get("repetition_penalty", 1.0))
        top_k = raw.get("top_k", 0)
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=penalty, seed=seed)
    except (TypeError, ValueError) as exc:
        raise _bad(f"bad sampling parameters: {exc}") from exc


def _seed(meta: Mapping[str, Any]) -> int:
    return _int(meta, "seed", 0, 2**63 - 1)


# ---------------------------------------------------------------------------------------------
# SPEC_OPEN: drafter -> verifier
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenRequest:
    """Open a verification session: the verifier prefills ``prompt[:-1]`` into its KV."""

    prompt: tuple[int, ...]
    max_tokens: int
    params: SamplingParams
    seed: int

    def to_meta(self, job: str) -> tuple[dict[str, Any], Sequence[Buffer]]:
        return {
            "job": job,
            "prompt": list(self.prompt),
            "max_tokens": self.max_tokens,
            "params": params_to_meta(self.params),
            "seed": self.seed,
        }, ()

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> OpenRequest:
        seed = _seed(meta)
        return cls(
            prompt=_ids(meta, "prompt", MAX_PROMPT, 1),
            max_tokens=_int(meta, "max_tokens", 1, MAX_TOKENS),
            params=params_from_meta(meta.get("params", {}), seed),
            seed=seed,
        )


@dataclass(frozen=True)
class OpenReply:
    """The session id and what the drafter must know of the target."""

    session: int
    vocab_size: int
    eos: tuple[int, ...]
    limit: int  # positions the session may reach (prompt + generated)
    prefill_s: float

    def to_meta(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "vocab_size": self.vocab_size,
            "eos": list(self.eos),
            "limit": self.limit,
            "prefill_s": self.prefill_s,
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> OpenReply:
        prefill = meta.get("prefill_s", 0.0)
        return cls(
            session=_int(meta, "session", 0, 2**63 - 1),
            vocab_size=_int(meta, "vocab_size", 1, 2**31 - 1),
            eos=_ids(meta, "eos", 64),
            limit=_int(meta, "limit", 1, 2**31 - 1),
            prefill_s=float(prefill) if isinstance(prefill, int | float) else 0.0,
        )


# ---------------------------------------------------------------------------------------------
# SPEC_VERIFY: drafter -> verifier, one round
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class VerifyWindow:
    """One draft window: γ tokens at positions ``start .. start+γ-1``, and in sampling mode
    the sparse draft distribution each was sampled from."""

    session: int
    start: int
    tokens: tuple[int, ...]
    q: tuple[SparseDist, ...] | None = None

    def __post_init__(self) -> None:
        if self.q is not None and len(self.q) != len(self.tokens):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.q)} draft distributions")

    def to_meta(self, job: str) -> tuple[dict[str, Any], Sequence[Buffer]]:
        meta: dict[str, Any] = {
            "job": job,
            "session": self.session,
            "start": self.start,
            "tokens": list(self.tokens),
        }
        if self.q is None:
            return meta, ()
        if not self.q:
            return {**meta, "q": True}, ()
        q_len = torch.tensor([d.k for d in self.q], dtype=torch.int32)
        q_ids = torch.cat([d.ids for d in self.q]).to(torch.int32)
        q_probs = torch.cat([d.probs for d in self.q])
        meta["q"] = True
        return tensor_meta({"q_len": q_len, "q_ids": q_ids, "q_probs": q_probs}, meta)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], payload: memoryview) -> VerifyWindow:
        session = _int(meta, "session", 0, 2**63 - 1)
        start = _int(meta, "start", 1, 2**31 - 1)
        tokens = _ids(meta, "tokens", MAX_WINDOW)
        if not meta.get("q"):
            if payload.nbytes:
                raise _bad("a greedy window carries no payload")
            return cls(session, start, tokens)
        if not tokens:
            if payload.nbytes:
                raise _bad("an empty window carries no payload")
            return cls(session, start, tokens, ())
        tensors = unpack_tensors(meta.get("tensors"), payload)
        if set(tensors) != {"q_len", "q_ids", "q_probs"}:
            raise ProtocolError(ErrorCode.BAD_TENSOR,
                                f"a sampling window carries q_len, q_ids, q_probs; got {sorted(tensors)}")
        q_len, q_ids, q_probs = tensors["q_len"], tensors["q_ids"], tensors["q_probs"]
        gamma = len(tokens)
        if q_len.dtype != torch.int32 or tuple(q_len.shape) != (gamma,):
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"q_len must be int32 ({gamma},)")
        if q_ids.dtype != torch.int32 or q_ids.dim() != 1:
            raise ProtocolError(ErrorCode.BAD_TENSOR, "q_ids must be int32 (Σk,)")
        if q_probs.dtype not in Q_DTYPES or tuple(q_probs.shape) != tuple(q_ids.shape):
            raise ProtocolError(ErrorCode.BAD_TENSOR,
                                "q_probs must be float16, bfloat16 or float32, shaped like q_ids")
        lens = [int(k) for k in q_len.tolist()]
        if any(not 1 <= k <= MAX_Q_ENTRIES for k in lens) or sum(lens) != q_ids.numel():
            raise ProtocolError(ErrorCode.BAD_TENSOR,
                                f"q_len must be in [1, {MAX_Q_ENTRIES}] and sum to len(q_ids)")
        # Own copies: the payload buffer is only valid while the handler runs.
        ids = q_ids.to(torch.int64)
        probs = q_probs.clone()
        dists = []
        offset = 0
        for i, k in enumerate(lens):
            try:
                dists.append(SparseDist(ids=ids[offset:offset + k], probs=probs[offset:offset + k]))
            except ValueError as exc:
                raise _bad(f"draft distribution {i}: {exc}") from exc
            offset += k
        return cls(session, start, tokens, tuple(dists))


@dataclass(frozen=True)
class VerifyReply:
    """``accepted`` leading draft tokens were accepted; ``next`` follows them."""

    accepted: int
    next: int
    seconds: float  # verifier time on this round: queue + forward + decision
    forward_s: float  # the forward pass alone (shared by a batch)
    batch: int  # sessions verified in that forward

    def to_meta(self) -> dict[str, Any]:
        return {"n": self.accepted, "next": self.next, "t": self.seconds, "tf": self.forward_s,
                "b": self.batch}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> VerifyReply:
        t, tf = meta.get("t", 0.0), meta.get("tf", 0.0)
        return cls(
            accepted=_int(meta, "n", 0, MAX_WINDOW),
            next=_int(meta, "next", 0, 2**31 - 1),
            seconds=float(t) if isinstance(t, int | float) and math.isfinite(t) else 0.0,
            forward_s=float(tf) if isinstance(tf, int | float) and math.isfinite(tf) else 0.0,
            batch=_int(meta, "b", 1, 2**31 - 1, 1),
        )


# ---------------------------------------------------------------------------------------------
# SPEC_DRAFT_RUN: coordinator -> drafter
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DraftRun:
    """Run one speculative session end to end against ``verifier`` and stream the tokens."""

    prompt: tuple[int, ...]
    max_tokens: int
    params: SamplingParams
    seed: int
    window: int | None  # fixed draft window, or None for adaptive ("auto")
    verifier: str  # node id of the verifier
    stop: tuple[int, ...] = ()  # extra stop ids (the verifier adds the target's EOS)
    q_top_k: int = 256  # most entries of q sent per position in sampling mode (0 = no cap)
    q_mass: float = 0.999  # ... and no more than it takes to cover this much probability
    overlap: bool | None = None  # look ahead while a window is verified; None: unless the
    # verifier shares this host (then both compete for its cores: measured in bench/spec.py)
    min_window: int = 1
    max_window: int = 16

    def to_meta(self, job: str) -> dict[str, Any]:
        return {
            "job": job,
            "rid": "drafter",
            "prompt": list(self.prompt),
            "max_tokens": self.max_tokens,
            "params": params_to_meta(self.params),
            "seed": self.seed,
            "window": "auto" if self.window is None else self.window,
            "verifier": self.verifier,
            "stop": list(self.stop),
            "q_top_k": self.q_top_k,
            "q_mass": self.q_mass,
            "overlap": "auto" if self.overlap is None else self.overlap,
            "min_window": self.min_window,
            "max_window": self.max_window,
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> DraftRun:
        seed = _seed(meta)
        raw_window = meta.get("window", "auto")
        window = None if raw_window == "auto" else _int(meta, "window", 0, MAX_WINDOW)
        overlap = meta.get("overlap", "auto")
        if overlap == "auto":
            overlap = None
        elif not isinstance(overlap, bool):
            raise _bad("'overlap' must be a boolean or \"auto\"")
        lo = _int(meta, "min_window", 1, MAX_WINDOW, 1)
        hi = _int(meta, "max_window", lo, MAX_WINDOW, max(lo, 16))
        return cls(
            prompt=_ids(meta, "prompt", MAX_PROMPT, 1),
            max_tokens=_int(meta, "max_tokens", 1, MAX_TOKENS),
            params=params_from_meta(meta.get("params", {}), seed),
            seed=seed,
            window=window,
            verifier=_str(meta, "verifier"),
            stop=_ids(meta, "stop", 64) if "stop" in meta else (),
            q_top_k=_int(meta, "q_top_k", 0, MAX_Q_ENTRIES, 256),
            q_mass=_mass(meta.get("q_mass", 0.999)),
            overlap=overlap,
            min_window=lo,
            max_window=hi,
        )
