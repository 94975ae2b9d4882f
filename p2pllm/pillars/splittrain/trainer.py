"""Split training: the single-process trainer (the reference, and a library API) and the
coordinator of a split-training job (TRAIN_RUN).

Single process::

    from p2pllm.pillars.splittrain.trainer import train_local, save_trained
    from p2pllm.pillars.splittrain.compute import OptimConfig
    from p2pllm.pillars.splittrain.data import load_blocks

    blocks = load_blocks("corpus.txt", seq_len=128, tokenizer="path/to/checkpoint")
    run = train_local(ModelConfig(...) or "path/to/checkpoint", blocks, steps=1000,
                      batch_size=32, optim=OptimConfig(lr=3e-3, warmup_steps=100,
                      decay="cosine", grad_clip=1.0, weight_decay=0.1), init="random", seed=0)
    save_trained(run.model, "out/", tokenizer_src="path/with/tokenizer")

Distributed: :func:`coordinate` runs a job over ``train-stage`` roles (see ``stage.py`` and
protocol.md section 11); each step's losses and final parameters equal ``train_local`` with
the same model, data, micro-batches and optimizer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from p2pllm.daemon.jobs import AssignRefused, Job, JobHost
from p2pllm.engine.config import ModelConfig
from p2pllm.engine.errors import ModelError
from p2pllm.engine.model import ModelSlice
from p2pllm.pillars.splittrain.compute import (
    IGNORE_INDEX,
    LoraSpec,
    OptimConfig,
    StageModel,
    build_slice,
    clip_scale,
    save_adapter,
)
from p2pllm.pillars.splittrain.data import batch_rows, split_batch
from p2pllm.pillars.splittrain.messages import RunSpec
from p2pllm.pillars.splittrain.schedule import bubble_fraction
from p2pllm.plan.layers import StageCost, free_bytes, model_stage_cost, plan_stages
from p2pllm.plan.partition import NodeBudget, PlanError, parse_layer_ranges
from p2pllm.wire.connection import ConnectionClosed, RemoteError, Reply, Request
from p2pllm.wire.frame import Frame, ProtocolError
from p2pllm.wire.messages import ErrorCode, MsgType
from p2pllm.wire.tensors import unpack_tensors

log = logging.getLogger(__name__)

__all__ = [
    "LocalRun",
    "coordinate",
    "evaluate",
    "save_trained",
    "train_local",
]


# -- single process ----------------------------------------------------------------------------


@dataclass
class LocalRun:
    """What :func:`train_local` returns: per-step losses and the trained model."""

    losses: list[float]
    model: ModelSlice
    steps: list[dict[str, float]] = field(default_factory=list)  # step, loss, lr, grad_norm, seconds
    seconds: float = 0.0
    lora: LoraSpec | None = None


def train_local(
    model: ModelSlice | ModelConfig | str | Path,
    blocks: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    micro_batches: int = 1,
    optim: OptimConfig | None = None,
    lora: LoraSpec | None = None,
    seed: int = 0,
    shuffle: bool = True,
    init: str = "checkpoint",
    models_dir: str | Path | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> LocalRun:
    """Train a model in this process and return its per-step losses.

    ``model``: a :class:`ModelSlice` holding the whole model (trained in place; its
    ``requires_grad`` flags are kept), or a checkpoint path / name (loaded in float32), or a
    :class:`ModelConfig` (with ``init="random"``: trained from scratch). ``blocks``: token
    blocks (N, T+1) from :mod:`~p2pllm.pillars.splittrain.data`; step s trains on
    ``batch_rows(N, batch_size, s, seed, shuffle)``, cut into ``micro_batches`` whose gradients
    accumulate (the loss is the mean token cross-entropy of the whole batch). ``on_step`` is
    called after each step with ``{"step", "loss", "lr", "grad_norm", "seconds"}``.
    """
    optim = optim or OptimConfig()
    if steps < 0 or batch_size < 1 or micro_batches < 1 or batch_size % micro_batches:
        raise ValueError(f"steps >= 0, batch_size >= 1 divisible by micro_batches "
                         f"({steps}, {batch_size}, {micro_batches})")
    if blocks.dim() != 2 or blocks.shape[1] < 2 or blocks.shape[0] < 1:
        raise ValueError(f"blocks must be (N, T+1) token ids, got {tuple(blocks.shape)}")
    if isinstance(model, ModelSlice):
        if not (model.has_embed and model.has_head and model.start == 0
                and model.end == model.config.num_layers):
            raise ModelError("train_local needs the whole model (embedding, every layer, head)")
        if lora is not None:
            from p2pllm.pillars.splittrain.compute import apply_lora

            apply_lora(model, lora, seed)
        model.train()
        slice_ = model
    else:
        slice_ = build_slice(model, init=init, seed=seed, lora=lora, models_dir=models_dir)
    stage = StageModel(slice_, optim)
    run = LocalRun(losses=[], model=slice_, lora=lora)
    t_start = time.perf_counter()
    for s in range(steps):
        t0 = time.perf_counter()
        rows = batch_rows(blocks.shape[0], batch_size, s, seed, shuffle)
        inputs, labels = split_batch(blocks, rows)
        denom = int((labels != IGNORE_INDEX).sum())
        loss = 0.0
        size = batch_size // micro_batches
        for m in range(micro_batches):
            sl = slice(m * size, (m + 1) * size)
            loss += float(stage.forward(m, inputs[sl], labels[sl], denom))
            stage.backward(m)
        total_sq = stage.grad_sq()
        lr = optim.lr_at(s, steps)
        stage.step(lr, clip_scale(total_sq, optim.grad_clip))
        rec = {"step": s, "loss": loss, "lr": lr, "grad_norm": math.sqrt(total_sq),
               "seconds": time.perf_counter() - t0}
        run.losses.append(loss)
        run.steps.append(rec)
        if on_step is not None:
            on_step(rec)
    run.seconds = time.perf_counter() - t_start
    return run


@torch.no_grad()
def evaluate(model: ModelSlice, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """Mean token cross-entropy of ``model`` over every block (no gradient, any order)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, blocks.shape[0], batch_size):
            inputs, labels = split_batch(blocks, range(i, min(i + batch_size, blocks.shape[0])))
            b, t = inputs.shape
            logits = model(inputs, torch.arange(t).expand(b, t))
            total += float(torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)


def save_trained(model: ModelSlice, out_dir: str | Path, *, lora: LoraSpec | None = None,
                 tokenizer_src: str | Path | None = None, base_model: str = "",
                 dtype: torch.dtype | None = None) -> Path:
    """Write a trained whole model as a Hugging Face checkpoint (config, safetensors and the
    tokenizer files of ``tokenizer_src``), or with ``lora`` its adapter as a peft directory."""
    if lora is not None:
        from p2pllm.pillars.splittrain.compute import lora_state_dict

        return save_adapter(lora_state_dict(model), lora, out_dir, base_model)
    from p2pllm.engine.loader import save_hf_checkpoint

    return save_hf_checkpoint([model], model.config, out_dir, tokenizer_src=tokenizer_src,
                              dtype=dtype)


# -- the coordinator of a split-training job ---------------------------------------------------

BYTES_PER_PARAM_FULL = 16  # float32 weight, gradient, two AdamW moments
BYTES_PER_PARAM_LORA = 4  # frozen float32 weights (adapters are small)
STEP_TIMEOUT = 3600.0


@dataclass(frozen=True)
class Stage:
    """A planned stage: which node, which layers."""

    index: int
    node_id: str
    name: str
    start: int
    end: int

    @property
    def rid(self) -> str:
        return f"stage{self.index}"

    def describe(self) -> str:
        return (f"stage {self.index} (layers {self.start}-{self.end}) on {self.name} "
                f"({self.node_id[:8]})")

    def neighbour(self) -> dict[str, str]:
        return {"node": self.node_id, "rid": self.rid, "name": self.name}


class StageFailed(Exception):
    def __init__(self, stage: Stage, code: int, message: str) -> None:
        super().__init__(f"{stage.describe()}: {message}")
        self.stage = stage
        self.code = code
        self.message = message


def _accepts(node: Mapping[str, Any]) -> bool:
    accepts = node.get("caps", {}).get("accepts", ["auto"])
    return not isinstance(accepts, list) or "auto" in accepts or "train-stage" in accepts


def _find_node(nodes: Sequence[Mapping[str, Any]], text: str) -> Mapping[str, Any]:
    for pred in (lambda n: n["node_id"] == text or n.get("address") == text,
                 lambda n: n["name"] == text,
                 lambda n: n["node_id"].startswith(text)):
        hits = [n for n in nodes if pred(n)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"node {text!r} is ambiguous: "
                                + ", ".join(f"{n['name']}({n['node_id'][:8]})" for n in hits))
    known = ", ".join(f"{n['name']}({n['node_id'][:8]})" for n in nodes) or "none"
    raise ProtocolError(ErrorCode.NOT_FOUND, f"no connected node {text!r}; known: {known}")


def _stage_cost(spec: RunSpec, nodes: Sequence[Mapping[str, Any]],
                models_dir: str | None) -> tuple[StageCost, bool]:
    """The cost model of the job's model, and whether its config ties embedding and head."""
    from p2pllm.engine.loader import resolve_model

    per_param = BYTES_PER_PARAM_LORA if spec.lora is not None else BYTES_PER_PARAM_FULL
    try:
        config = ModelConfig.from_dir(resolve_model(spec.model, models_dir))
        shape: Any = config  # a ModelShape (read-only attributes)
        return model_stage_cost(shape, bytes_per_param=per_param), config.tie_word_embeddings
    except ModelError as e:
        local_error = e
    for n in nodes:  # the coordinator lacks the model: use what a peer advertises
        for m in n.get("caps", {}).get("models", []):
            if isinstance(m, dict) and m.get("name") == spec.model:
                layers = int(m.get("num_layers") or 0)
                if layers > 0:
                    per_layer = int(m.get("param_bytes", 0)) // (layers + 2) * (per_param // 4)
                    return StageCost(layers, per_layer, per_layer, per_layer), True
    raise ProtocolError(ErrorCode.NOT_FOUND,
                        f"model {spec.model!r} is not known here ({local_error}) and no peer "
                        f"advertises it")


def plan(spec: RunSpec, nodes: Sequence[Mapping[str, Any]], cost: StageCost) -> list[Stage]:
    """Place the stages: on the given nodes in order, or on nodes that accept train-stage:
    this node first (the dataset path is usually local), then those with the most free memory
    (in name order); layers as given or in proportion to free memory."""
    if spec.nodes:
        chosen = [_find_node(nodes, t) for t in spec.nodes]
    else:
        cands = sorted((n for n in nodes if _accepts(n)),
                       key=lambda n: (not n.get("self"), n["name"], n["node_id"]))
        if not cands:
            raise ProtocolError(ErrorCode.REFUSED, "no node accepts the train-stage role")
        count = spec.stages
        if count is None and spec.layers is not None:
            try:
                count = len(parse_layer_ranges(spec.layers, cost.num_layers))
            except PlanError as e:
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"--layers: {e}") from e
        if count is None:
            count = min(len(cands), cost.num_layers)
        chosen = _pick(cands, count)
    repeats = {n["node_id"]: sum(1 for c in chosen if c["node_id"] == n["node_id"])
               for n in chosen}
    budgets = [NodeBudget(f"{n['name']}({n['node_id'][:8]})"
                          + (f" stage {i}" if repeats[n["node_id"]] > 1 else ""),
                          free_bytes(n.get("caps", {})) // repeats[n["node_id"]])
               for i, n in enumerate(chosen)]
    try:
        ranges = plan_stages(budgets, cost, stages=spec.stages, layers=spec.layers)
    except PlanError as e:
        code = ErrorCode.BAD_REQUEST if spec.layers is not None else ErrorCode.REFUSED
        hint = ""
        if not spec.nodes and len(chosen) < (spec.stages or 0):
            hint = " (to put several stages on one node, list it several times in --nodes)"
        raise ProtocolError(code, f"cannot plan the stages: {e}{hint}") from e
    by_id = {b.node_id: n for b, n in zip(budgets, chosen, strict=True)}
    return [Stage(i, by_id[r.node_id]["node_id"], by_id[r.node_id]["name"], r.start, r.end)
            for i, r in enumerate(ranges)]


def _pick(cands: list[Mapping[str, Any]], count: int) -> list[Mapping[str, Any]]:
    """``count`` candidates: the first if it is this node, then the most free memory."""
    if count >= len(cands):
        return cands
    head = [cands[0]] if cands[0].get("self") else []
    rest = cands[len(head):]
    order = sorted(range(len(rest)), key=lambda i: (-free_bytes(rest[i].get("caps", {})), i))
    keep = set(order[:max(0, count - len(head))])
    return head + [n for i, n in enumerate(rest) if i in keep]


MAX_REPLANS = 3  # a member refusing its stage makes the coordinator plan again without it


def _has_model(node: Mapping[str, Any], model: str, local_path: str | None) -> bool:
    """Whether a node lists the model (by name or path), or may read it (a path)."""
    for m in node.get("caps", {}).get("models", []) or []:
        if isinstance(m, Mapping) and (
            m.get("name") == model or m.get("path") in (model, local_path)
        ):
            return True
    return "/" in model or model.startswith((".", "~"))


async def coordinate(host: JobHost, req: Request) -> Reply:
    """TRAIN_RUN: plan the stages, assign them, drive the steps, save, report.

    Nodes that lack the model files are left out of the plan; a node that refuses its stage
    (ASSIGN answered REFUSED) is left out of a new plan, up to MAX_REPLANS times.
    """
    from p2pllm.engine.loader import resolve_model

    spec = RunSpec.from_meta(req.meta)
    if spec.save is not None:
        check_save_dir(spec.save)
    cost, _tied = _stage_cost(spec, host.cluster.nodes(), host.config.models_dir)
    try:
        local_path: str | None = str(resolve_model(spec.model, host.config.models_dir))
    except ModelError:
        local_path = None
    excluded: dict[str, str] = {}  # node id -> why it is left out
    async with host.job("splittrain", spec.job_params()) as job:
        for attempt in range(MAX_REPLANS + 1):
            nodes = [n for n in host.cluster.nodes() if n["node_id"] not in excluded]
            if not spec.nodes:
                lacking = [n for n in nodes if not _has_model(n, spec.model, local_path)]
                nodes = [n for n in nodes if _has_model(n, spec.model, local_path)]
                if not nodes:
                    names = ", ".join(n["name"] for n in lacking) or "none"
                    raise ProtocolError(
                        ErrorCode.NOT_FOUND,
                        f"no node has {spec.model!r} (without it: {names})"
                        + "".join(f"; {why}" for why in excluded.values()),
                    )
            run = _Run(job, spec, plan(spec, nodes, cost), req, cost)
            try:
                await run._assign()
            except StageFailed as e:
                if e.code != ErrorCode.REFUSED or spec.nodes or attempt == MAX_REPLANS:
                    raise ProtocolError(
                        ErrorCode(e.code) if e.code in ErrorCode._value2member_map_ else ErrorCode.REFUSED,
                        f"split training stopped: {e}"
                        + "".join(f"; earlier: {why}" for why in excluded.values()),
                    ) from e
                excluded[e.stage.node_id] = f"{e.stage.name} refused: {e.message}"
                log.info("re-planning %s without %s: %s", job.id, e.stage.name, e.message)
                await job.release_all()
                continue
            return await run.run()
    raise AssertionError("unreachable")  # pragma: no cover


class _Run:
    """One split-training job, as its coordinator drives it."""

    def __init__(self, job: Job, spec: RunSpec, stages: list[Stage], req: Request,
                 cost: StageCost) -> None:
        self.job = job
        self.spec = spec
        self.stages = stages
        self.req = req
        self.cost = cost
        self.records: list[dict[str, Any]] = []
        self.stage_totals = [{"forward_s": 0.0, "backward_s": 0.0, "idle_s": 0.0,
                              "busy_window_s": 0.0} for _ in stages]
        self.saved: str | None = None
        self.assigned = False

    @property
    def cluster(self) -> Any:
        return self.job.cluster

    def _params(self, st: Stage) -> dict[str, Any]:
        k, n = st.index, len(self.stages)
        s = self.spec
        tied_peer = None
        if n > 1 and k in (0, n - 1):
            tied_peer = self.stages[n - 1 if k == 0 else 0].neighbour()
        return {
            "model": s.model, "layers": [st.start, st.end], "index": k, "num_stages": n,
            "prev": self.stages[k - 1].neighbour() if k > 0 else None,
            "next": self.stages[k + 1].neighbour() if k < n - 1 else None,
            "tied_peer": tied_peer, "data": s.data if k == 0 else None,
            "seq_len": s.seq_len, "batch_size": s.batch_size, "micro_batches": s.micro_batches,
            "schedule": s.schedule, "steps": s.steps, "seed": s.seed, "shuffle": s.shuffle,
            "init": s.init, "optim": s.optim.to_meta(),
            "lora": s.lora.to_meta() if s.lora is not None else None,
            "memory_bytes": self.cost.stage_bytes(st.start, st.end),
        }

    async def _assign(self) -> None:
        async def one(st: Stage) -> None:
            try:
                await self.job.assign(st.node_id, "train-stage", self._params(st), rid=st.rid,
                                      summary=f"layers {st.start}-{st.end}")
            except AssignRefused as e:
                cause = e.__cause__
                code = cause.code if isinstance(cause, RemoteError) else ErrorCode.REFUSED
                if isinstance(cause, ConnectionClosed | TimeoutError):
                    code = ErrorCode.PEER_DOWN
                raise StageFailed(st, code, e.reason) from e

        await self._gather([one(st) for st in self.stages])
        self.assigned = True

    async def _gather(self, coros: Sequence[Any]) -> list[Any]:
        """Run one call per stage; on the first failure cancel the rest and raise it (a stage
        that died is reported before the neighbours that could not reach it)."""
        tasks = [asyncio.ensure_future(c) for c in coros]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in done if t.exception() is not None]
            if failed and pending:  # give a dying peer's own connection a moment to close
                more, pending = await asyncio.wait(pending, timeout=0.5,
                                                   return_when=asyncio.FIRST_EXCEPTION)
                failed += [t for t in more if t.exception() is not None]
            if failed:
                errors = [t.exception() for t in failed]
                down = [e for e in errors if isinstance(e, StageFailed)
                        and e.code == ErrorCode.PEER_DOWN and "died" in e.message]
                raise (down or errors)[0]  # type: ignore[misc]
            return [t.result() for t in tasks]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _call(self, st: Stage, msg_type: MsgType, meta: dict[str, Any]) -> Frame:
        try:
            return await self.cluster.request(st.node_id, msg_type,
                                              {**meta, "job": self.job.id, "rid": st.rid},
                                              timeout=STEP_TIMEOUT)
        except RemoteError as e:
            raise StageFailed(st, e.code, e.message) from e
        except ConnectionClosed as e:
            raise StageFailed(st, ErrorCode.PEER_DOWN, f"the node died or left ({e})") from e
        except TimeoutError as e:
            raise StageFailed(st, ErrorCode.TIMEOUT,
                              f"no answer to {msg_type.name} in {STEP_TIMEOUT:.0f}s") from e

    async def run(self) -> Reply:
        try:
            return await self._run()
        except StageFailed as e:
            log.warning("split training %s failed: %s", self.job.id, e)
            code = e.code if e.code in ErrorCode._value2member_map_ else ErrorCode.INTERNAL
            raise ProtocolError(ErrorCode(code), f"split training stopped: {e}") from e

    async def _run(self) -> Reply:
        s = self.spec
        t_start = time.perf_counter()
        if not self.assigned:
            await self._assign()
        plan_meta = [{"index": st.index, "node_id": st.node_id, "name": st.name,
                      "layers": [st.start, st.end]} for st in self.stages]
        self.job.update(step=0, loss=None, step_seconds=None,
                        bubble=bubble_fraction(len(self.stages), s.micro_batches),
                        idle_fraction=None, steps_total=s.steps, stages=plan_meta)
        await self.req.partial(MsgType.TRAIN_RUN, {"event": "plan", "job": self.job.id,
                                                   "stages": plan_meta})
        train_s = 0.0
        for step in range(s.steps):
            rec = await self._step(step)
            train_s += rec["seconds"]
            self.records.append(rec)
            self.job.update(step=step + 1, loss=rec["loss"], step_seconds=rec["seconds"],
                            idle_fraction=self._idle_fraction(),
                            bytes_forward=rec["bytes_forward"],
                            bytes_backward=rec["bytes_backward"])
            await self.req.partial(MsgType.TRAIN_RUN, {"event": "step", **rec})
            if s.save and s.save_every and (step + 1) % s.save_every == 0 and step + 1 < s.steps:
                await self._save(step + 1)
        if s.save:
            await self._save(s.steps)
        return Reply(MsgType.TRAIN_RUN, self._result(train_s, time.perf_counter() - t_start))

    async def _step(self, step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        frames = await self._gather([self._call(st, MsgType.TRAIN_BATCH, {"step": step})
                                     for st in self.stages])
        replies = [f.meta for f in frames]
        loss = replies[-1].get("loss")
        if not isinstance(loss, int | float):
            raise StageFailed(self.stages[-1], ErrorCode.INTERNAL, "the last stage sent no loss")
        total_sq = sum(float(r.get("grad_sq", 0.0)) for r in replies)
        lr = self.spec.optim.lr_at(step, self.spec.steps)
        scale = clip_scale(total_sq, self.spec.optim.grad_clip)
        await self._gather([self._call(st, MsgType.TRAIN_STEP,
                                       {"step": step, "lr": lr, "scale": scale})
                            for st in self.stages])
        seconds = time.perf_counter() - t0
        for tot, r in zip(self.stage_totals, replies, strict=True):
            for key in ("forward_s", "backward_s", "idle_s"):
                tot[key] += float(r.get(key, 0.0))
            tot["busy_window_s"] += seconds
        return {
            "step": step, "loss": float(loss), "seconds": seconds,
            "bytes_forward": sum(int(r.get("bytes_forward", 0)) for r in replies),
            "bytes_backward": sum(int(r.get("bytes_backward", 0)) for r in replies),
            "lr": lr, "grad_norm": math.sqrt(total_sq),
            "stages": [{k: r.get(k) for k in ("forward_s", "backward_s", "idle_s")}
                       for r in replies],
        }

    def _stage_idle(self, tot: Mapping[str, float]) -> float:
        window = tot["busy_window_s"] or 1.0
        return max(0.0, 1.0 - (tot["forward_s"] + tot["backward_s"]) / window)

    def _idle_fraction(self) -> float:
        return sum(self._stage_idle(t) for t in self.stage_totals) / len(self.stage_totals)

    def _result(self, train_s: float, total_s: float) -> dict[str, Any]:
        s = self.spec
        stages: list[dict[str, Any]] = []
        for st, tot in zip(self.stages, self.stage_totals, strict=True):
            stages.append({
                "index": st.index, "node_id": st.node_id, "name": st.name,
                "layers": [st.start, st.end], "forward_s": tot["forward_s"],
                "backward_s": tot["backward_s"], "idle_s": tot["idle_s"],
                "idle_fraction": self._stage_idle(tot),
            })
        steps = [{k: r[k] for k in ("step", "loss", "seconds", "bytes_forward", "bytes_backward",
                                    "lr", "grad_norm")} for r in self.records]
        tokens = s.steps * s.batch_size * s.seq_len
        return {
            "job": self.job.id, "losses": [r["loss"] for r in self.records], "steps": steps,
            "stages": stages, "seconds": total_s, "train_seconds": train_s,
            "step_seconds": train_s / max(1, len(self.records)),
            "idle_fraction": self._idle_fraction(),
            "bubble": bubble_fraction(len(self.stages), s.micro_batches),
            "tokens_per_s": tokens / train_s if train_s > 0 else 0.0,
            "schedule": s.schedule, "micro_batches": s.micro_batches,
            "saved": self.saved,
        }

    # -- checkpoints ------------------------------------------------------------------------

    async def _save(self, step: int) -> None:
        assert self.spec.save is not None
        dest = Path(self.spec.save)
        parts = await self._gather([self._fetch(st) for st in self.stages])
        tensors: dict[str, torch.Tensor] = {}
        for state, _ in parts:
            for k, v in state.items():
                tensors.setdefault(k, v)
        config_raw, files = parts[0][1]
        await asyncio.to_thread(_write_checkpoint, dest, tensors, config_raw, files,
                                self.spec, self.job.id)
        self.saved = str(dest)
        self.job.update(saved=str(dest), saved_step=step)
        await self.req.partial(MsgType.TRAIN_RUN, {"event": "saved", "step": step,
                                                   "path": str(dest)})

    async def _fetch(self, st: Stage) -> tuple[dict[str, torch.Tensor],
                                               tuple[dict[str, Any], dict[str, bytes]]]:
        state: dict[str, torch.Tensor] = {}
        try:
            async for frame in self.cluster.stream(
                    st.node_id, MsgType.TRAIN_SAVE, {"job": self.job.id, "rid": st.rid},
                    idle_timeout=STEP_TIMEOUT):
                got = unpack_tensors(frame.meta.get("tensors"), frame.payload)
                if frame.is_partial:
                    state.update({k: v.clone() for k, v in got.items()})
                    continue
                config_raw = frame.meta.get("config") or {}
                files = {k: bytes(v.numpy().tobytes()) for k, v in got.items()}
                return state, (config_raw, files)
        except RemoteError as e:
            raise StageFailed(st, e.code, e.message) from e
        except ProtocolError as e:
            raise StageFailed(st, e.code, e.message) from e
        except ConnectionClosed as e:
            raise StageFailed(st, ErrorCode.PEER_DOWN, f"the node died or left ({e})") from e
        except TimeoutError as e:
            raise StageFailed(st, ErrorCode.TIMEOUT, "TRAIN_SAVE timed out") from e
        raise StageFailed(st, ErrorCode.INTERNAL, "TRAIN_SAVE ended without a final answer")


def _write_checkpoint(dest: Path, tensors: dict[str, torch.Tensor], config_raw: dict[str, Any],
                      files: Mapping[str, bytes], spec: RunSpec, job_id: str) -> None:
    """Write the assembled checkpoint beside ``dest`` and rename it into place."""
    dest = dest.expanduser()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{job_id}-{uuid.uuid4().hex[:6]}")
    try:
        if spec.lora is not None:
            save_adapter(tensors, spec.lora, tmp, base_model=spec.model)
        else:
            _write_full(tmp, tensors, config_raw)
        for name, data in files.items():
            if "/" in name or name.startswith("."):
                continue
            (tmp / name).write_bytes(data)
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_full(out: Path, tensors: dict[str, torch.Tensor], config_raw: dict[str, Any]) -> None:
    from p2pllm.engine.loader import save_hf_checkpoint

    config = ModelConfig.from_dict(dict(config_raw))
    with torch.device("meta"):
        model = ModelSlice(config)
    state = {}
    for key, t in tensors.items():
        name = key.removeprefix("model.") if key.startswith("model.") else key
        state[name] = t
    missing, _ = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still = [n for n, p in model.named_parameters() if p.is_meta]
    if still:
        raise ModelError(f"the stages did not send every tensor: missing {still[:5]}")
    save_hf_checkpoint([model], config, out)


def _replace_dir(tmp: Path, dest: Path) -> None:
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:6]}")
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dest)


def check_save_dir(path: str) -> None:
    """A --save directory must be new, empty, or a checkpoint this trainer may replace."""
    p = Path(path).expanduser()
    if not p.exists():
        return
    if not p.is_dir():
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"--save {p} exists and is not a directory")
    if any(p.iterdir()) and not ((p / "config.json").is_file()
                                 or (p / "adapter_config.json").is_file()):
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f"--save {p} is a non-empty directory that is not a checkpoint; "
                            f"choose a new or empty directory")
