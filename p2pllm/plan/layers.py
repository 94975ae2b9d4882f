"""From node capabilities to contiguous layer ranges: the glue split inference and split
training share, on top of :mod:`p2pllm.plan.partition`.

Three pure steps, each usable on its own:

1. :func:`free_bytes` — what a node may still spend, from its capability map:
   ``min(mem_free, mem_budget - mem_used_by_roles)``, never negative;
2. :func:`model_stage_cost` — what a layer, the embedding and the head cost for a model
   config, a bytes-per-parameter figure (2 or 4 for inference; more when a trainer keeps
   gradients and optimizer state) and an optional per-layer reserve (KV cache, activations);
3. :func:`plan_stages` — pick the nodes (``stages`` of them, the ones with the most free
   memory, in the order given) and give them contiguous ranges: proportional to free memory
   (:func:`~p2pllm.plan.partition.partition_layers`) or the ranges a user gave (``"0-7,7-16"``,
   checked and paired with the nodes in order by
   :func:`~p2pllm.plan.partition.assign_layer_ranges`).

Every failure is a :class:`~p2pllm.plan.partition.PlanError` whose message names the node
(by the ``node_id`` of its :class:`NodeBudget`, so give budgets readable ids such as
``"name(abcd1234)"`` if the message goes to a user).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from p2pllm.plan.partition import (
    LayerRange,
    NodeBudget,
    PlanError,
    assign_layer_ranges,
    check_layer_ranges,
    parse_layer_ranges,
    partition_layers,
)

__all__ = [
    "ModelShape",
    "StageCost",
    "free_bytes",
    "kv_bytes_per_token_layer",
    "model_stage_cost",
    "plan_stages",
]


class ModelShape(Protocol):
    """What the cost model reads from a model config (``p2pllm.engine.config.ModelConfig``)."""

    @property
    def num_layers(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def num_kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...

    def layer_param_count(self) -> int: ...


@dataclass(frozen=True)
class StageCost:
    """Bytes charged per decoder layer, and to the first (embedding) and last (norm + head)
    stage; a single stage pays both extras."""

    num_layers: int
    layer_bytes: int
    first_extra_bytes: int = 0
    last_extra_bytes: int = 0

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise PlanError(f"num_layers must be >= 1, got {self.num_layers}")
        for name in ("layer_bytes", "first_extra_bytes", "last_extra_bytes"):
            if getattr(self, name) < 0:
                raise PlanError(f"{name} must be >= 0, got {getattr(self, name)}")

    def stage_bytes(self, start: int, end: int) -> int:
        total = (end - start) * self.layer_bytes
        if start == 0:
            total += self.first_extra_bytes
        if end == self.num_layers:
            total += self.last_extra_bytes
        return total


def free_bytes(caps: Mapping[str, Any]) -> int:
    """Bytes a node may still give to roles: ``min(mem_free, mem_budget - mem_used_by_roles)``.

    Missing or malformed fields count as 0 (a node that does not say has nothing to give).
    """

    def num(key: str) -> int:
        v = caps.get(key, 0)
        return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0

    budget = num("mem_budget") - num("mem_used_by_roles")
    return max(0, min(num("mem_free"), budget))


def kv_bytes_per_token_layer(config: ModelShape, bytes_per_value: int) -> int:
    """KV cache bytes one token costs in one layer (keys and values)."""
    return 2 * config.num_kv_heads * config.head_dim * bytes_per_value


def model_stage_cost(
    config: ModelShape, *, bytes_per_param: int, reserve_bytes_per_layer: int = 0
) -> StageCost:
    """The cost model of a Llama-family decoder stored at ``bytes_per_param`` bytes a weight.

    Layer: its weights plus ``reserve_bytes_per_layer``. First stage: the embedding. Last
    stage: final norm and LM head (with tied embeddings a last stage that does not embed
    still holds a copy of the table as its head).
    """
    if bytes_per_param < 1 or reserve_bytes_per_layer < 0:
        raise PlanError("bytes_per_param must be >= 1 and the reserve >= 0")
    table = config.vocab_size * config.hidden_size
    return StageCost(
        num_layers=config.num_layers,
        layer_bytes=config.layer_param_count() * bytes_per_param + reserve_bytes_per_layer,
        first_extra_bytes=table * bytes_per_param,
        last_extra_bytes=(table + config.hidden_size) * bytes_per_param,
    )


def plan_stages(
    budgets: Sequence[NodeBudget],
    cost: StageCost,
    *,
    stages: int | None = None,
    layers: str | Sequence[tuple[int, int]] | None = None,
) -> list[LayerRange]:
    """Contiguous layer ranges, one per stage, in pipeline order, each on a distinct node.

    ``budgets``: the candidate nodes in preferred pipeline order. ``stages``: how many stages
    (default: one per candidate, at most one per layer). ``layers``: explicit ranges (a
    ``"0-7,7-16"`` string or pairs); their count is the number of stages. When fewer stages
    than candidates are wanted, the ones with the most free memory are used (ties: the
    earlier), keeping their order. Raises :class:`PlanError`.
    """
    n = cost.num_layers
    if not budgets:
        raise PlanError("no nodes to place layers on")
    ranges: list[tuple[int, int]] | None = None
    if layers is not None:
        if isinstance(layers, str):
            ranges = parse_layer_ranges(layers, n)
        else:
            ranges = [(int(a), int(b)) for a, b in layers]
            check_layer_ranges(ranges, n)
        if stages is not None and stages != len(ranges):
            raise PlanError(f"{stages} stages asked for, but the layer ranges give {len(ranges)}")
        count = len(ranges)
    else:
        count = stages if stages is not None else min(len(budgets), n)
    if count < 1:
        raise PlanError(f"the number of stages must be >= 1, got {count}")
    if count > n:
        raise PlanError(f"{count} stages but the model has only {n} layers: each stage needs one")
    if count > len(budgets):
        names = ", ".join(b.node_id for b in budgets)
        raise PlanError(f"{count} stages need {count} nodes, but only {len(budgets)} can take "
                        f"one ({names})")
    chosen = _most_free(budgets, count)
    costs = dict(layer_bytes=cost.layer_bytes, first_extra_bytes=cost.first_extra_bytes,
                 last_extra_bytes=cost.last_extra_bytes)
    if ranges is not None:
        return assign_layer_ranges(ranges, chosen, n, **costs)
    return partition_layers(n, chosen, **costs)


def _most_free(budgets: Sequence[NodeBudget], count: int) -> list[NodeBudget]:
    if count >= len(budgets):
        return list(budgets)
    order = sorted(range(len(budgets)), key=lambda i: (-budgets[i].free_bytes, i))
    keep = set(order[:count])
    return [b for i, b in enumerate(budgets) if i in keep]
