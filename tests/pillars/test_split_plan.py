"""The caps -> budgets -> layer ranges glue (p2pllm.plan.layers): pure, no sockets."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pllm.engine.config import ModelConfig
from p2pllm.pillars.split.pipeline import LocalModel, SplitRequest, plan_pipeline
from p2pllm.plan.layers import (
    StageCost,
    free_bytes,
    kv_bytes_per_token_layer,
    model_stage_cost,
    plan_stages,
)
from p2pllm.plan.partition import NodeBudget, PlanError
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode

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


# -- the split coordinator's plan over cluster nodes (pure: no sockets) -------------------------

def node(name: str, free: int, *, me: bool = False, models=("m",), accepts=("auto",)) -> dict:
    caps = {"mem_free": free, "mem_budget": free, "mem_used_by_roles": 0,
            "accepts": list(accepts),
            "models": [{"name": m, "path": f"/models/{m}"} for m in models]}
    return {"node_id": f"{name}-id-0123456789", "name": name, "caps": caps, "self": me}


def local(ref: str = "m") -> LocalModel:
    return LocalModel(ref, Path("/models/m"), cfg(), None)


def test_split_plan_puts_this_node_last_and_follows_memory() -> None:
    # the coordinator (this node) holds the last range: each sampled token reaches it
    # in-process and its relay to the client overlaps shard 0's next step (issue 19)
    nodes = [node("c", 3 * GiB), node("a", 1 * GiB), node("me", 4 * GiB, me=True)]
    stages = plan_pipeline(nodes, local(), SplitRequest(model="m", prompt="x"))
    assert [(s.name, s.start, s.end, s.rid) for s in stages] == [
        ("a", 0, 1, "shard0"), ("c", 1, 4, "shard1"), ("me", 4, 8, "shard2")]
    # names cross the wire (issue 12): every shard gets the name, never a path a node advertises
    assert stages[0].model_ref == "m" and stages[1].model_ref == "m"


def test_split_plan_names_the_nodes_that_lack_the_model_or_refuse_shards() -> None:
    nodes = [node("me", GiB, me=True), node("b", GiB, models=()),
             node("c", GiB, accepts=("verifier",))]
    with pytest.raises(ProtocolError) as e:
        plan_pipeline(nodes, local(), SplitRequest(model="m", prompt="x", shards=2))
    assert e.value.code == ErrorCode.NOT_FOUND
    assert "b(b-id-012) lacks model 'm'" in e.value.message
    assert "c(c-id-012) does not take shard roles" in e.value.message
    # a path is taken to be readable by every peer (the member checks on ASSIGN)
    stages = plan_pipeline(nodes[:2], local("/models/m"),
                           SplitRequest(model="/models/m", prompt="x", shards=2))
    assert [s.name for s in stages] == ["b", "me"]


def test_split_plan_errors_are_typed() -> None:
    nodes = [node("me", GiB, me=True), node("b", GiB)]
    with pytest.raises(ProtocolError) as e:
        plan_pipeline(nodes, local(), SplitRequest(model="m", prompt="x", layers="0-4,3-8"))
    assert e.value.code == ErrorCode.BAD_REQUEST and "overlaps" in e.value.message
    with pytest.raises(ProtocolError) as e:
        plan_pipeline([node("me", 1000, me=True), node("b", 1000)], local(),
                      SplitRequest(model="m", prompt="x"))
    assert e.value.code == ErrorCode.REFUSED and "lacks" in e.value.message


def test_split_request_validates_the_generate_body() -> None:
    r = SplitRequest.from_meta({"model": "m", "prompt": "hi", "shards": 2, "wire_dtype": "bfloat16",
                                "temperature": 0.7, "seed": 3, "layers": " 0-1,1-8 "})
    assert r.shards == 2 and r.wire_dtype == "bfloat16" and r.sampling.seed == 3
    assert r.layers == "0-1,1-8" and r.retries == 1 and r.max_tokens == 128
    for bad, match in (({"prompt": "hi"}, "model"), ({"model": "m"}, "prompt"),
                       ({"model": "m", "prompt": "x", "shards": 0}, "shards"),
                       ({"model": "m", "prompt": "x", "dtype": "int8"}, "dtype"),
                       ({"model": "m", "prompt_ids": [1, -1]}, "prompt_ids"),
                       ({"model": "m", "prompt": "x", "top_p": 2.0}, "top_p"),
                       ({"model": "m", "prompt": "x", "keep_alive": -1}, "keep_alive")):
        with pytest.raises(ProtocolError, match=match) as e:
            SplitRequest.from_meta(bad)
        assert e.value.code == ErrorCode.BAD_REQUEST
