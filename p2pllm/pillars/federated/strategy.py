"""The server side of one round, as pure functions: screen the updates, then update the global.

``screen`` keeps the updates that fit the global adapter (keys, shapes, dtypes, finite values,
a positive example count) and gives the others back with a reason; ``server_update`` aggregates
the kept ones weighted by example count (FedAvg) and applies server momentum (FedAvgM).
No sockets, no models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral

from torch import Tensor

from p2pllm.pillars.federated.aggregate import AggregationError, FedAvgM, aggregate, validate_update

Params = Mapping[str, Tensor]


@dataclass(frozen=True)
class ClientUpdate:
    """One client's answer to FL_TRAIN."""

    client: str  # node id
    tensors: Params
    num_examples: int
    train_loss: float


@dataclass(frozen=True)
class Screened:
    accepted: list[ClientUpdate]  # sorted by client id: aggregation order is reproducible
    rejected: list[tuple[str, str]]  # (client id, reason)


def screen(global_params: Params, updates: Sequence[ClientUpdate]) -> Screened:
    """Split updates into those that may be averaged in and those rejected (with why)."""
    accepted: list[ClientUpdate] = []
    rejected: list[tuple[str, str]] = []
    for u in updates:
        n = u.num_examples
        if isinstance(n, bool) or not isinstance(n, Integral) or n <= 0:
            rejected.append((u.client, f"num_examples must be a positive int, got {n!r}"))
            continue
        try:
            validate_update(u.tensors, global_params)
        except AggregationError as exc:
            rejected.append((u.client, str(exc)))
            continue
        accepted.append(u)
    accepted.sort(key=lambda u: u.client)
    return Screened(accepted, rejected)


def server_update(
    global_params: Params,
    accepted: Sequence[ClientUpdate],
    aggregation: str = "fedavg",
    *,
    server_lr: float = 1.0,
    momentum: float = 0.9,
    velocity: Params | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """(new global, new velocity): the example-weighted mean, then FedAvgM's step if asked.

    fedavg: global' = Σ n_i·w_i / Σ n_i (velocity stays None).
    fedavgm: v' = momentum·v + (global − mean); global' = global − server_lr·v'.
    """
    mean = aggregate([(u.tensors, int(u.num_examples)) for u in accepted])
    if aggregation == "fedavg":
        return mean, None
    if aggregation == "fedavgm":
        return FedAvgM(server_lr=server_lr, momentum=momentum).step(global_params, mean, velocity)
    raise ValueError(f"unknown aggregation {aggregation!r}; use fedavg or fedavgm")


def weighted_mean(values: Sequence[float], weights: Sequence[int]) -> float | None:
    """Σ w·v / Σ w over the finite values; None when there are none."""
    pairs = [(float(v), int(w)) for v, w in zip(values, weights, strict=True) if math.isfinite(v) and w > 0]
    total = sum(w for _, w in pairs)
    if not total:
        return None
    return sum(v * w for v, w in pairs) / total
