"""Bodies of the split-training messages (protocol.md section 11), validated as they arrive.

``RunSpec`` is the TRAIN_RUN request a CLI sends to its daemon, ``StageParams`` the ASSIGN
params of a ``train-stage`` role (with its ``Neighbour`` stages); the step messages between
stages and from the coordinator are the ``TRAIN_*`` bodies below. A dataset crosses the wire
as a name (in stage 0's ``--data-dir``) or as content (TRAIN_RUN's payload, then TRAIN_DATA's
to stage 0), an output as a name (under the coordinator's state dir); never as a path. Each ``from_meta`` raises
``ProtocolError(BAD_REQUEST)`` naming the body and the field; checks that need the role's state
(the current step, the micro-batch count, the hidden size) stay in the role.

Size: one module because it is the one table of section 11's bodies (each a declarative
schema plus its dataclass), which tests/wire/test_schema.py checks against protocol.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from p2pllm.pillars.messages import JOB, NODE, RID
from p2pllm.pillars.splittrain.compute import (
    LORA_TARGETS,
    LR_DECAYS,
    LoraSpec,
    OptimConfig,
    lora_meta,
    lora_spec,
)
from p2pllm.pillars.splittrain.data import DATA_FORMATS
from p2pllm.pillars.splittrain.schedule import SCHEDULES
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode
from p2pllm.wire.schema import Body, Bool, Enum, Float, Int, List, Map, Str, Tensor

__all__ = [
    "ASSIGN_TRAIN_STAGE",
    "TRAIN_BACKWARD",
    "TRAIN_BATCH",
    "TRAIN_DATA",
    "TRAIN_DATA_REPLY",
    "TRAIN_FORWARD",
    "TRAIN_RUN",
    "TRAIN_SAVE",
    "TRAIN_STEP",
    "TRAIN_TIED",
    "Neighbour",
    "RunSpec",
    "StageParams",
]

INITS = ("checkpoint", "random")
SEED = 2**63 - 1
DEFAULT_TARGETS = ("q_proj", "v_proj")


def _step() -> Int:
    return Int("step", 0, doc="the step (from 0); a stage takes its current step only")


# ---------------------------------------------------------------------------------------------
# Bodies
# ---------------------------------------------------------------------------------------------

NEIGHBOUR = Body("neighbour", [
    Str("node", 1, 256, doc="node id"),
    Str("rid", 1, 256, doc="the stage role's id there"),
    Str("name", max_len=256, default="", doc="the node's name (for messages)"),
], doc="another stage of the job")

OPTIM = Body("optim", [
    Float("lr", 0.0, default=1e-3),
    List("betas", Float("", 0.0, 1.0, hi_open=True), 2, 2, default=(0.9, 0.999)),
    Float("eps", 0.0, lo_open=True, default=1e-8),
    Float("weight_decay", 0.0, default=0.0),
    Float("grad_clip", 0.0, lo_open=True, default=None, doc="global gradient norm; nil = off"),
    Int("warmup_steps", 0, default=0),
    Enum("decay", LR_DECAYS, default="constant"),
    Float("min_lr", 0.0, default=0.0, doc="at most lr"),
    Bool("decay_1d", default=False, doc="weight decay on 1-D parameters too"),
], extra="reject", doc="AdamW and its learning-rate schedule (OptimConfig)")

TRAIN_LORA = Body("train lora", [
    Int("r", 1, default=8),
    Int("alpha", 1, default=16),
    List("targets", Enum("", LORA_TARGETS), 1, len(LORA_TARGETS), default=DEFAULT_TARGETS),
], doc="LoRA of split training (LoraSpec)")

ASSIGN_TRAIN_STAGE = Body("ASSIGN train-stage", [
    Str("model", 1, doc="name or path on that host"),
    List("layers", Int("", 0), 2, 2, doc="[a, b)"),
    Int("index", 0, doc="k"),
    Int("num_stages", 1, doc="K"),
    Map("prev", NEIGHBOUR, default=None, doc="nil on stage 0"),
    Map("next", NEIGHBOUR, default=None, doc="nil on stage K-1"),
    Map("tied_peer", NEIGHBOUR, default=None, doc="stage 0 ↔ stage K-1, for a tied embedding"),
    Str("data", 1, default=None, doc="stage 0: a dataset name in that host's --data-dir"),
    Enum("data_format", DATA_FORMATS, default=None,
         doc="stage 0: the dataset comes in TRAIN_DATA, in this format"),
    Int("data_bytes", 1, default=None, doc="stage 0: TRAIN_DATA's payload length"),
    Int("seq_len", 1),
    Int("batch_size", 1),
    Int("micro_batches", 1, default=1, doc="divides batch_size"),
    Enum("schedule", tuple(SCHEDULES), default="1f1b"),
    Int("steps", 0, default=0),
    Int("seed", 0, SEED, default=0),
    Bool("shuffle", default=True),
    Enum("init", INITS, default="checkpoint"),
    Map("optim", OPTIM, default={}),
    Map("lora", TRAIN_LORA, default=None, doc="nil: train the weights"),
    Int("memory_bytes", 0, default=0, doc="what the planner charged this stage"),
    List("sources", NODE(""), 0, 64, default=(),
         doc="nodes holding the model whole: fetch the stage's layers from them when this node lacks it (13)"),
], doc="ASSIGN params of a train-stage role")

TRAIN_FORWARD = Body("TRAIN_FORWARD", [
    JOB(), RID(), _step(),
    Int("mb", 0, doc="micro-batch, in [0, M)"),
    Int("denom", 1, doc="labels that count in the whole batch"),
], tensors=[
    Tensor("hidden", ("float32",), ("b", "T", "H"), doc="stage k's output"),
    Tensor("labels", ("int64",), ("b", "T"), doc="in [0, V) or -100"),
])

TRAIN_BACKWARD = Body("TRAIN_BACKWARD", [JOB(), RID(), _step(), Int("mb", 0)], tensors=[
    Tensor("grad", ("float32",), ("b", "T", "H"), doc="gradient of the receiver's output"),
])

TRAIN_STEP = Body("TRAIN_STEP", [
    JOB(), RID(), _step(),
    Float("lr", 0.0, doc="this step's learning rate"),
    Float("scale", 0.0, default=1.0, doc="the clip factor"),
])

TRAIN_BATCH = Body("TRAIN_BATCH", [JOB(), RID(), _step()])

TRAIN_BATCH_REPLY = Body("TRAIN_BATCH reply", [
    _step(),
    Float("grad_sq", 0.0, doc="sum of squares of the stage's gradients"),
    Float("forward_s", 0.0, default=0.0),
    Float("backward_s", 0.0, default=0.0),
    Float("idle_s", 0.0, default=0.0),
    Int("bytes_forward", 0, default=0),
    Int("bytes_backward", 0, default=0),
    Int("peak_in_flight", 0, default=0, doc="micro-batches forwarded, not yet backwarded"),
    Float("busy_s", 0.0, default=0.0, doc="seconds the stage's worker computed in this step"),
    Float("window_s", 0.0, default=0.0, doc="seconds from TRAIN_BATCH to this answer"),
    Float("loss", default=None, doc="the last stage: the step's mean loss"),
])

TRAIN_TIED = Body("TRAIN_TIED", [JOB(), RID(), _step()], tensors=[
    Tensor("grad", ("float32",), ("V", "H"), doc="the sender's tied embedding/head gradient"),
])

TRAIN_SAVE = Body("TRAIN_SAVE", [JOB(), RID()])

TRAIN_DATA = Body("TRAIN_DATA", [JOB(), RID()],
                  doc="coordinator -> stage 0: the dataset's content is the payload")

TRAIN_DATA_REPLY = Body("TRAIN_DATA reply", [
    Int("blocks", 1, doc="token blocks of seq_len + 1 the dataset made"),
])

TRAIN_RUN = Body("TRAIN_RUN", [
    Str("model", 1, doc="name or path"),
    Str("data", 1, default=None, doc="a dataset name in the first stage's --data-dir"),
    Enum("data_format", DATA_FORMATS, default=None,
         doc="set: the payload is the dataset's content, in this format"),
    Int("steps", 1, default=10),
    Int("batch_size", 1, default=8),
    Int("micro_batches", 1, default=2, doc="divides batch_size"),
    Int("seq_len", 1, default=128),
    Enum("schedule", tuple(SCHEDULES), default="1f1b"),
    Float("lr", 0.0, default=1e-3),
    Float("weight_decay", 0.0, default=0.0),
    Int("warmup_steps", 0, default=0),
    Enum("decay", LR_DECAYS, default="constant"),
    Float("min_lr", 0.0, default=0.0),
    Float("grad_clip", 0.0, lo_open=True, default=None),
    Bool("lora", default=False, doc="train LoRA adapters, not the weights"),
    Int("lora_r", 1, default=8),
    Int("lora_alpha", 1, default=16),
    List("lora_targets", Enum("", LORA_TARGETS), 1, len(LORA_TARGETS), default=DEFAULT_TARGETS),
    Int("stages", 1, default=None, doc="nil: as many as the nodes that fit"),
    Str("layers", 1, default=None, doc='"0-1,1-2"'),
    List("nodes", Str("", 1, 256), max_len=4096, default=(),
         doc="names or node ids, in pipeline order; repeats allowed"),
    Int("seed", 0, SEED, default=0),
    Bool("shuffle", default=True),
    Enum("init", INITS, default="checkpoint"),
    Str("save", 1, default=None,
        doc="the checkpoint's name: <state_dir>/checkpoints/<save> on the coordinator"),
    Int("save_every", 0, default=0, doc="steps between checkpoints (0: at the end only)"),
    Bool("send_files", default=False,
         doc="stream the final checkpoint's files back (needs save)"),
], doc="a split-training run, as `p2pllm train split` asks for it")


def _bad(body: Body, exc: Exception) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, f"{body.name}: {exc}")


# ---------------------------------------------------------------------------------------------
# ASSIGN train-stage
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Neighbour:
    node_id: str
    rid: str
    name: str = ""

    def describe(self, index: int) -> str:
        return f"stage {index} on {self.name or self.node_id[:8]} ({self.node_id[:8]})"

    @classmethod
    def from_values(cls, v: Mapping[str, Any] | None) -> Neighbour | None:
        return None if v is None else cls(v["node"], v["rid"], v["name"])

    @classmethod
    def from_meta(cls, d: Any, what: str = "neighbour") -> Neighbour | None:
        return None if d is None else cls.from_values(NEIGHBOUR.parse(d))

    def to_meta(self) -> dict[str, str]:
        return {"node": self.node_id, "rid": self.rid, "name": self.name}


@dataclass(frozen=True)
class StageParams:
    """The ASSIGN params of a train-stage role (protocol.md section 11)."""

    model: str
    start: int
    end: int
    index: int
    num_stages: int
    steps: int
    seq_len: int
    batch_size: int
    micro_batches: int
    schedule: str
    optim: OptimConfig
    prev: Neighbour | None = None
    next: Neighbour | None = None
    tied_peer: Neighbour | None = None
    data: str | None = None
    lora: LoraSpec | None = None
    seed: int = 0
    shuffle: bool = True
    init: str = "checkpoint"
    data_format: str | None = None  # set: the dataset's content comes in TRAIN_DATA
    data_bytes: int | None = None
    sources: tuple[str, ...] = ()  # node ids holding the model whole (this node may lack it)

    def __post_init__(self) -> None:
        """Checks across fields (each field's own bounds are ASSIGN_TRAIN_STAGE's)."""
        if not 0 <= self.start < self.end:
            raise ValueError(f"bad layer range [{self.start}, {self.end})")
        if not 0 <= self.index < self.num_stages:
            raise ValueError(f"index {self.index} not in [0, {self.num_stages})")
        if self.batch_size % self.micro_batches:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of "
                             f"micro_batches {self.micro_batches}")
        if (self.prev is None) != (self.index == 0):
            raise ValueError("exactly the first stage has no previous stage")
        if (self.next is None) != (self.index == self.num_stages - 1):
            raise ValueError("exactly the last stage has no next stage")
        inline = self.data_format is not None
        if inline != (self.data_bytes is not None):
            raise ValueError("data_format and data_bytes go together")
        if self.index == 0 and not (isinstance(self.data, str) or inline):
            raise ValueError("the first stage needs the dataset path (data: a name in its "
                             "data dir) or its content (data_format, data_bytes)")
        if self.index == 0 and isinstance(self.data, str) and inline:
            raise ValueError("the first stage takes a dataset name or content, not both")

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.num_stages - 1

    @property
    def mb_size(self) -> int:
        return self.batch_size // self.micro_batches

    @classmethod
    def from_meta(cls, p: Mapping[str, Any]) -> StageParams:
        v = ASSIGN_TRAIN_STAGE.parse(p)
        try:
            lora = v["lora"]
            return cls(
                model=v["model"], start=v["layers"][0], end=v["layers"][1], index=v["index"],
                num_stages=v["num_stages"], steps=v["steps"], seq_len=v["seq_len"],
                batch_size=v["batch_size"], micro_batches=v["micro_batches"],
                schedule=v["schedule"], optim=OptimConfig(**v["optim"]),
                prev=Neighbour.from_values(v["prev"]), next=Neighbour.from_values(v["next"]),
                tied_peer=Neighbour.from_values(v["tied_peer"]), data=v["data"],
                lora=lora_spec(**lora) if lora is not None else None, seed=v["seed"],
                shuffle=v["shuffle"], init=v["init"], data_format=v["data_format"],
                data_bytes=v["data_bytes"], sources=v["sources"],
            )
        except (ValueError, TypeError) as e:
            raise _bad(ASSIGN_TRAIN_STAGE, e) from e

    def to_meta(self, memory_bytes: int = 0) -> dict[str, Any]:
        return ASSIGN_TRAIN_STAGE.to_meta({
            "model": self.model, "layers": [self.start, self.end], "index": self.index,
            "num_stages": self.num_stages,
            **{k: n.to_meta() if (n := getattr(self, k)) else None
               for k in ("prev", "next", "tied_peer")},
            "data": self.data, "data_format": self.data_format, "data_bytes": self.data_bytes,
            "seq_len": self.seq_len, "batch_size": self.batch_size,
            "micro_batches": self.micro_batches, "schedule": self.schedule, "steps": self.steps,
            "seed": self.seed, "shuffle": self.shuffle, "init": self.init,
            "optim": self.optim.to_meta(), "lora": lora_meta(self.lora) if self.lora else None,
            "memory_bytes": memory_bytes, "sources": list(self.sources),
        })


# ---------------------------------------------------------------------------------------------
# TRAIN_RUN
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """A TRAIN_RUN request, validated (protocol.md section 11)."""

    model: str
    data: str | None = None  # a dataset name (stage 0's data dir), or None with data_format
    steps: int = 10
    batch_size: int = 8
    micro_batches: int = 2
    seq_len: int = 128
    schedule: str = "1f1b"
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraSpec | None = None
    stages: int | None = None
    layers: str | None = None
    nodes: tuple[str, ...] = ()
    seed: int = 0
    shuffle: bool = True
    init: str = "checkpoint"
    save: str | None = None
    save_every: int = 0
    data_format: str | None = None  # set: the request's payload is the dataset
    send_files: bool = False

    def __post_init__(self) -> None:
        """Checks across fields (each field's own bounds are TRAIN_RUN's)."""
        if (self.data is None) == (self.data_format is None):
            raise ValueError("give a dataset name (data) or send its content (data_format and "
                             "the payload), one of them")
        if self.send_files and self.save is None:
            raise ValueError("send_files needs a save name")
        if self.batch_size % self.micro_batches:
            raise ValueError(f"batch size {self.batch_size} is not a multiple of "
                             f"{self.micro_batches} micro-batches")
        if self.save_every and self.save is None:
            raise ValueError("save_every needs a save directory")

    @classmethod
    def from_meta(cls, m: Mapping[str, Any]) -> RunSpec:
        v = TRAIN_RUN.parse(m)
        try:
            optim = OptimConfig(lr=v["lr"], weight_decay=v["weight_decay"],
                                warmup_steps=v["warmup_steps"], decay=v["decay"],
                                min_lr=v["min_lr"], grad_clip=v["grad_clip"])
            lora = lora_spec(r=v["lora_r"], alpha=v["lora_alpha"],
                             targets=v["lora_targets"]) if v["lora"] else None
            return cls(
                model=v["model"], data=v["data"], steps=v["steps"], batch_size=v["batch_size"],
                micro_batches=v["micro_batches"], seq_len=v["seq_len"], schedule=v["schedule"],
                optim=optim, lora=lora, stages=v["stages"], layers=v["layers"],
                nodes=v["nodes"], seed=v["seed"], shuffle=v["shuffle"], init=v["init"],
                save=v["save"], save_every=v["save_every"], data_format=v["data_format"],
                send_files=v["send_files"],
            )
        except (TypeError, ValueError) as e:
            raise _bad(TRAIN_RUN, e) from e

    def to_meta(self) -> dict[str, Any]:
        o = self.optim
        return TRAIN_RUN.to_meta({
            "model": self.model, "data": self.data, "steps": self.steps,
            "batch_size": self.batch_size, "micro_batches": self.micro_batches,
            "seq_len": self.seq_len, "schedule": self.schedule, "lr": o.lr,
            "weight_decay": o.weight_decay, "warmup_steps": o.warmup_steps, "decay": o.decay,
            "min_lr": o.min_lr, "grad_clip": o.grad_clip, "lora": self.lora is not None,
            "lora_r": self.lora.rank if self.lora else None,
            "lora_alpha": self.lora.alpha if self.lora else None,
            "lora_targets": self.lora.target_modules if self.lora else None,
            "stages": self.stages, "layers": self.layers, "nodes": self.nodes,
            "seed": self.seed, "shuffle": self.shuffle, "init": self.init, "save": self.save,
            "save_every": self.save_every, "data_format": self.data_format,
            "send_files": self.send_files,
        })

    def job_params(self) -> dict[str, Any]:
        """What `ctl jobs` shows of the job."""
        return {"model": self.model, "data": self.data or f"({self.data_format} sent)",
                "steps": self.steps,
                "batch_size": self.batch_size, "micro_batches": self.micro_batches,
                "seq_len": self.seq_len, "schedule": self.schedule, "lora": self.lora is not None,
                "lr": self.optim.lr, "save": self.save}
