"""Where the stages of a split-training job go (pure: the request and node descriptions in,
stages out), and the cost model the plan charges each node's memory with.

Stages go on the nodes the request names, in order, or on nodes that take the train-stage
role and have the model: this node first (the dataset path is usually local), then those with
the most free memory; layers as given or in proportion to free memory. When the request wants
more stages than those nodes, nodes that lack the model join (tier FETCH: they fetch their
stage's layers from the nodes that hold it whole; the stage carries the fetch's bytes and
time). Nodes the JobRunner excluded (they refused, or were lost) are left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from p2pllm.daemon.cluster import (
    FETCH,
    FetchCost,
    advertised_disk_bytes,
    fetch_estimate,
    find_node,
    has_model,
    label,
    model_disk_bytes,
    model_tier,
    takes_role,
)
from p2pllm.daemon.runner import Exclusions
from p2pllm.engine.config import ModelConfig
from p2pllm.engine.errors import ModelError
from p2pllm.pillars.splittrain.compute import lora_meta
from p2pllm.pillars.splittrain.messages import RunSpec
from p2pllm.plan.layers import StageCost, free_bytes, model_stage_cost, plan_stages
from p2pllm.plan.partition import NodeBudget, PlanError, parse_layer_ranges
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode

__all__ = ["ROLE", "Stage", "plan", "plan_stages_for", "stage_cost", "stage_params"]

ROLE = "train-stage"
BYTES_PER_PARAM_FULL = 16  # float32 weight, gradient, two AdamW moments
BYTES_PER_PARAM_LORA = 4  # frozen float32 weights (adapters are small)


@dataclass(frozen=True)
class Stage:
    """A planned stage: which node, which layers."""

    index: int
    node_id: str
    name: str
    start: int
    end: int
    fetch: FetchCost | None = None  # the node lacks the model: its layers come from peers

    @property
    def rid(self) -> str:
        return f"stage{self.index}"

    @property
    def sources(self) -> tuple[str, ...]:
        return self.fetch.sources if self.fetch is not None else ()

    def summary(self) -> str:
        """What ``ctl jobs`` shows of the stage: its layers (and its fetch)."""
        return f"layers {self.start}-{self.end}" + (
            f" ({self.fetch.text()})" if self.fetch is not None else "")

    def describe(self) -> str:
        return (f"stage {self.index} (layers {self.start}-{self.end}) on {self.name} "
                f"({self.node_id[:8]})")

    def neighbour(self) -> dict[str, str]:
        return {"node": self.node_id, "rid": self.rid, "name": self.name}


def _find(nodes: Sequence[Mapping[str, Any]], text: str) -> Mapping[str, Any]:
    try:
        return find_node(nodes, text)
    except PlanError as e:
        code = e.code or ErrorCode.NOT_FOUND
        raise ProtocolError(code, f"--nodes: {e}") from e


def stage_cost(spec: RunSpec, nodes: Sequence[Mapping[str, Any]],
               local: str | Path | None) -> tuple[StageCost, bool]:
    """The cost model of the job's model, and whether its config ties embedding and head.
    ``local``: the coordinator's copy, resolved in its own roots (daemon/modelrefs), None when
    it lacks the model."""
    per_param = BYTES_PER_PARAM_LORA if spec.lora is not None else BYTES_PER_PARAM_FULL
    local_error: Exception = ModelError("looked under this node's --models-dir, pulled, bundled "
                                        "and hub-cache models; a hub download needs --allow-hub")
    if local is not None:
        try:
            config = ModelConfig.from_dir(local)
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
        chosen = [_find(nodes, t) for t in spec.nodes]
    else:
        cands = sorted((n for n in nodes if takes_role(n.get("caps") or {}, ROLE)),
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


def stage_params(spec: RunSpec, stages: Sequence[Stage], st: Stage,
                 cost: StageCost, data_bytes: int | None = None) -> dict[str, Any]:
    """The ASSIGN params of stage ``st`` of the plan ``stages`` (protocol.md section 11);
    ``data_bytes``: the length of the dataset's content the CLI sent (stage 0 gets it in
    TRAIN_DATA)."""
    k, n = st.index, len(stages)
    s = spec
    tied_peer = None
    if n > 1 and k in (0, n - 1):
        tied_peer = stages[n - 1 if k == 0 else 0].neighbour()
    return {
        "model": s.model, "layers": [st.start, st.end], "index": k, "num_stages": n,
        "prev": stages[k - 1].neighbour() if k > 0 else None,
        "next": stages[k + 1].neighbour() if k < n - 1 else None,
        "tied_peer": tied_peer, "data": s.data if k == 0 else None,
        "data_format": s.data_format if k == 0 else None,
        "data_bytes": data_bytes if k == 0 and s.data_format is not None else None,
        "seq_len": s.seq_len, "batch_size": s.batch_size, "micro_batches": s.micro_batches,
        "schedule": s.schedule, "steps": s.steps, "seed": s.seed, "shuffle": s.shuffle,
        "init": s.init, "optim": s.optim.to_meta(),
        "lora": lora_meta(s.lora) if s.lora is not None else None,
        "memory_bytes": cost.stage_bytes(st.start, st.end),
        "sources": list(st.sources),
    }


def plan_stages_for(spec: RunSpec, nodes: Sequence[Mapping[str, Any]], cost: StageCost,
                    excluded: Exclusions, local_path: str | None,
                    model_dir: str | Path | None = None) -> list[Stage]:
    """The stages over the nodes the JobRunner offers: without the excluded ones, and (unless
    the request names its nodes) on nodes that have the model, then, when more stages are
    wanted than they can take, on nodes that can fetch it (a stage on a node that lacks the
    model, named in --nodes or taken here, carries the fetch and its sources).
    ``model_dir``: the coordinator's copy (its size on disk prices the fetch; else the
    sources' advertised ``disk_bytes``)."""
    if spec.nodes:
        chosen = [_find(nodes, t) for t in spec.nodes]
        barred = [f"{label(n)}: {excluded.reason(n['node_id'], ROLE)}" for n in chosen
                  if not excluded.allows(n["node_id"], ROLE)]
        if barred:
            raise PlanError("the nodes given with --nodes cannot all take their stage: "
                            + "; ".join(barred), code=ErrorCode.REFUSED)
        return _with_fetch(plan(spec, nodes, cost), spec, nodes, cost, local_path, model_dir)
    lacking = [n for n in nodes if not _has_model(n, spec.model, local_path)]
    usable = [n for n in nodes if _has_model(n, spec.model, local_path)]
    if not usable:
        names = ", ".join(str(n["name"]) for n in lacking) or "none"
        raise PlanError(f"no node has {spec.model!r} (without it: {names})",
                        code=ErrorCode.NOT_FOUND)
    allowed = [n for n in usable if excluded.allows(n["node_id"], ROLE)]
    want = spec.stages
    if want is None and spec.layers is not None:
        want = spec.layers.count(",") + 1
    fetchers = [n for n in lacking if excluded.allows(n["node_id"], ROLE)
                and takes_role(n.get("caps") or {}, ROLE)
                and model_tier(nodes, n, spec.model)[0] == FETCH]
    if want is not None and want > len(allowed) and fetchers:
        extra = {n["node_id"] for n in fetchers[:want - len(allowed)]}
        allowed = [n for n in nodes if n in allowed or n["node_id"] in extra]
    return _with_fetch(plan(spec, allowed, cost), spec, nodes, cost, local_path, model_dir)


def _with_fetch(stages: list[Stage], spec: RunSpec, nodes: Sequence[Mapping[str, Any]],
                cost: StageCost, local_path: str | None,
                model_dir: str | Path | None) -> list[Stage]:
    """The stages, those on a node that lacks the model with their fetch (sources, bytes: the
    model's size on disk times the stage's share of the plan's cost, seconds)."""
    out = []
    disk: int | None = None
    by_id = {n["node_id"]: n for n in nodes}
    for st in stages:
        n = by_id.get(st.node_id)
        if n is None or _has_model(n, spec.model, local_path):
            out.append(st)
            continue
        tier, _, sources = model_tier(nodes, n, spec.model)
        if tier != FETCH:
            out.append(st)  # the node says why on ASSIGN (it may have it unlisted)
            continue
        if disk is None:
            disk = (model_disk_bytes(model_dir) if model_dir is not None else
                    advertised_disk_bytes(nodes, spec.model, sources) or 0)
        whole = cost.stage_bytes(0, cost.num_layers)
        share = cost.stage_bytes(st.start, st.end) / whole if whole > 0 else 1.0
        nbytes = min(disk, round(disk * share))
        out.append(replace(st, fetch=fetch_estimate(nodes, st.node_id, sources, nbytes)))
    return out


def _has_model(node: Mapping[str, Any], model: str, local_path: str | None) -> bool:
    """Whether a node lists the model by its name (or may have it: a nested name or hub id),
    or ``local_path`` is set: the user named a path, resolved inside the coordinator's roots,
    which other nodes may share (each resolves the name in its own roots on ASSIGN)."""
    return local_path is not None or has_model(node.get("caps") or {}, model)[0] > 0
