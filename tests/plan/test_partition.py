"""Tests for the memory-weighted contiguous layer partition."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pllm.plan.partition import (
    LayerRange,
    NodeBudget,
    PlanError,
    assign_layer_ranges,
    check_layer_ranges,
    parse_layer_ranges,
    partition_layers,
    stage_bytes,
)

GB = 1 << 30


def nodes(*free: int) -> list[NodeBudget]:
    return [NodeBudget(f"n{i}", f) for i, f in enumerate(free)]


def counts(plan: list[LayerRange]) -> list[int]:
    return [r.num_layers for r in plan]


def assert_tiles(plan: list[LayerRange], num_layers: int) -> None:
    assert plan[0].start == 0 and plan[-1].end == num_layers
    for a, b in itertools.pairwise(plan):
        assert a.end == b.start
    assert all(r.num_layers >= 1 for r in plan)


# ---------------------------------------------------------------------------------------------
# partition_layers: examples
# ---------------------------------------------------------------------------------------------


def test_proportional_to_free_memory() -> None:
    plan = partition_layers(16, nodes(8 * GB, 4 * GB, 4 * GB), layer_bytes=GB // 4)
    assert [r.as_tuple() for r in plan] == [(0, 8), (8, 12), (12, 16)]
    assert [r.node_id for r in plan] == ["n0", "n1", "n2"]
    assert plan[0].planned_bytes == 8 * (GB // 4)


def test_order_is_pipeline_order() -> None:
    plan = partition_layers(12, nodes(1 * GB, 2 * GB), layer_bytes=0)
    assert [r.as_tuple() for r in plan] == [(0, 4), (4, 12)]


def test_largest_remainder_rounding() -> None:
    # quotas 10·(5, 3, 2)/10 → exact; 7·(5, 3, 2)/10 = 3.5, 2.1, 1.4 → floors 3, 2, 1, the
    # leftover layer goes to the largest remainder (3.5)
    assert counts(partition_layers(10, nodes(5, 3, 2), layer_bytes=0)) == [5, 3, 2]
    assert counts(partition_layers(7, nodes(5, 3, 2), layer_bytes=0)) == [4, 2, 1]
    # ties go to the earlier node
    assert counts(partition_layers(3, nodes(1, 1), layer_bytes=0)) == [2, 1]


def test_every_node_gets_at_least_one_layer() -> None:
    assert counts(partition_layers(8, nodes(1000 * GB, GB, GB), layer_bytes=0)) == [6, 1, 1]


def test_single_node_takes_everything_with_both_extras() -> None:
    plan = partition_layers(
        4, nodes(100), layer_bytes=10, first_extra_bytes=20, last_extra_bytes=30
    )
    assert [r.as_tuple() for r in plan] == [(0, 4)]
    assert plan[0].planned_bytes == 90
    with pytest.raises(PlanError, match="n0 lacks 1 bytes"):
        partition_layers(4, nodes(89), layer_bytes=10, first_extra_bytes=20, last_extra_bytes=30)


def test_budgets_bind_and_the_rest_stays_proportional() -> None:
    # By memory n0 would get 12·100/180 ≈ 6.7 layers, but after the 50 B embedding it has room
    # for 5; the other 7 go to n1 and n2 in proportion 1 : 1 (3.5 each), the tie to the earlier.
    plan = partition_layers(
        12, nodes(100, 40, 40), layer_bytes=10, first_extra_bytes=50, last_extra_bytes=0
    )
    assert counts(plan) == [5, 4, 3]
    assert [r.planned_bytes for r in plan] == [100, 40, 30]


def test_budget_failure_names_the_node_and_the_bytes() -> None:
    # n1 cannot hold a single layer
    with pytest.raises(PlanError, match="node n1 lacks 30 bytes") as info:
        partition_layers(8, nodes(1000, 70, 1000), layer_bytes=100)
    assert info.value.shortfalls == {"n1": 30}
    # the last node must also hold the LM head
    with pytest.raises(PlanError, match="node n1 lacks 50 bytes") as info:
        partition_layers(8, nodes(1000, 1000), layer_bytes=100, last_extra_bytes=950)
    assert info.value.shortfalls == {"n1": 50}


def test_total_shortfall_names_the_nodes_over_budget() -> None:
    # 16 layers × 100 B = 1600 B but only 1200 B free in all
    with pytest.raises(PlanError, match="does not fit") as info:
        partition_layers(16, nodes(600, 300, 300), layer_bytes=100)
    msg = str(info.value)
    # proportional plan: 8, 4, 4 layers → 800, 400, 400 bytes
    assert "node n0 lacks 200 bytes for layers [0, 8)" in msg
    assert "node n1 lacks 100 bytes" in msg and "node n2 lacks 100 bytes" in msg
    assert info.value.shortfalls == {"n0": 200, "n1": 100, "n2": 100}


def test_bad_inputs() -> None:
    with pytest.raises(PlanError, match="3 nodes but only 2 layers"):
        partition_layers(2, nodes(1, 1, 1), layer_bytes=0)
    with pytest.raises(PlanError, match="no nodes"):
        partition_layers(2, [], layer_bytes=0)
    with pytest.raises(PlanError, match="appears twice"):
        partition_layers(4, [NodeBudget("a", 1), NodeBudget("a", 1)], layer_bytes=0)
    with pytest.raises(PlanError, match="num_layers"):
        partition_layers(0, nodes(1), layer_bytes=0)
    with pytest.raises(PlanError, match="layer_bytes"):
        partition_layers(4, nodes(1), layer_bytes=-1)
    with pytest.raises(PlanError, match="free_bytes"):
        NodeBudget("a", -5)
    with pytest.raises(PlanError, match="node_id"):
        NodeBudget("", 5)
    with pytest.raises(PlanError, match="invalid layer range"):
        LayerRange("a", 3, 3)
    assert issubclass(PlanError, ValueError)


def test_zero_free_memory_everywhere_with_free_layers() -> None:
    # nothing costs memory: equal split
    assert counts(partition_layers(9, nodes(0, 0, 0), layer_bytes=0)) == [3, 3, 3]


# ---------------------------------------------------------------------------------------------
# partition_layers: properties
# ---------------------------------------------------------------------------------------------

free_lists = st.lists(st.integers(min_value=0, max_value=64 * GB), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(
    num_layers=st.integers(min_value=1, max_value=120),
    free=free_lists,
    layer_bytes=st.integers(min_value=0, max_value=2 * GB),
    first_extra=st.integers(min_value=0, max_value=4 * GB),
    last_extra=st.integers(min_value=0, max_value=4 * GB),
)
def test_plan_is_valid_or_provably_impossible(
    num_layers: int, free: list[int], layer_bytes: int, first_extra: int, last_extra: int
) -> None:
    budgets = nodes(*free)
    costs = dict(
        layer_bytes=layer_bytes, first_extra_bytes=first_extra, last_extra_bytes=last_extra
    )
    # an independent feasibility check: capacities in layers, by position
    n, last = len(free), len(free) - 1
    caps = []
    for i, f in enumerate(free):
        room = f - (first_extra if i == 0 else 0) - (last_extra if i == last else 0)
        caps.append(-1 if room < 0 else (math.inf if layer_bytes == 0 else room // layer_bytes))
    feasible = n <= num_layers and min(caps) >= 1 and sum(caps) >= num_layers
    if not feasible:
        with pytest.raises(PlanError):
            partition_layers(num_layers, budgets, **costs)
        return
    plan = partition_layers(num_layers, budgets, **costs)
    # contiguous, covering, in node order, within budget
    assert_tiles(plan, num_layers)
    assert [r.node_id for r in plan] == [b.node_id for b in budgets]
    for r, b in zip(plan, budgets, strict=True):
        assert r.planned_bytes == stage_bytes(r.start, r.end, num_layers, **costs)
        assert r.planned_bytes <= b.free_bytes
    check_layer_ranges([r.as_tuple() for r in plan], num_layers)


@settings(max_examples=150, deadline=None)
@given(num_layers=st.integers(min_value=1, max_value=120), free=free_lists)
def test_unconstrained_plan_is_largest_remainder_of_memory_shares(
    num_layers: int, free: list[int]
) -> None:
    # With no memory cost and every quota ≥ 1, each node gets ⌊q⌋ or ⌈q⌉ of its quota
    # q = L·free/Σfree, and the ⌈q⌉ go to the largest fractional parts.
    total = sum(free)
    if total == 0 or any(num_layers * f < total for f in free):
        return
    got = counts(partition_layers(num_layers, nodes(*free), layer_bytes=0))
    assert sum(got) == num_layers
    for c, f in zip(got, free, strict=True):
        assert (num_layers * f) // total <= c <= -(-(num_layers * f) // total)
    up = [i for i, (c, f) in enumerate(zip(got, free, strict=True)) if c * total > num_layers * f]
    down = [i for i in range(len(free)) if i not in up]
    frac = [(num_layers * f) % total for f in free]
    if up and down:
        assert min(frac[i] for i in up) >= max(frac[i] for i in down)


@settings(max_examples=150, deadline=None)
@given(
    num_layers=st.integers(min_value=1, max_value=120),
    free=free_lists,
    layer_bytes=st.integers(min_value=0, max_value=GB),
)
def test_more_memory_never_means_fewer_layers(
    num_layers: int, free: list[int], layer_bytes: int
) -> None:
    # Without embedding/head extras, capacity is monotone in free memory, so is the share.
    try:
        plan = partition_layers(num_layers, nodes(*free), layer_bytes=layer_bytes)
    except PlanError:
        return
    for (a, fa), (b, fb) in itertools.combinations(zip(counts(plan), free, strict=True), 2):
        if fa > fb:
            assert a >= b
        elif fb > fa:
            assert b >= a


# ---------------------------------------------------------------------------------------------
# assign_layer_ranges
# ---------------------------------------------------------------------------------------------


def test_assign_layer_ranges_checks_budgets() -> None:
    plan = assign_layer_ranges(
        [(0, 3), (3, 8)], nodes(350, 500), 8, layer_bytes=100, first_extra_bytes=50
    )
    assert [(r.node_id, r.start, r.end, r.planned_bytes) for r in plan] == [
        ("n0", 0, 3, 350),
        ("n1", 3, 8, 500),
    ]
    with pytest.raises(PlanError, match=r"node n1 lacks 100 bytes for layers \[3, 8\)") as info:
        assign_layer_ranges(
            [(0, 3), (3, 8)], nodes(350, 400), 8, layer_bytes=100, first_extra_bytes=50
        )
    assert info.value.shortfalls == {"n1": 100}
    with pytest.raises(PlanError, match="2 layer ranges for 3 nodes"):
        assign_layer_ranges([(0, 3), (3, 8)], nodes(1, 1, 1), 8, layer_bytes=0)
    with pytest.raises(PlanError, match="gap"):
        assign_layer_ranges([(0, 3), (4, 8)], nodes(1, 1), 8, layer_bytes=0)


# ---------------------------------------------------------------------------------------------
# parse_layer_ranges
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "num_layers", "expected"),
    [
        ("0-7,7-16", 16, [(0, 7), (7, 16)]),
        ("0-16", 16, [(0, 16)]),
        (" 0 - 2 , 2-3,3-8 ", 8, [(0, 2), (2, 3), (3, 8)]),
    ],
)
def test_parse_layer_ranges(spec: str, num_layers: int, expected: list[tuple[int, int]]) -> None:
    assert parse_layer_ranges(spec, num_layers) == expected


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("0-8,6-16", "overlaps"),  # overlap
        ("8-16,0-8", "out of order"),
        ("0-4,4-8,2-16", "out of order"),
        ("0-7,8-16", "gap, layers 7-8 are not covered"),
        ("1-16", "gap, layers 0-1 are not covered"),
        ("0-7,7-15", "gap, layers 15-16 are not covered"),
        ("0-7,7-17", "out of range"),
        ("0-7,7-7,7-16", "empty"),
        ("0-7,9-8", "empty"),
        ("", "empty specification"),
        ("0-7;7-16", "not START-END"),
        ("0-7,", "not START-END"),
        ("0..7,7-16", "not START-END"),
        ("-1-7,7-16", "not START-END"),
        ("a-b", "not START-END"),
        ("7", "not START-END"),
    ],
)
def test_parse_layer_ranges_errors(spec: str, match: str) -> None:
    with pytest.raises(PlanError, match=match):
        parse_layer_ranges(spec, 16)


@settings(max_examples=100, deadline=None)
@given(cuts=st.sets(st.integers(min_value=1, max_value=63), max_size=10))
def test_parse_round_trips_any_tiling(cuts: set[int]) -> None:
    bounds = [0, *sorted(cuts), 64]
    ranges = list(itertools.pairwise(bounds))
    spec = ",".join(f"{a}-{b}" for a, b in ranges)
    assert parse_layer_ranges(spec, 64) == ranges
