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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from p2pllm.engine.quant import QUANT_MODES
from p2pllm.engine.sampling import SamplingParams
from p2pllm.pillars.messages import (
    JOB,
    NODE,
    RID,
    SAMPLING,
    SEED,
    TOKEN,
    error_code,
    sampling_from_values,
    sampling_to_meta,
)
from p2pllm.pillars.speculative.acceptance import SparseDist
from p2pllm.wire.frame import Buffer
from p2pllm.wire.messages import ErrorCode
from p2pllm.wire.schema import Body, Bool, Enum, Float, Int, List, Map, OneOf, Str, Tensor
from p2pllm.wire.tensors import COMPUTE_DTYPES, tensor_meta, unpack_tensors

__all__ = [
    "ASSIGN_SPEC",
    "GENERATE_SPEC",
    "MAX_PROMPT",
    "MAX_WINDOW",
    "SPEC_CLOSE",
    "DraftRun",
    "OpenReply",
    "OpenRequest",
    "VerifyReply",
    "VerifyWindow",
    "error_code",
    "params_from_meta",
    "params_to_meta",
    "parse_generate",
]

MAX_WINDOW = 64  # drafted tokens per round, at most
MAX_PROMPT = 1 << 17  # prompt tokens, at most
MAX_TOKENS = 1 << 20  # tokens to generate, at most
MAX_Q_ENTRIES = 1 << 16  # entries of one position's sparse q, at most
MAX_SESSION = 2**63 - 1
Q_DTYPES = ("float16", "bfloat16", "float32")

AUTO = Enum("", ("auto",))


def _seed() -> Int:
    return Int("seed", 0, SEED, doc="the session's random generator")


def _session() -> Int:
    return Int("session", 0, MAX_SESSION, doc="the verifier's session id")


# ---------------------------------------------------------------------------------------------
# Bodies (protocol.md section 8)
# ---------------------------------------------------------------------------------------------

ASSIGN_SPEC = Body("ASSIGN drafter/verifier", [
    Str("model", 1, doc="a model name, a bundled model's name or a checkpoint directory"),
    Enum("dtype", COMPUTE_DTYPES, default="float32", doc="weights"),
    Enum("quant", QUANT_MODES, default="none", doc="weight-only quantized linears (engine/quant.py)"),
    Float("session_timeout", 0.0, lo_open=True, default=120.0,
          doc="verifier: seconds a session may stay idle"),
    List("sources", NODE(""), 0, 64, default=(),
         doc="nodes holding the model whole: fetch the model from them when this node lacks it (13)"),
], doc="ASSIGN params of the drafter and verifier roles")

SPEC_OPEN = Body("SPEC_OPEN", [
    JOB(),
    List("prompt", TOKEN, 1, MAX_PROMPT, doc="the prompt's token ids"),
    Int("max_tokens", 1, MAX_TOKENS, doc="tokens to generate, at most"),
    Map("params", SAMPLING, default={}, doc="sampling; its seed is ignored"),
    _seed(),
])

SPEC_OPEN_REPLY = Body("SPEC_OPEN reply", [
    _session(),
    Int("vocab_size", 1, 2**31 - 1, doc="the target's"),
    List("eos", TOKEN, max_len=64, doc="the target config's end ids"),
    Int("limit", 1, 2**31 - 1, doc="positions the sequence may reach"),
    Float("prefill_s", 0.0, default=0.0, attr="prefill_s", doc="seconds of prefill"),
])

SPEC_VERIFY = Body("SPEC_VERIFY", [
    JOB(),
    _session(),
    Int("start", 1, 2**31 - 1, doc="L, the committed length"),
    List("tokens", TOKEN, max_len=MAX_WINDOW, doc="the drafted window, γ ids"),
    Bool("q", default=False, doc="sampling: the payload carries the draft distributions"),
], tensors=[
    Tensor("q_len", ("int32",), ("γ",), doc="with q and γ > 0: entries of each position"),
    Tensor("q_ids", ("int32",), ("K",), doc="with q and γ > 0: token ids, K = Σ q_len"),
    Tensor("q_probs", Q_DTYPES, ("K",), doc="with q and γ > 0: their probabilities"),
])

SPEC_VERIFY_REPLY = Body("SPEC_VERIFY reply", [
    Int("n", 0, MAX_WINDOW, attr="accepted", doc="draft tokens accepted"),
    Int("next", 0, 2**31 - 1, doc="the token after them"),
    Float("t", 0.0, default=0.0, attr="seconds", doc="seconds on this request"),
    Float("tf", 0.0, default=0.0, attr="forward_s", doc="seconds of the forward pass"),
    Int("b", 1, 2**31 - 1, default=1, attr="batch", doc="windows in that forward"),
])

SPEC_CLOSE = Body("SPEC_CLOSE", [JOB(), _session()])

SPEC_DRAFT_RUN = Body("SPEC_DRAFT_RUN", [
    JOB(),
    RID(),
    List("prompt", TOKEN, 1, MAX_PROMPT, doc="the prompt's token ids"),
    Int("max_tokens", 1, MAX_TOKENS, doc="tokens to generate, at most"),
    Map("params", SAMPLING, default={}, doc="as in SPEC_OPEN"),
    _seed(),
    OneOf("window", (Int("", 0, MAX_WINDOW), AUTO), default="auto",
          doc="a fixed draft window, or adaptive"),
    Str("verifier", 1, 256, doc="the verifier's node id"),
    List("stop", TOKEN, max_len=64, default=(), doc="extra stop ids"),
    Bool("ignore_eos", default=False, doc="stop at no end id (neither eos nor stop)"),
    Int("q_top_k", 0, MAX_Q_ENTRIES, default=256, doc="most entries of q per position, 0 = no cap"),
    Float("q_mass", 0.0, 1.0, lo_open=True, default=0.999, doc="... and no more than this mass"),
    OneOf("overlap", (Bool(""), AUTO), default="auto", doc="the look-ahead (8.2)"),
    Int("min_window", 1, MAX_WINDOW, default=1, doc="adaptive window bounds"),
    Int("max_window", 1, MAX_WINDOW, default=16, doc="at least min_window (default max(16, min_window))"),
])

MAX_PROMPT_TEXT = 1 << 20  # characters of a prompt string (the metadata limit, protocol.md 3)

GENERATE_SPEC = Body("GENERATE spec", [
    Enum("mode", ("spec",), default="spec", doc="the daemon dispatches on it (section 12)"),
    Str("model", 1, doc="the target: a name, a bundled model's name or a checkpoint directory"),
    Str("draft_model", 1, default=None,
        doc="the draft, as model; nil: the target, with draft_quant or draft_dtype"),
    Str("prompt", max_len=MAX_PROMPT_TEXT, default="",
        doc="text, encoded with the target's tokenizer; needed without prompt_ids"),
    List("prompt_ids", TOKEN, 1, MAX_PROMPT, default=None, doc="token ids (prompt is then ignored)"),
    OneOf("draft_tokens", (Int("", 0, MAX_WINDOW), AUTO), default="auto",
          doc="a fixed draft window, or adaptive"),
    Int("max_tokens", 1, MAX_TOKENS, default=128, doc="tokens to generate, at most"),
    Bool("ignore_eos", default=False, doc="no end id stops the reply: max_tokens of them"),
    *(SAMPLING.by_name[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty")),
    Int("seed", 0, SEED, default=None, doc="nil: a random one (the result names it)"),
    Enum("dtype", COMPUTE_DTYPES, default="float32", doc="target weights"),
    Enum("draft_dtype", COMPUTE_DTYPES, default=None, doc="draft weights; nil: dtype"),
    Enum("quant", QUANT_MODES, default="none", doc="the target's linears (engine/quant.py)"),
    Enum("draft_quant", QUANT_MODES, default="none", doc="the draft's linears"),
    Str("verifier", 1, 256, default=None, doc="pin the verifier: a node name or id prefix"),
    Str("drafter", 1, 256, default=None, doc="pin the drafter: same"),
    Int("q_top_k", 0, MAX_Q_ENTRIES, default=256, doc="as in SPEC_DRAFT_RUN"),
    Float("q_mass", 0.0, 1.0, lo_open=True, default=0.999, doc="as in SPEC_DRAFT_RUN"),
    OneOf("overlap", (Bool(""), AUTO), default="auto", doc="the look-ahead (8.2)"),
    Int("min_window", 1, MAX_WINDOW, default=1, doc="adaptive window bounds"),
    Int("max_window", 1, MAX_WINDOW, default=16, doc="at least min_window"),
    Float("session_timeout", 0.0, 86400.0, lo_open=True, default=120.0,
          doc="the verifier's idle limit per session"),
], doc="GENERATE in mode spec (8.5)")


def parse_generate(meta: Mapping[str, Any]) -> dict[str, Any]:
    """GENERATE_SPEC's values checked across fields (a prompt or prompt_ids, min_window ≤
    max_window, a draft_model or a quantized / other-dtype copy of the target), as the coordinator's GenerateSpec takes them: ``params`` the SamplingParams
    (with the seed), ``window`` and ``overlap`` None for "auto", ``draft_dtype`` filled in;
    ProtocolError(BAD_REQUEST) naming the field."""
    v = GENERATE_SPEC.parse(meta)
    if v["prompt_ids"] is None and not v["prompt"]:
        raise GENERATE_SPEC.error("", "needs a prompt or prompt_ids (the prompt is empty)")
    lo, hi = v["min_window"], v["max_window"]
    if lo > hi:
        raise GENERATE_SPEC.error("max_window", f"must be at least min_window ({lo}), got {hi}")
    if v["draft_model"] is None:
        if v["draft_quant"] == "none" and v["draft_dtype"] is None:
            raise GENERATE_SPEC.error("draft_model", "is required, unless draft_quant or "
                                      "draft_dtype makes a copy of the target its draft")
        v["draft_model"] = v["model"]
    params = sampling_from_values({**v, "seed": None}, v["seed"], GENERATE_SPEC)
    window, overlap = v.pop("draft_tokens"), v["overlap"]
    for key in ("mode", "temperature", "top_k", "top_p", "repetition_penalty"):
        del v[key]
    return {**v, "params": params, "window": None if window == "auto" else window,
            "overlap": None if overlap == "auto" else overlap,
            "draft_dtype": v["draft_dtype"] or v["dtype"]}


# ---------------------------------------------------------------------------------------------
# Sampling parameters
# ---------------------------------------------------------------------------------------------


def params_to_meta(params: SamplingParams) -> dict[str, Any]:
    return sampling_to_meta(params, seed=False)


def params_from_meta(raw: Any, seed: int | None = None) -> SamplingParams:
    """SamplingParams from a peer's map (the ``sampling`` body); BAD_REQUEST when malformed."""
    return sampling_from_values(SAMPLING.parse(raw), seed)


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
        return SPEC_OPEN.to_meta({"job": job, "prompt": self.prompt, "max_tokens": self.max_tokens,
                                  "params": params_to_meta(self.params), "seed": self.seed}), ()

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> OpenRequest:
        v = SPEC_OPEN.parse(meta)
        return cls(prompt=v["prompt"], max_tokens=v["max_tokens"],
                   params=sampling_from_values(v["params"], v["seed"], SPEC_OPEN), seed=v["seed"])


@dataclass(frozen=True)
class OpenReply:
    """The session id and what the drafter must know of the target."""

    session: int
    vocab_size: int
    eos: tuple[int, ...]
    limit: int  # positions the session may reach (prompt + generated)
    prefill_s: float

    def to_meta(self) -> dict[str, Any]:
        return SPEC_OPEN_REPLY.to_meta(self)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> OpenReply:
        return cls(**SPEC_OPEN_REPLY.parse(meta))


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
        meta = SPEC_VERIFY.to_meta({"job": job, "session": self.session, "start": self.start,
                                    "tokens": self.tokens, "q": None if self.q is None else True})
        if not self.q:
            return meta, ()
        q_len = torch.tensor([d.k for d in self.q], dtype=torch.int32)
        q_ids = torch.cat([d.ids for d in self.q]).to(torch.int32)
        q_probs = torch.cat([d.probs for d in self.q])
        return tensor_meta({"q_len": q_len, "q_ids": q_ids, "q_probs": q_probs}, meta)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], payload: memoryview) -> VerifyWindow:
        v = SPEC_VERIFY.parse(meta)
        session, start, tokens = v["session"], v["start"], v["tokens"]
        if not v["q"]:
            if payload.nbytes:
                raise SPEC_VERIFY.error("", "a greedy window carries no payload")
            return cls(session, start, tokens)
        if not tokens:
            if payload.nbytes:
                raise SPEC_VERIFY.error("", "an empty window carries no payload")
            return cls(session, start, tokens, ())
        SPEC_VERIFY.check_tensors(meta, payload.nbytes, {"γ": len(tokens)})
        tensors = unpack_tensors(meta.get("tensors"), payload)
        q_len, q_ids, q_probs = tensors["q_len"], tensors["q_ids"], tensors["q_probs"]
        lens = [int(k) for k in q_len.tolist()]
        if any(not 1 <= k <= MAX_Q_ENTRIES for k in lens) or sum(lens) != q_ids.numel():
            raise SPEC_VERIFY.error("tensor 'q_len'", f"must be in [1, {MAX_Q_ENTRIES}] and sum "
                                    f"to len(q_ids)", ErrorCode.BAD_TENSOR)
        # Own copies: the payload buffer is only valid while the handler runs.
        ids = q_ids.to(torch.int64)
        probs = q_probs.clone()
        dists = []
        offset = 0
        for i, k in enumerate(lens):
            try:
                dists.append(SparseDist(ids=ids[offset:offset + k], probs=probs[offset:offset + k]))
            except ValueError as exc:
                raise SPEC_VERIFY.error(f"draft distribution {i}:", str(exc)) from exc
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
        return SPEC_VERIFY_REPLY.to_meta(self)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> VerifyReply:
        return cls(**SPEC_VERIFY_REPLY.parse(meta))


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
    overlap: bool | None = None  # look ahead while a window is verified; None: the drafter
    # chooses (off when it is the verifier's daemon, else measured: lookahead.py)
    min_window: int = 1
    max_window: int = 16
    ignore_eos: bool = False  # no end id stops the session (neither the target's nor stop)

    def to_meta(self, job: str) -> dict[str, Any]:
        return SPEC_DRAFT_RUN.to_meta({
            "job": job, "rid": "drafter", "prompt": self.prompt, "max_tokens": self.max_tokens,
            "params": params_to_meta(self.params), "seed": self.seed,
            "window": "auto" if self.window is None else self.window, "verifier": self.verifier,
            "stop": self.stop, "ignore_eos": True if self.ignore_eos else None,
            "q_top_k": self.q_top_k, "q_mass": self.q_mass,
            "overlap": "auto" if self.overlap is None else self.overlap,
            "min_window": self.min_window, "max_window": self.max_window,
        })

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> DraftRun:
        v = SPEC_DRAFT_RUN.parse(meta)
        lo = v["min_window"]
        hi = v["max_window"] if meta.get("max_window") is not None else max(lo, 16)
        if hi < lo:
            raise SPEC_DRAFT_RUN.error("max_window", f"must be at least min_window ({lo}), got {hi}")
        return cls(
            prompt=v["prompt"],
            max_tokens=v["max_tokens"],
            params=sampling_from_values(v["params"], v["seed"], SPEC_DRAFT_RUN),
            seed=v["seed"],
            window=None if v["window"] == "auto" else v["window"],
            verifier=v["verifier"],
            stop=v["stop"],
            ignore_eos=v["ignore_eos"],
            q_top_k=v["q_top_k"],
            q_mass=v["q_mass"],
            overlap=None if v["overlap"] == "auto" else v["overlap"],
            min_window=lo,
            max_window=hi,
        )
