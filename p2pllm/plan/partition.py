"""Memory-weighted contiguous layer partition for split inference and split training.

In the spirit of exo's memory-weighted ring: an ordered list of nodes (pipeline order) gets
contiguous layer ranges proportional to each node's free memory, every node at least one layer,
no node over its budget. Pure and exact (integer / rational arithmetic), so every peer that runs
it on the same inputs gets the same plan.

Cost model: each transformer layer costs ``layer_bytes`` (weights, plus whatever per-layer KV or
activation reserve the caller folds in); the first stage also holds ``first_extra_bytes``
(embedding), the last ``last_extra_bytes`` (final norm + LM head); one node alone holds both.

Algorithm (:func:`partition_layers`):

1. capacity of node i = ⌊(free_i − its extras) / layer_bytes⌋ layers (unbounded if
   layer_bytes = 0); a node that cannot hold one layer, or a total capacity below
   ``num_layers``, is a :class:`PlanError` naming each node that lacks bytes and how many;
2. continuous shares x_i = clamp(λ·free_i, 1, capacity_i), with λ solved exactly so that
   Σ x_i = num_layers (water-filling: unclamped nodes stay exactly proportional to free memory);
3. largest-remainder rounding: ⌊x_i⌋ each, the leftover layers to the largest fractional parts
   (earlier node first on ties); bounds are integers, so rounding keeps every node in bounds;
4. consecutive ranges in node order.

Size: one module because the partition, the checks of explicit ranges and the one PlanError
of every planner share one set of invariants (contiguous, covering, within budget).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from p2pllm.wire.messages import ErrorCode

__all__ = [
    "LayerRange",
    "NodeBudget",
    "PlanError",
    "assign_layer_ranges",
    "check_layer_ranges",
    "parse_layer_ranges",
    "partition_layers",
    "stage_bytes",
]


class PlanError(ValueError):
    """A plan that cannot be made or ranges that are not valid: the one planning error of
    every planner (layer partitions, role placement, node lookups).

    ``shortfalls`` maps node id → bytes it lacks, when the failure is a budget one; ``code``
    is the ErrorCode a coordinator answers with (None: the caller decides).
    """

    def __init__(self, message: str, *, shortfalls: dict[str, int] | None = None,
                 code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.shortfalls: dict[str, int] = dict(shortfalls or {})
        self.code = code


@dataclass(frozen=True)
class NodeBudget:
    """A node that can host a stage, with the memory it may spend on it."""

    node_id: str
    free_bytes: int

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not self.node_id:
            raise PlanError(f"node_id must be a non-empty string, got {self.node_id!r}")
        if (
            isinstance(self.free_bytes, bool)
            or not isinstance(self.free_bytes, int)
            or self.free_bytes < 0
        ):
            raise PlanError(
                f"node {self.node_id}: free_bytes must be an int >= 0, got {self.free_bytes!r}"
            )


@dataclass(frozen=True)
class LayerRange:
    """Layers [start, end) on ``node_id``; ``planned_bytes`` is what the cost model charges."""

    node_id: str
    start: int
    end: int
    planned_bytes: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise PlanError(f"node {self.node_id}: invalid layer range [{self.start}, {self.end})")

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    def as_tuple(self) -> tuple[int, int]:
        return (self.start, self.end)


def stage_bytes(
    start: int,
    end: int,
    num_layers: int,
    *,
    layer_bytes: int,
    first_extra_bytes: int = 0,
    last_extra_bytes: int = 0,
) -> int:
    """Bytes a stage holding layers [start, end) of ``num_layers`` costs under the cost model."""
    total = (end - start) * layer_bytes
    if start == 0:
        total += first_extra_bytes
    if end == num_layers:
        total += last_extra_bytes
    return total


def partition_layers(
    num_layers: int,
    budgets: Sequence[NodeBudget],
    *,
    layer_bytes: int,
    first_extra_bytes: int = 0,
    last_extra_bytes: int = 0,
) -> list[LayerRange]:
    """Split ``num_layers`` into contiguous ranges over ``budgets`` (in pipeline order).

    Returns one LayerRange per node, in order, covering [0, num_layers) exactly once, each node
    at least one layer, sizes proportional to ``free_bytes`` where budgets allow (see module doc).
    Raises :class:`PlanError` when it cannot fit, naming each node that lacks bytes.
    """
    _check_costs(num_layers, layer_bytes, first_extra_bytes, last_extra_bytes)
    _check_budgets(budgets)
    n = len(budgets)
    if n > num_layers:
        raise PlanError(
            f"{n} nodes but only {num_layers} layers: every node needs at least one layer"
        )
    last = n - 1
    costs = dict(
        layer_bytes=layer_bytes,
        first_extra_bytes=first_extra_bytes,
        last_extra_bytes=last_extra_bytes,
    )

    # 1. capacities (None = unbounded)
    extras = [
        (first_extra_bytes if i == 0 else 0) + (last_extra_bytes if i == last else 0)
        for i in range(n)
    ]
    caps: list[int | None] = []
    for b, extra in zip(budgets, extras, strict=True):
        room = b.free_bytes - extra
        if layer_bytes == 0:
            caps.append(None if room >= 0 else -1)
        else:
            caps.append(room // layer_bytes if room >= 0 else -1)
    lacking = {
        b.node_id: extra + layer_bytes - b.free_bytes
        for b, extra, cap in zip(budgets, extras, caps, strict=True)
        if cap is not None and cap < 1
    }
    if lacking:
        raise PlanError(
            "cannot fit a stage: "
            + "; ".join(
                f"node {node} lacks {short} bytes (a stage needs {short + _free(budgets, node)}, "
                f"it has {_free(budgets, node)} free)"
                for node, short in lacking.items()
            ),
            shortfalls=lacking,
        )
    if all(c is not None for c in caps) and sum(c for c in caps if c is not None) < num_layers:
        _raise_total_shortfall(num_layers, budgets, costs)

    # 2. continuous shares by water-filling (exact rationals)
    weights = [b.free_bytes for b in budgets]
    if sum(weights) == 0:  # only possible when nothing costs memory
        weights = [1] * n
    shares = _water_fill(num_layers, weights, caps)

    # 3. largest-remainder rounding
    counts = [s.numerator // s.denominator for s in shares]
    leftover = num_layers - sum(counts)
    order = sorted(range(n), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in order[:leftover]:
        counts[i] += 1

    # 4. contiguous ranges
    out: list[LayerRange] = []
    start = 0
    for b, count in zip(budgets, counts, strict=True):
        end = start + count
        out.append(LayerRange(b.node_id, start, end, stage_bytes(start, end, num_layers, **costs)))
        start = end
    return out


def assign_layer_ranges(
    ranges: Sequence[tuple[int, int]],
    budgets: Sequence[NodeBudget],
    num_layers: int,
    *,
    layer_bytes: int,
    first_extra_bytes: int = 0,
    last_extra_bytes: int = 0,
) -> list[LayerRange]:
    """Pair user-given ranges (e.g. from ``--layers``) with nodes in order and check budgets.

    Raises :class:`PlanError` if the ranges are invalid, their number differs from the nodes',
    or a node lacks memory for its range (naming every such node and the bytes it lacks).
    """
    _check_costs(num_layers, layer_bytes, first_extra_bytes, last_extra_bytes)
    _check_budgets(budgets)
    check_layer_ranges(ranges, num_layers)
    if len(ranges) != len(budgets):
        raise PlanError(f"{len(ranges)} layer ranges for {len(budgets)} nodes")
    out = []
    lacking: dict[str, int] = {}
    for (start, end), b in zip(ranges, budgets, strict=True):
        need = stage_bytes(
            start,
            end,
            num_layers,
            layer_bytes=layer_bytes,
            first_extra_bytes=first_extra_bytes,
            last_extra_bytes=last_extra_bytes,
        )
        if need > b.free_bytes:
            lacking[b.node_id] = need - b.free_bytes
        out.append(LayerRange(b.node_id, start, end, need))
    if lacking:
        raise PlanError(
            "layer ranges do not fit: "
            + "; ".join(
                f"node {r.node_id} lacks {lacking[r.node_id]} bytes for layers [{r.start}, {r.end}) "
                f"(needs {r.planned_bytes}, has {_free(budgets, r.node_id)} free)"
                for r in out
                if r.node_id in lacking
            ),
            shortfalls=lacking,
        )
    return out


_RANGE_RE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def parse_layer_ranges(spec: str, num_layers: int) -> list[tuple[int, int]]:
    """Parse ``"0-7,7-16"`` (half-open ranges, pipeline order) and check it covers the model.

    Raises :class:`PlanError` on bad syntax, empty or out-of-range ranges, overlaps and gaps.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise PlanError("layer ranges: empty specification; expected e.g. '0-7,7-16'")
    ranges = []
    for i, part in enumerate(spec.split(","), start=1):
        m = _RANGE_RE.match(part)
        if m is None:
            raise PlanError(
                f"layer ranges: range #{i} {part.strip()!r} is not START-END (e.g. '0-7')"
            )
        ranges.append((int(m.group(1)), int(m.group(2))))
    check_layer_ranges(ranges, num_layers)
    return ranges


def check_layer_ranges(ranges: Sequence[tuple[int, int]], num_layers: int) -> None:
    """Check that half-open ranges, in order, tile [0, num_layers) exactly once.

    Raises :class:`PlanError` naming the first problem: empty or out-of-range range, wrong
    order, overlap, gap (including an uncovered start or end).
    """
    if num_layers < 1:
        raise PlanError(f"num_layers must be >= 1, got {num_layers}")
    if len(ranges) == 0:
        raise PlanError("layer ranges: none given")
    for i, (start, end) in enumerate(ranges, start=1):
        if start < 0 or end > num_layers:
            raise PlanError(
                f"layer ranges: range #{i} {start}-{end} is out of range: the model has layers 0-{num_layers}"
            )
        if start >= end:
            raise PlanError(
                f"layer ranges: range #{i} {start}-{end} is empty (END must exceed START)"
            )
    for i in range(1, len(ranges)):
        if ranges[i][0] < ranges[i - 1][0]:
            raise PlanError(
                f"layer ranges: out of order, range #{i + 1} {ranges[i][0]}-{ranges[i][1]} starts "
                f"before range #{i} {ranges[i - 1][0]}-{ranges[i - 1][1]}; list them in layer order"
            )
    prev_end = 0
    for i, (start, end) in enumerate(ranges, start=1):
        if start < prev_end:
            raise PlanError(
                f"layer ranges: range #{i} {start}-{end} overlaps the layers before it "
                f"(they end at {prev_end})"
            )
        if start > prev_end:
            raise PlanError(f"layer ranges: gap, layers {prev_end}-{start} are not covered")
        prev_end = end
    if prev_end != num_layers:
        raise PlanError(f"layer ranges: gap, layers {prev_end}-{num_layers} are not covered")


# ---------------------------------------------------------------------------------------------


def _water_fill(total: int, weights: Sequence[int], caps: Sequence[int | None]) -> list[Fraction]:
    """x_i = clamp(λ·w_i, 1, cap_i) with Σ x_i = total; exact. Assumes n <= total <= Σ cap."""

    def filled(lam: Fraction) -> list[Fraction]:
        out = []
        for w, cap in zip(weights, caps, strict=True):
            x = max(Fraction(1), lam * w)
            out.append(x if cap is None else min(x, Fraction(cap)))
        return out

    # f(λ) = Σ x_i(λ) is continuous, piecewise linear and non-decreasing; its breakpoints are
    # where a node leaves the lower bound (λ = 1/w) or reaches its cap (λ = cap/w).
    points = sorted(
        {Fraction(0)}
        | {Fraction(1, w) for w in weights if w > 0}
        | {Fraction(c, w) for w, c in zip(weights, caps, strict=True) if w > 0 and c is not None}
    )
    lo = points[0]
    for pt in points:
        if sum(filled(pt)) >= total:
            break
        lo = pt
    else:  # past the last breakpoint f grows linearly without bound (some node is uncapped)
        pt = lo + 1
        while sum(filled(pt)) < total:
            pt = lo + (pt - lo) * 2
    hi = pt
    # f is linear on [lo, hi]: interpolate
    f_lo, f_hi = sum(filled(lo)), sum(filled(hi))
    lam = hi if f_hi == f_lo else lo + (hi - lo) * (total - f_lo) / (f_hi - f_lo)
    shares = filled(lam)
    if sum(shares) != total:  # an invariant of the construction, not an input error
        raise RuntimeError(f"water-filling gave {sum(shares)} layers, expected {total}")
    return shares


def _raise_total_shortfall(
    num_layers: int, budgets: Sequence[NodeBudget], costs: dict[str, int]
) -> None:
    # Report against the unconstrained memory-proportional plan: some nodes must exceed budget.
    weights = [b.free_bytes for b in budgets]
    shares = _water_fill(num_layers, weights, [None] * len(budgets))
    counts = [s.numerator // s.denominator for s in shares]
    order = sorted(range(len(budgets)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in order[: num_layers - sum(counts)]:
        counts[i] += 1
    lacking: dict[str, int] = {}
    details = []
    start = 0
    for b, count in zip(budgets, counts, strict=True):
        end = start + count
        need = stage_bytes(start, end, num_layers, **costs)
        if need > b.free_bytes:
            lacking[b.node_id] = need - b.free_bytes
            details.append(
                f"node {b.node_id} lacks {need - b.free_bytes} bytes for layers [{start}, {end}) "
                f"(needs {need}, has {b.free_bytes} free)"
            )
        start = end
    total_need = stage_bytes(0, num_layers, num_layers, **costs)
    total_free = sum(b.free_bytes for b in budgets)
    raise PlanError(
        f"the model does not fit: {num_layers} layers need at least {total_need} bytes over "
        f"{len(budgets)} nodes with {total_free} free; " + "; ".join(details),
        shortfalls=lacking,
    )


def _check_costs(
    num_layers: int, layer_bytes: int, first_extra_bytes: int, last_extra_bytes: int
) -> None:
    if num_layers < 1:
        raise PlanError(f"num_layers must be >= 1, got {num_layers}")
    for name, value in (
        ("layer_bytes", layer_bytes),
        ("first_extra_bytes", first_extra_bytes),
        ("last_extra_bytes", last_extra_bytes),
    ):
        if value < 0:
            raise PlanError(f"{name} must be >= 0, got {value}")


def _check_budgets(budgets: Sequence[NodeBudget]) -> None:
    if len(budgets) == 0:
        raise PlanError("no nodes to place layers on")
    seen: set[str] = set()
    for b in budgets:
        if b.node_id in seen:
            raise PlanError(f"node {b.node_id} appears twice")
        seen.add(b.node_id)


def _free(budgets: Sequence[NodeBudget], node_id: str) -> int:
    return next(b.free_bytes for b in budgets if b.node_id == node_id)
