"""The caps -> budgets -> layer ranges glue (p2pllm.plan.layers): pure, no sockets."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pllm.engine.config import ModelConfig
from p2pllm.plan.layers import (
    StageCost,
    free_bytes,
    kv_bytes_per_token_layer,
    model_stage_cost,
    plan_stages,
)
from p2pllm.plan.partition import NodeBudget, PlanError

GiB = 1 << 30


def cfg(**kw) -> ModelConfig:
    base = dict(model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=128,
                num_layers=8, num_heads=4, num_kv_heads=2, head_dim=16)
    base.update(kw)
    return ModelConfig(**base)


def test_free_bytes_is_the_smaller_of_free_memory_and_remaining_budget() -> None:
    assert free_bytes({"mem_free": 10, "mem_budget": 8, "mem_used_by_roles": 3}) == 5
    assert free_bytes({"mem_free": 4, "mem_budget": 8, "mem_used_by_roles": 0}) == 4
    assert free_bytes({"mem_free": 4, "mem_budget": 2, "mem_used_by_roles": 3}) == 0
    assert free_bytes({}) == 0
    assert free_bytes({"mem_free": "lots", "mem_budget": True}) == 0


def test_model_stage_cost_counts_weights_reserve_embedding_and_head() -> None:
    c = cfg()
    cost = model_stage_cost(c, bytes_per_param=4, reserve_bytes_per_layer=100)
    assert cost.layer_bytes == c.layer_param_count() * 4 + 100
    assert cost.first_extra_bytes == 1000 * 64 * 4
    assert cost.last_extra_bytes == (1000 * 64 + 64) * 4
    assert cost.stage_bytes(0, 8) == 8 * cost.layer_bytes + cost.first_extra_bytes + cost.last_extra_bytes
    assert cost.stage_bytes(2, 5) == 3 * cost.layer_bytes
    assert kv_bytes_per_token_layer(c, 2) == 2 * 2 * 16 * 2
    with pytest.raises(PlanError):
        model_stage_cost(c, bytes_per_param=0)


def test_ranges_follow_free_memory_and_cover_every_layer_once() -> None:
    cost = StageCost(num_layers=8, layer_bytes=1)
    plan = plan_stages([NodeBudget("a", GiB), NodeBudget("b", 3 * GiB)], cost)
    assert [(r.node_id, r.start, r.end) for r in plan] == [("a", 0, 2), ("b", 2, 8)]


def test_fewer_stages_take_the_nodes_with_most_memory_in_their_given_order() -> None:
    cost = StageCost(num_layers=6, layer_bytes=1)
    budgets = [NodeBudget("a", 1 * GiB), NodeBudget("b", 5 * GiB), NodeBudget("c", 5 * GiB)]
    plan = plan_stages(budgets, cost, stages=2)
    assert [(r.node_id, r.start, r.end) for r in plan] == [("b", 0, 3), ("c", 3, 6)]
    plan = plan_stages(budgets, cost, stages=1)
    assert [(r.node_id, r.start, r.end) for r in plan] == [("b", 0, 6)]


def test_explicit_ranges_are_checked_and_paired_in_order() -> None:
    cost = StageCost(num_layers=5, layer_bytes=10)
    budgets = [NodeBudget("a", 100), NodeBudget("b", 100), NodeBudget("c", 100)]
    plan = plan_stages(budgets, cost, layers="0-1,1-5")
    assert [(r.node_id, r.start, r.end) for r in plan] == [("a", 0, 1), ("b", 1, 5)]
    with pytest.raises(PlanError, match="overlaps"):
        plan_stages(budgets, cost, layers="0-3,2-5")
    with pytest.raises(PlanError, match="gap"):
        plan_stages(budgets, cost, layers="0-2,3-5")
    with pytest.raises(PlanError, match="gap"):
        plan_stages(budgets, cost, layers=[(0, 2), (2, 4)])
    with pytest.raises(PlanError, match="3 stages asked for"):
        plan_stages(budgets, cost, layers="0-2,2-5", stages=3)


def test_plans_that_cannot_fit_name_the_node_and_what_it_lacks() -> None:
    cost = StageCost(num_layers=4, layer_bytes=100, first_extra_bytes=50)
    with pytest.raises(PlanError, match=r"node a\(1\) lacks 150 bytes") as e:
        plan_stages([NodeBudget("a(1)", 100), NodeBudget("b(2)", 1000)], cost, layers="0-2,2-4")
    assert e.value.shortfalls == {"a(1)": 150}
    with pytest.raises(PlanError, match="does not fit"):
        plan_stages([NodeBudget("a", 200), NodeBudget("b", 200)], cost)
    with pytest.raises(PlanError, match="only 2 can take one"):
        plan_stages([NodeBudget("a", 1000), NodeBudget("b", 1000)], cost, stages=3)
    with pytest.raises(PlanError, match="only 4 layers"):
        plan_stages([NodeBudget(str(i), 1000) for i in range(6)], cost, stages=5)
    with pytest.raises(PlanError, match="no nodes"):
        plan_stages([], cost)


@given(
    frees=st.lists(st.integers(1, 10**6), min_size=1, max_size=6),
    num_layers=st.integers(1, 40),
    stages=st.integers(1, 6),
)
def test_any_plan_is_contiguous_covering_and_within_budget(frees, num_layers, stages) -> None:
    cost = StageCost(num_layers=num_layers, layer_bytes=0)
    budgets = [NodeBudget(f"n{i}", f) for i, f in enumerate(frees)]
    try:
        plan = plan_stages(budgets, cost, stages=stages)
    except PlanError:
        assert stages > min(len(frees), num_layers)
        return
    assert len(plan) == stages
    assert plan[0].start == 0 and plan[-1].end == num_layers
    assert all(a.end == b.start for a, b in itertools.pairwise(plan))
    assert len({r.node_id for r in plan}) == stages
    # the chosen nodes are the ones with the most memory
    chosen = sorted(int(r.node_id[1:]) for r in plan)
    others = [frees[i] for i in range(len(frees)) if i not in chosen]
    assert not others or min(frees[i] for i in chosen) >= max(others)
