"""Federated aggregation: example-weighted FedAvg and server-momentum FedAvgM.

Pure functions over ``dict[str, Tensor]`` (LoRA adapter tensors by name), in the shape of
Flower's ``aggregate(results: list[tuple[NDArrays, int]])``. No sockets, no models.

The coordinator calls :func:`validate_update` on each client's answer against the current global
adapter first, drops (and counts) the clients that fail, then :func:`aggregate`s the rest;
``aggregate`` re-checks everything so that it is safe on its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral

import torch
from torch import Tensor

__all__ = ["AggregationError", "FedAvgM", "aggregate", "validate_update"]

Params = Mapping[str, Tensor]


class AggregationError(ValueError):
    """A client's update cannot be aggregated. ``client`` and ``key`` say where, when known."""

    def __init__(self, message: str, *, client: int | None = None, key: str | None = None) -> None:
        where = []
        if client is not None:
            where.append(f"client {client}")
        if key is not None:
            where.append(f"key {key!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.client = client
        self.key = key


def validate_update(update: Params, reference: Params, *, client: int | None = None) -> None:
    """Check one update against the reference tensors (usually the current global adapter).

    Same key set, and per key: a tensor of the same shape and dtype, floating point, all finite.
    Raises :class:`AggregationError` naming ``client`` and the offending key.
    """
    if not isinstance(update, Mapping):
        raise AggregationError(
            f"update must be a mapping of name -> tensor, got {type(update).__name__}",
            client=client,
        )
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if extra:
            parts.append(f"unexpected keys {extra}")
        key = (missing or extra)[0]
        raise AggregationError("; ".join(parts), client=client, key=key)
    for key, ref in reference.items():
        t = update[key]
        if not isinstance(t, Tensor):
            raise AggregationError(
                f"expected a tensor, got {type(t).__name__}", client=client, key=key
            )
        if t.shape != ref.shape:
            raise AggregationError(
                f"shape {tuple(t.shape)} differs from expected {tuple(ref.shape)}",
                client=client,
                key=key,
            )
        if t.dtype != ref.dtype:
            raise AggregationError(
                f"dtype {t.dtype} differs from expected {ref.dtype}", client=client, key=key
            )
        if not t.dtype.is_floating_point:
            raise AggregationError(f"dtype {t.dtype} is not floating point", client=client, key=key)
        if not bool(torch.isfinite(t).all()):
            raise AggregationError("contains NaN or Inf", client=client, key=key)


def aggregate(results: Sequence[tuple[Params, int]]) -> dict[str, Tensor]:
    """Example-weighted mean: Σ_i n_i·w_i / Σ_i n_i, per key.

    results: one (tensors, num_examples) per client; counts are positive ints.
    Accumulates in float64 and returns new tensors in the input dtype, on the first client's
    device. The first client's tensors fix the expected keys, shapes and dtypes.
    """
    if len(results) == 0:
        raise AggregationError("no results to aggregate")
    for i, entry in enumerate(results):
        if not isinstance(entry, tuple) or len(entry) != 2:
            raise AggregationError("each result must be a (tensors, num_examples) pair", client=i)
        count = entry[1]
        if isinstance(count, bool) or not isinstance(count, Integral):
            raise AggregationError(
                f"num_examples must be an int, got {type(count).__name__}", client=i
            )
        if count <= 0:
            raise AggregationError(f"num_examples must be > 0, got {count}", client=i)
    reference = results[0][0]
    for i, (update, _) in enumerate(results):
        validate_update(update, reference, client=i)

    total = float(sum(int(n) for _, n in results))
    out: dict[str, Tensor] = {}
    for key, ref in reference.items():
        acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
        for update, n in results:
            acc.add_(
                update[key].detach().to(device=ref.device, dtype=torch.float64), alpha=float(n)
            )
        out[key] = (acc / total).to(ref.dtype)
    return out


@dataclass(frozen=True)
class FedAvgM:
    """FedAvg with server momentum (Hsu et al. 2019; Flower's ``FedAvgM``).

    With Δ = global − aggregated (the pseudo-gradient) and v the velocity (zero at first):
        v' = momentum·v + Δ
        global' = global − server_lr·v'
    ``momentum = 0`` and ``server_lr = 1`` give plain FedAvg (global' = aggregated).
    The velocity is the only state; checkpoint it with the global adapter to resume exactly.
    """

    server_lr: float = 1.0
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if not self.server_lr > 0.0:
            raise ValueError(f"FedAvgM: server_lr must be > 0, got {self.server_lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"FedAvgM: momentum must be in [0, 1), got {self.momentum}")

    def step(
        self, global_params: Params, aggregated: Params, velocity: Params | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One server update: returns ``(new_global, new_velocity)``; inputs are not modified.

        new_global has the dtype of ``global_params``; the velocity is kept in at least float32.
        """
        validate_update(global_params, global_params)
        validate_update(aggregated, global_params)
        if velocity is not None:
            expected = {
                k: torch.empty(t.shape, dtype=_velocity_dtype(t.dtype), device="meta")
                for k, t in global_params.items()
            }
            validate_update(velocity, expected)
        new_global: dict[str, Tensor] = {}
        new_velocity: dict[str, Tensor] = {}
        for key, g in global_params.items():
            g64 = g.detach().to(torch.float64)
            delta = g64 - aggregated[key].detach().to(device=g.device, dtype=torch.float64)
            if velocity is None:
                v = delta
            else:
                v = (
                    self.momentum * velocity[key].detach().to(device=g.device, dtype=torch.float64)
                    + delta
                )
            new_global[key] = (g64 - self.server_lr * v).to(g.dtype)
            new_velocity[key] = v.to(_velocity_dtype(g.dtype))
        return new_global, new_velocity


def _velocity_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)
