"""Message pieces every pillar shares: field kinds of ids and names, the sampling map, and
the ErrorCode of a peer's ERROR. Each pillar's ``messages.py`` builds its bodies from these and
:mod:`p2pllm.wire.schema` (protocol.md section 4.2)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from p2pllm.engine.sampling import SamplingParams
from p2pllm.wire.messages import ErrorCode
from p2pllm.wire.schema import Body, Float, Int, Routing, Str

__all__ = [
    "JOB",
    "NODE",
    "RID",
    "SAMPLING",
    "SEED",
    "TOKEN",
    "error_code",
    "sampling_from_values",
    "sampling_to_meta",
]

MAX_TOKEN = 2**31 - 1
TOKEN = Int("token", 0, MAX_TOKEN)  # a token id (element of id lists)
SEED = 2**63 - 1


def JOB(**kw: Any) -> Str:
    """The routing key "job" (protocol.md section 4)."""
    return Routing("job", 1, 256, doc="the job", **kw)


def RID(**kw: Any) -> Str:
    """The routing key "rid": the receiving role's id."""
    return Routing("rid", 1, 256, doc="the receiving role", **kw)


def NODE(name: str = "node", **kw: Any) -> Str:
    """A node id."""
    return Str(name, 1, 256, **kw)


SAMPLING = Body("sampling", [
    Float("temperature", 0.0, default=0.0, doc="0 = greedy"),
    Int("top_k", 0, default=0, doc="0 = off"),
    Float("top_p", 0.0, 1.0, lo_open=True, default=1.0, doc="1 = off"),
    Float("repetition_penalty", 0.0, lo_open=True, default=1.0, doc="1 = off"),
    Int("seed", 0, SEED, default=None,
        doc="split inference: the last shard's sampler; speculative uses the body's seed"),
], extra="reject", doc="sampling parameters (the engine's SamplingParams)")


def sampling_from_values(values: Mapping[str, Any], seed: int | None = None,
                         body: Body = SAMPLING) -> SamplingParams:
    """SamplingParams from SAMPLING's parsed values (``seed`` overrides theirs)."""
    try:
        return SamplingParams(temperature=values["temperature"], top_k=values["top_k"],
                              top_p=values["top_p"],
                              repetition_penalty=values["repetition_penalty"],
                              seed=values["seed"] if seed is None else seed)
    except (TypeError, ValueError) as exc:  # pragma: no cover - the schema checks the same
        raise body.error("", f"bad sampling parameters: {exc}") from None


def sampling_to_meta(params: SamplingParams, *, seed: bool = True) -> dict[str, Any]:
    meta = SAMPLING.to_meta({
        "temperature": float(params.temperature), "top_k": int(params.top_k),
        "top_p": float(params.top_p), "repetition_penalty": float(params.repetition_penalty),
        "seed": params.seed if seed else None,
    })
    return meta


def error_code(code: int) -> ErrorCode:
    """The ErrorCode of a peer's ERROR (INTERNAL for a number this version does not know)."""
    try:
        return ErrorCode(code)
    except ValueError:
        return ErrorCode.INTERNAL
