"""Bodies of the split-inference messages (SHARD_*), validated as they arrive.

Each is a small frozen dataclass built by ``from_meta`` (which raises
``ProtocolError(BAD_REQUEST)`` naming the bad field) and turned back into metadata by
``to_meta``. Byte-level layout: protocol.md section 9.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from p2pllm.engine.quant import QUANT_MODES
from p2pllm.engine.sampling import SamplingParams
from p2pllm.pillars.messages import (
    JOB,
    MAX_TOKEN,
    NODE,
    RID,
    SAMPLING,
    TOKEN,
    sampling_from_values,
)
from p2pllm.pillars.messages import sampling_to_meta as _sampling_to_meta
from p2pllm.wire.schema import Body, Bool, Enum, Float, Int, List, Map, Str, Tensor
from p2pllm.wire.tensors import COMPUTE_DTYPES

__all__ = [
    "GENERATE_SPLIT",
    "MAX_SESSION_ID",
    "SHARD_CLOSE",
    "SHARD_FORWARD",
    "SHARD_RESULT",
    "Hop",
    "OpenSession",
    "ShardParams",
    "forward_meta",
    "parse_close",
    "parse_forward",
    "parse_generate",
    "parse_result",
    "sampling_from_meta",
    "sampling_to_meta",
]

MAX_SESSION_ID = 64
MAX_SESSIONS = 256
MAX_LEN = 1 << 20


def _session() -> Str:
    return Str("session", 1, MAX_SESSION_ID, doc="the coordinator's session id")


# ---------------------------------------------------------------------------------------------
# Bodies (protocol.md section 9)
# ---------------------------------------------------------------------------------------------

HOP = Body("hop", [
    Str("node", 1, 256, doc="node id"),
    Str("rid", 1, 256, doc="the shard role's id there"),
], doc="where a shard sends its output")

ASSIGN_SHARD = Body("ASSIGN shard", [
    Str("model", 1, doc="a name under that node's --models-dir, or a path it can read"),
    Int("start", 0, doc="first layer"),
    Int("end", 1, doc="end of the layers (exclusive)"),
    Int("num_layers", 1, doc="of the whole model"),
    Int("index", 0, default=0, doc="k"),
    Int("count", 1, 4096, default=1, doc="K"),
    Enum("dtype", COMPUTE_DTYPES, default="float32", doc="weights and KV cache"),
    Enum("quant", QUANT_MODES, default="none", doc="weight-only quantized linears (engine/quant.py)"),
    Enum("wire_dtype", COMPUTE_DTYPES, default="float32", doc="hidden states between shards"),
    Map("next", HOP, default=None, doc="the next shard (nil only on the last)"),
    Map("first", HOP, default=None, doc="the last shard only: where sampled tokens go"),
    Int("max_sessions", 1, MAX_SESSIONS, default=8, doc="KV rows"),
    Int("max_len", 1, MAX_LEN, default=2048, doc="positions a session may use"),
    Float("session_idle_s", 0.1, default=120.0, doc="a session silent this long is freed"),
    Bool("batch_decode", default=False, doc="decode several sessions in one forward"),
    Int("stage_bytes", 0, default=0, doc="what the planner charged this stage"),
    Int("hidden_size", 0, default=0, doc="the plan's model (0 = unchecked)"),
    Int("vocab_size", 0, default=0, doc="the plan's model (0 = unchecked)"),
    List("sources", NODE(""), 0, 64, default=(),
         doc="nodes holding the model whole: fetch the slice from them when this node lacks it (13)"),
], doc="ASSIGN params of a shard role")

SHARD_OPEN = Body("SHARD_OPEN", [
    JOB(),
    RID(),
    _session(),
    Int("max_len", 1, MAX_LEN, doc="positions the session may fill"),
    Int("prompt_len", 1, MAX_LEN, default=None, doc="last shard: required"),
    Int("max_new", 1, MAX_LEN, default=None, doc="last shard: required; tokens to generate"),
    List("stop_ids", TOKEN, max_len=4096, default=(), doc="last shard"),
    Map("sampling", SAMPLING, default={}, doc="last shard"),
    List("prompt_ids", TOKEN, max_len=MAX_LEN, default=None,
         doc="last shard, only with a repetition penalty"),
])

SHARD_FORWARD = Body("SHARD_FORWARD", [
    JOB(),
    RID(),
    _session(),
    Int("pos", 0, doc="position of the first of the T tokens"),
    Bool("sample", default=False, doc="the last shard samples after this step"),
], tensors=[
    Tensor("ids", ("int64", "int32"), ("T",), required=False, doc="to shard 0"),
    Tensor("hidden", COMPUTE_DTYPES, ("T", "H"), required=False, doc="to shard k > 0"),
])

SHARD_RESULT = Body("SHARD_RESULT", [
    _session(),
    Int("token", 0, MAX_TOKEN, doc="the sampled token"),
    Int("step", 0, doc="tokens the session has generated"),
], doc="a partial answer of the last shard's SHARD_OPEN stream")

SHARD_CLOSE = Body("SHARD_CLOSE", [JOB(), RID(), _session()])

DEFAULT_KEEP_ALIVE = 30.0  # seconds an idle pipeline keeps its shards loaded
DEFAULT_MAX_SESSIONS = 8  # sessions in flight on one pipeline (KV cache rows per shard)
PREFILL_CHUNK = 512  # prompt tokens per SHARD_FORWARD
MAX_PROMPT_TEXT = 1 << 20  # characters of a prompt string (the metadata limit, protocol.md 3)

GENERATE_SPLIT = Body("GENERATE split", [
    Enum("mode", ("split",), default="split", doc="the daemon dispatches on it (section 12)"),
    Str("model", 1, doc="name or path; the coordinator reads its config and tokenizer"),
    Str("prompt", 1, MAX_PROMPT_TEXT, default=None, doc="text; needed without prompt_ids"),
    List("prompt_ids", TOKEN, 1, MAX_LEN, default=None, doc="token ids (prompt is then ignored)"),
    Int("max_tokens", 1, MAX_LEN, default=128, doc="tokens to generate, at most"),
    Bool("ignore_eos", default=False, doc="no end id stops the reply: max_tokens of them"),
    *(SAMPLING.by_name[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty",
                                    "seed")),
    Enum("dtype", (*COMPUTE_DTYPES, "auto"), default="float32",
         doc='weights and KV cache ("auto": float32)'),
    Enum("wire_dtype", (*COMPUTE_DTYPES, "auto"), default="float32",
         doc='hidden states between shards ("auto": float32)'),
    Enum("quant", QUANT_MODES, default="none", doc="every shard's linears (engine/quant.py)"),
    Int("shards", 1, 4096, default=None, doc="nil: every candidate, at most one per layer"),
    Str("layers", 1, default=None, doc='half-open ranges in pipeline order, "0-7,7-16"'),
    Float("keep_alive", 0.0, 86400.0, default=DEFAULT_KEEP_ALIVE,
          doc="seconds an idle pipeline stays loaded (0: release at once)"),
    Bool("batch_decode", default=False, doc="decode several sessions in one forward"),
    Int("retries", 0, 16, default=1, doc="replays after a lost shard"),
    Int("max_sessions", 1, MAX_SESSIONS, default=DEFAULT_MAX_SESSIONS,
        doc="sessions in flight on the pipeline"),
    Int("prefill_chunk", 1, 1 << 16, default=PREFILL_CHUNK, doc="prompt tokens per SHARD_FORWARD"),
], doc="GENERATE in mode split (9.5)")


def parse_generate(m: Mapping[str, Any]) -> dict[str, Any]:
    """GENERATE_SPLIT's values checked across fields (a prompt or prompt_ids, non-blank
    layers), as the coordinator's SplitRequest takes them: ``sampling`` the SamplingParams,
    "auto" dtypes as float32; ProtocolError(BAD_REQUEST) naming the field."""
    v = GENERATE_SPLIT.parse(m)
    if v["prompt_ids"] is None and v["prompt"] is None:
        raise GENERATE_SPLIT.error("", "split generation needs a prompt (prompt or prompt_ids)")
    layers = v["layers"]
    if layers is not None and not layers.strip():
        raise GENERATE_SPLIT.error("layers", "must be ranges such as '0-7,7-16'")
    sampling = sampling_from_values(v, body=GENERATE_SPLIT)
    for key in ("mode", *SAMPLING.by_name):
        del v[key]
    return {**v, "sampling": sampling, "layers": None if layers is None else layers.strip(),
            **{k: "float32" if v[k] == "auto" else v[k] for k in ("dtype", "wire_dtype")}}


def parse_result(m: Mapping[str, Any]) -> int:
    """The token of a SHARD_RESULT."""
    return int(SHARD_RESULT.parse(m)["token"])


def parse_close(m: Mapping[str, Any]) -> str:
    """The session id of a SHARD_CLOSE."""
    return str(SHARD_CLOSE.parse(m)["session"])


@dataclass(frozen=True)
class Hop:
    """Where a shard sends its output: a node and the rid of the shard role there."""

    node: str
    rid: str

    @classmethod
    def from_meta(cls, v: Any, key: str = "hop") -> Hop | None:
        """A hop map, or nil (None); ``key`` is kept for callers that name the field."""
        return None if v is None else cls.from_values(HOP.parse(v))

    @classmethod
    def from_values(cls, v: Mapping[str, Any] | None) -> Hop | None:
        return None if v is None else cls(v["node"], v["rid"])

    def to_meta(self) -> dict[str, str]:
        return HOP.to_meta(self)


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
    quant: str = "none"  # weight-only quantized linears: "none" | "int8" | "int4"
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
    sources: tuple[str, ...] = ()  # node ids holding the model whole (this node may lack it)

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
        v = ASSIGN_SHARD.parse(m)
        n = v["num_layers"]
        if v["start"] > n - 1:
            raise ASSIGN_SHARD.error("start", f"must be an integer in [0, {n - 1}], got {v['start']}")
        if not v["start"] < v["end"] <= n:
            raise ASSIGN_SHARD.error("end", f"must be an integer in [{v['start'] + 1}, {n}], "
                                     f"got {v['end']}")
        if v["index"] > v["count"] - 1:
            raise ASSIGN_SHARD.error("index", f"must be an integer in [0, {v['count'] - 1}], "
                                     f"got {v['index']}")
        v["next"], v["first"] = Hop.from_values(v["next"]), Hop.from_values(v["first"])
        p = cls(**v)
        if p.is_last and p.first is None:
            raise ASSIGN_SHARD.error("", "the last shard needs 'first': where sampled tokens go")
        if not p.is_last and p.next is None:
            raise ASSIGN_SHARD.error("", f"shard {p.layers} of {n} layers needs 'next': where "
                                     f"hidden states go")
        return p

    def to_meta(self) -> dict[str, Any]:
        return ASSIGN_SHARD.to_meta({**{k: getattr(self, k) for k in ASSIGN_SHARD.by_name},
                                     "next": self.next.to_meta() if self.next else None,
                                     "first": self.first.to_meta() if self.first else None})


def sampling_to_meta(p: SamplingParams) -> dict[str, Any]:
    return _sampling_to_meta(p)


def sampling_from_meta(v: Any) -> SamplingParams:
    """SamplingParams from a ``sampling`` map (nil: the defaults)."""
    return sampling_from_values(SAMPLING.parse({} if v is None else v))


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
        v = SHARD_OPEN.parse(m)
        max_len = v["max_len"]
        if not last:
            return cls(session=v["session"], max_len=max_len)
        prompt_len, max_new, ids = v["prompt_len"], v["max_new"], v["prompt_ids"]
        for key in ("prompt_len", "max_new"):
            if v[key] is None:
                raise SHARD_OPEN.error(key, "is required on the last shard")
        if prompt_len > max_len:
            raise SHARD_OPEN.error("prompt_len", f"must be an integer in [1, {max_len}], "
                                   f"got {prompt_len}")
        if ids is not None and len(ids) != prompt_len:
            raise SHARD_OPEN.error("prompt_ids", f"has {len(ids)} ids but prompt_len is "
                                   f"{prompt_len}")
        sampling = sampling_from_values(v["sampling"], body=SHARD_OPEN)
        if sampling.repetition_penalty != 1.0 and ids is None:
            raise SHARD_OPEN.error("prompt_ids", "is required with a repetition penalty")
        if prompt_len + max_new - 1 > max_len:
            raise SHARD_OPEN.error("max_new", f"{max_new}: prompt_len {prompt_len} + max_new - 1 "
                                   f"exceeds max_len {max_len}")
        return cls(session=v["session"], max_len=max_len, prompt_len=prompt_len,
                   max_new=max_new, stop_ids=v["stop_ids"], sampling=sampling, prompt_ids=ids)

    def to_meta(self) -> dict[str, Any]:
        if not self.max_new:
            return SHARD_OPEN.to_meta({"session": self.session, "max_len": self.max_len})
        return SHARD_OPEN.to_meta({
            "session": self.session, "max_len": self.max_len, "prompt_len": self.prompt_len,
            "max_new": self.max_new, "stop_ids": self.stop_ids,
            "sampling": sampling_to_meta(self.sampling), "prompt_ids": self.prompt_ids})


def forward_meta(job: str, hop: Hop, session: str, pos: int, sample: bool) -> dict[str, Any]:
    """SHARD_FORWARD metadata (the "tensors" entry is added by the sender)."""
    return SHARD_FORWARD.to_meta({"job": job, "rid": hop.rid, "session": session, "pos": pos,
                                  "sample": sample})


def parse_forward(m: Mapping[str, Any]) -> tuple[str, int, bool]:
    """(session, pos, sample) of a SHARD_FORWARD."""
    v = SHARD_FORWARD.parse(m)
    return v["session"], v["pos"], v["sample"]
