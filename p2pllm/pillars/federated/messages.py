"""Bodies of the federated messages (protocol.md section 10) as small frozen dataclasses.

``RunConfig`` is the FL_RUN request a CLI sends to its daemon; ``ClientParams`` the ASSIGN
params of an ``fl-client``; ``RoundConfig`` the FL_TRAIN metadata besides the adapter tensors.
Each validates in ``__post_init__`` and raises ValueError; ``from_meta`` turns that into a
typed ``BAD_REQUEST`` for whoever sent it. No path crosses the wire: a run is a name (its
checkpoint and adapter live in ``<state_dir>/fl/<run_name>/`` of the coordinator), and a CLI
that wants the adapter's files asks for them (``send_files``) and writes them itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from p2pllm.pillars.federated.lora import DEFAULT_TARGETS, QUANTIZE_CHOICES, LoraSpec
from p2pllm.pillars.messages import JOB, NODE, RID
from p2pllm.wire.schema import Body, Bool, Enum, Float, Int, List, Map, OneOf, Str, Tensor

AGGREGATIONS = ("fedavg", "fedavgm")
RUN_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"  # = p2pllm.pillars.paths.OUTPUT_NAME
_RUN_NAME = re.compile(RUN_NAME)
SEED = 2**63 - 1


def _targets(name: str, default: Any) -> OneOf:
    return OneOf(name, (List("", Str("", 1, 256), max_len=256), Str("", 1, 256)), default=default,
                 doc="module names (one string: a single name, e.g. \"all-linear\")")


# ---------------------------------------------------------------------------------------------
# Bodies (protocol.md section 10). The LoRA numbers' bounds are LoraSpec's (lora.py).
# ---------------------------------------------------------------------------------------------

FL_LORA = Body("fl lora", [
    Int("rank", default=8, doc="1..4096"),
    Float("alpha", default=16.0, doc="> 0"),
    Float("dropout", default=0.05, doc="in [0, 1)"),
    _targets("target_modules", list(DEFAULT_TARGETS)),
], doc="LoRA of a federated run (LoraSpec)")

FL_RUN = Body("FL_RUN", [
    Str("model", 1, doc="name or path"),
    Int("rounds", 1, 100_000, default=3),
    Int("clients", 1, 10_000, default=None, doc="nil: every eligible node"),
    Int("min_clients", 1, 10_000, default=1),
    Int("local_steps", 1, 10_000_000, default=20),
    Float("local_epochs", 0.0, 10_000.0, lo_open=True, default=None,
          doc="set: overrides local_steps"),
    Float("lr", 0.0, 10.0, lo_open=True, default=1e-3),
    Int("batch_size", 1, 65_536, default=8),
    Int("block_size", 2, 1 << 20, default=128),
    Float("eval_fraction", 0.0, 0.9, lo_open=True, default=0.1),
    Int("lora_rank", default=8, doc="1..4096"),
    Float("lora_alpha", default=16.0, doc="> 0"),
    Float("lora_dropout", default=0.05, doc="in [0, 1)"),
    _targets("target_modules", list(DEFAULT_TARGETS)),
    Float("round_timeout", 0.0, 7 * 86400.0, lo_open=True, default=300.0, doc="seconds"),
    Enum("aggregation", AGGREGATIONS, default="fedavg"),
    Float("server_lr", 0.0, 100.0, lo_open=True, default=1.0),
    Float("server_momentum", 0.0, 0.999, default=0.9),
    Int("seed", 0, SEED, default=0),
    Enum("quantize", QUANTIZE_CHOICES, default=None, doc="QLoRA"),
    Int("max_retries", 0, 1000, default=3, doc="of a round"),
    Float("wait_clients", 0.0, 3600.0, default=10.0, doc="seconds to wait for enough clients"),
    Bool("resume", default=False, doc="continue from the checkpoint"),
    Str("run_name", pattern=RUN_NAME, default=None,
        doc="the run's name: <state_dir>/fl/<run_name>/ on the coordinator"),
    Bool("send_files", default=False, doc="stream the final adapter's files back"),
], extra="reject", doc="an FL run, as `p2pllm fl run` asks for it")

ASSIGN_FL_CLIENT = Body("ASSIGN fl-client", [
    Str("model", 1, doc="the name (looked up in the client's --models-dir first)"),
    Str("model_path", 1, default=None, doc="the coordinator's path to it (default: model)"),
    Map("lora", FL_LORA),
    Int("block_size", 2, 1 << 20, default=128),
    Float("eval_fraction", 0.0, 0.9, lo_open=True, default=0.1),
    Int("seed", 0, SEED, default=0),
    Enum("quantize", QUANTIZE_CHOICES, default=None),
    List("sources", NODE(""), 0, 64, default=(),
         doc="nodes holding the model whole: fetch the base model from them when this node lacks it (13)"),
], doc="ASSIGN params of an fl-client role")

_ADAPTER = Tensor("*", ("float32",), min_rank=1, max_rank=2, doc="adapter tensors, peft's names")

FL_TRAIN = Body("FL_TRAIN", [
    JOB(),
    RID(),
    Int("round", 1, 1 << 31),
    Int("local_steps", 1, 10_000_000),
    Float("lr", 0.0, 10.0, lo_open=True),
    Int("batch_size", 1, 65_536),
    Int("seed", 0, SEED, default=0),
    Float("local_epochs", 0.0, 10_000.0, lo_open=True, default=None,
          doc="set: epochs over the training blocks instead of local_steps"),
], tensors=[_ADAPTER])

FL_TRAIN_REPLY = Body("FL_TRAIN reply", [
    Int("round", 1, 1 << 31),
    Int("num_examples", 1, doc="training blocks of the client"),
    Float("train_loss", finite=False, default=None, doc="mean over the steps"),
    Float("eval_loss", finite=False, default=None,
          doc="of the client's adapter on its eval blocks"),
    Int("steps", 0, default=0),
    Float("seconds", 0.0, default=0.0),
], tensors=[_ADAPTER])

FL_EVAL = Body("FL_EVAL", [JOB(), RID(), Int("round", 0, 1 << 31)], tensors=[_ADAPTER])

FL_EVAL_REPLY = Body("FL_EVAL reply", [
    Int("round", 0, 1 << 31),
    Float("eval_loss", finite=False, default=None, doc="of the global adapter on the eval blocks"),
    Int("num_eval_examples", 0),
])


def _lora(values: Mapping[str, Any]) -> LoraSpec:
    t = values["target_modules"]
    return LoraSpec(rank=values["rank"], alpha=values["alpha"], dropout=values["dropout"],
                    target_modules=(t,) if isinstance(t, str) else tuple(t))


@dataclass(frozen=True)
class RunConfig:
    """An FL run, as `p2pllm fl run` asks for it (FL_RUN body)."""

    model: str
    rounds: int = 3
    clients: int | None = None  # None: every eligible node
    min_clients: int = 1
    local_steps: int = 20
    local_epochs: float | None = None  # set: overrides local_steps (epochs over the train blocks)
    lr: float = 1e-3
    batch_size: int = 8
    block_size: int = 128
    eval_fraction: float = 0.1
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    round_timeout: float = 300.0
    aggregation: str = "fedavg"
    server_lr: float = 1.0
    server_momentum: float = 0.9
    seed: int = 0
    quantize: str | None = None
    max_retries: int = 3
    wait_clients: float = 10.0
    resume: bool = False
    run_name: str | None = None
    send_files: bool = False

    # Keys a resumed run must share with its checkpoint: they fix the adapter's layout, the
    # data split or the server optimizer's state.
    STRUCTURAL = (
        "model", "block_size", "eval_fraction", "lora_rank", "lora_alpha", "lora_dropout",
        "target_modules", "seed", "quantize", "aggregation", "server_lr", "server_momentum",
    )

    def __post_init__(self) -> None:
        """Checks across fields (each field's own bounds are FL_RUN's)."""
        if self.clients is not None and self.min_clients > self.clients:
            raise ValueError(f"min_clients ({self.min_clients}) exceeds clients ({self.clients})")
        _ = self.lora  # validates the LoRA fields
        if self.run_name is not None and (not _RUN_NAME.fullmatch(self.run_name)
                                          or ".." in self.run_name):
            raise ValueError(
                f"run_name must be 1-100 characters of letters, digits, '.', '_', '-', got {self.run_name!r}"
            )

    @property
    def lora(self) -> LoraSpec:
        return LoraSpec(self.lora_rank, self.lora_alpha, self.lora_dropout, self.target_modules)

    @property
    def name(self) -> str:
        """The run's name: its checkpoint lives in <state_dir>/fl/<name>/ (default from the
        model's name; the CLI names it after --out)."""
        if self.run_name:
            return self.run_name
        base = self.model.rstrip("/").rsplit("/", 1)[-1]
        cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip("._-").replace("..", "_") or "run"
        return ("fl-" + cleaned)[:100]

    def to_meta(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> RunConfig:
        """Defaults < ``base`` (a checkpoint's config) < ``meta``; BAD_REQUEST when invalid."""
        values = FL_RUN.parse({}, partial=True)
        if base:
            values.update(FL_RUN.parse({k: v for k, v in base.items() if k in FL_RUN.by_name},
                                       partial=True))
        values.update(FL_RUN.parse(meta, partial=True))
        if "model" not in values:
            raise FL_RUN.error("model", "is required")
        defaults = {f.key: f.default for f in FL_RUN.fields if not f.required}
        values = {**defaults, **values}
        t = values["target_modules"]
        values["target_modules"] = (t,) if isinstance(t, str) else tuple(t)
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise FL_RUN.error("", str(exc)) from exc

    def conflicts(self, saved: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
        """Structural keys the user gave explicitly that differ from the checkpoint's."""
        out = []
        for key in self.STRUCTURAL:
            if key in given and given[key] is not None and key in saved:
                mine, theirs = getattr(self, key), saved[key]
                if isinstance(mine, tuple):
                    theirs = tuple(theirs) if isinstance(theirs, list) else theirs
                if mine != theirs:
                    out.append(f"{key}={mine!r} (checkpoint: {theirs!r})")
        return out


@dataclass(frozen=True)
class ClientParams:
    """ASSIGN params of an fl-client role."""

    model: str  # the name (looked up in the client's --models-dir first)
    model_path: str  # the coordinator's path to it (used when the name is not found locally)
    lora: LoraSpec
    block_size: int
    eval_fraction: float
    seed: int
    quantize: str | None = None
    sources: tuple[str, ...] = ()  # node ids holding the model whole (this node may lack it)

    def to_meta(self) -> dict[str, Any]:
        return ASSIGN_FL_CLIENT.to_meta({**asdict(self), "lora": self.lora.to_meta(),
                                         "sources": list(self.sources)})

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> ClientParams:
        v = ASSIGN_FL_CLIENT.parse(meta)
        try:
            lora = _lora(v["lora"])
        except ValueError as exc:
            raise ASSIGN_FL_CLIENT.error("", f"lora: {exc}") from exc
        return cls(model=v["model"], model_path=v["model_path"] or v["model"], lora=lora,
                   block_size=v["block_size"], eval_fraction=v["eval_fraction"], seed=v["seed"],
                   quantize=v["quantize"], sources=v["sources"])


@dataclass(frozen=True)
class RoundConfig:
    """What a client does in one round (FL_TRAIN metadata besides the tensors)."""

    round: int
    local_steps: int
    lr: float
    batch_size: int
    seed: int
    local_epochs: float | None = None

    def steps_for(self, num_examples: int) -> int:
        """Optimizer steps this round: local_steps, or local_epochs over the train blocks."""
        if self.local_epochs is None:
            return self.local_steps
        per_epoch = math.ceil(num_examples / self.batch_size)
        return max(1, round(self.local_epochs * per_epoch))

    def to_meta(self) -> dict[str, Any]:
        return FL_TRAIN.to_meta(self)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> RoundConfig:
        v = FL_TRAIN.parse(meta)
        del v["job"], v["rid"]
        return cls(**v)
