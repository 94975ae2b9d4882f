"""Bodies of the tensor-parallel messages (TP_*, GENERATE mode "tp"), validated as they arrive.
Byte-level layout: protocol.md section 14."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from p2pllm.engine.quant import QUANT_MODES
from p2pllm.pillars.messages import JOB, MAX_TOKEN, RID, SAMPLING, TOKEN, sampling_from_values
from p2pllm.wire.schema import Body, Bool, Enum, Float, Int, List, Map, Str
from p2pllm.wire.tensors import COMPUTE_DTYPES

__all__ = ["ASSIGN_TP_RANK", "GENERATE_TP", "MAX_WORLD", "TP_RUN", "TP_TOKEN", "parse_generate"]

MAX_WORLD = 64
MAX_LEN = 1 << 20
MAX_PROMPT_TEXT = 1 << 20

ASSIGN_TP_RANK = Body("ASSIGN tp-rank", [
    Str("model", 1, doc="a name under that node's --models-dir"),
    Int("rank", 0, MAX_WORLD - 1, doc="this rank"),
    Int("world", 1, MAX_WORLD, doc="ranks in the group"),
    Str("store_host", 1, 256, doc="the coordinator's TCPStore host, as this rank reaches it"),
    Int("store_port", 1, 65535, doc="the coordinator's TCPStore port (the job's own)"),
    Str("token", 32, 128, doc="the job's random token: the store prefix is job/token"),
    Str("gloo_host", 1, 256, default=None,
        doc="the address gloo listens on (nil: the one that routes to store_host)"),
    Enum("dtype", COMPUTE_DTYPES, default="float32", doc="weights and KV cache"),
    Enum("quant", QUANT_MODES, default="none", doc="weight-only quantized linears"),
    Float("join_timeout_s", 1.0, 3600.0, default=120.0,
          doc="every rank loaded and joined within this, or the ASSIGN fails"),
    Float("op_timeout_s", 0.5, 3600.0, default=10.0,
          doc="a collective waiting this long fails (a lost rank)"),
], doc="ASSIGN params of a tp-rank role")

TP_RUN = Body("TP_RUN", [
    JOB(),
    RID(),
    List("prompt_ids", TOKEN, 1, MAX_LEN, doc="the prompt's token ids"),
    Int("max_tokens", 1, MAX_LEN, doc="tokens to generate, at most"),
    List("stop_ids", TOKEN, max_len=4096, default=(), doc="ids that end the reply"),
    Map("sampling", SAMPLING, default={}, doc="rank 0's sampler"),
], doc="coordinator -> every rank: one generation (a collective), streamed")

TP_TOKEN = Body("TP_TOKEN", [
    Int("token", 0, MAX_TOKEN, doc="the token rank 0 picked"),
    Int("step", 0, doc="tokens generated before it"),
], doc="a partial answer of rank 0's TP_RUN stream")

GENERATE_TP = Body("GENERATE tp", [
    Enum("mode", ("tp",), default="tp", doc="the daemon dispatches on it (section 12)"),
    Str("model", 1, doc="name under the daemons' roots; the coordinator reads its config and tokenizer"),
    Str("prompt", 1, MAX_PROMPT_TEXT, default=None, doc="text; needed without prompt_ids"),
    List("prompt_ids", TOKEN, 1, MAX_LEN, default=None, doc="token ids (prompt is then ignored)"),
    Int("max_tokens", 1, MAX_LEN, default=128, doc="tokens to generate, at most"),
    Bool("ignore_eos", default=False, doc="no end id stops the reply: max_tokens of them"),
    *(SAMPLING.by_name[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty",
                                    "seed")),
    Enum("dtype", (*COMPUTE_DTYPES, "auto"), default="float32",
         doc='weights and KV cache ("auto": float32)'),
    Enum("quant", QUANT_MODES, default="none", doc="every rank's linears"),
    Int("tp", 1, MAX_WORLD, default=2, doc="ranks; must divide the heads, KV heads and MLP width"),
], doc="GENERATE in mode tp (14)")


def parse_generate(m: Mapping[str, Any]) -> dict[str, Any]:
    """GENERATE_TP's values: ``sampling`` as SamplingParams, "auto" dtype as float32."""
    v = GENERATE_TP.parse(m)
    if v["prompt_ids"] is None and v["prompt"] is None:
        raise GENERATE_TP.error("", "tp generation needs a prompt (prompt or prompt_ids)")
    sampling = sampling_from_values(v, body=GENERATE_TP)
    for key in ("mode", *SAMPLING.by_name):
        del v[key]
    return {**v, "sampling": sampling, "dtype": "float32" if v["dtype"] == "auto" else v["dtype"]}
