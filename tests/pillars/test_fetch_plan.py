"""Planners and nodes without the model (issue 16): the cluster's FETCH tier, the fetch cost,
and the split planner taking nodes that fetch their slice. Pure: node dicts in, plans out."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from p2pllm.daemon.cluster import (
    ASSUMED_FETCH_MBPS,
    FETCH,
    HAS,
    MAYBE,
    advertised_disk_bytes,
    fetch_estimate,
    model_disk_bytes,
    model_sources,
    model_tier,
)
from p2pllm.engine.config import ModelConfig
from p2pllm.pillars.split.messages import ShardParams
from p2pllm.pillars.split.pipeline import LocalModel, SplitRequest, plan_pipeline, slice_fetch_bytes
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode

GiB = 1 << 30


def cfg(**kw) -> ModelConfig:
    base = dict(model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=128,
                num_layers=8, num_heads=4, num_kv_heads=2, head_dim=16)
    base.update(kw)
    return ModelConfig(**base)


def node(name: str, free: int = GiB, *, me: bool = False, models=("m",), weights: bool = True,
         mbps: float | None = None, accepts=("auto",)) -> dict:
    caps = {"mem_free": free, "mem_budget": free, "mem_used_by_roles": 0,
            "accepts": list(accepts), "weights": weights,
            "models": [{"name": m, "path": f"/models/{m}", "param_bytes": 4000,
                        "disk_bytes": 2000} for m in models]}
    n = {"node_id": f"{name}-id-0123456789", "name": name, "caps": caps, "self": me}
    if not me:
        n["throughput_mbps"] = mbps
    return n


def nid(name: str) -> str:
    return f"{name}-id-0123456789"


def test_model_tier_has_maybe_fetch_and_none() -> None:
    me, b, c = node("me", me=True), node("b", models=()), node("c", models=("m",))
    nodes = [me, b, c]
    assert model_tier(nodes, me, "m") == (HAS, 4000, ())
    # b lacks it: it may fetch it from the nodes that list it, this node first
    assert model_tier(nodes, b, "m") == (FETCH, 4000, (nid("me"), nid("c")))
    assert model_sources(nodes, "m", exclude=nid("me")) == [nid("c")]
    assert model_tier(nodes, b, "org/other") == (MAYBE, None, ())
    assert model_tier(nodes, b, "other") == (0, None, ())
    # a node that does not move weights neither fetches nor serves
    old = node("old", models=(), weights=False)
    assert model_tier([*nodes, old], old, "m") == (0, None, ())
    only_old_source = [node("me", me=True, weights=False), b]
    assert model_tier(only_old_source, b, "m") == (0, None, ())
    assert advertised_disk_bytes(nodes, "m", [nid("c")]) == 2000
    assert advertised_disk_bytes(nodes, "m", [nid("b")]) is None


def test_fetch_estimate_uses_the_measured_link_else_says_it_assumes() -> None:
    nodes = [node("me", me=True), node("b", models=(), mbps=50.0), node("c", models=())]
    cost = fetch_estimate(nodes, nid("b"), [nid("me")], 100_000_000)
    assert cost.measured and cost.mbps == 50.0 and cost.seconds == pytest.approx(2.0)
    assert cost.describe() == {"fetch_bytes": 100_000_000, "fetch_s": 2.0, "fetch_mbps": 50.0,
                               "fetch_measured": True, "sources": [nid("me")]}
    assert cost.text() == "fetch 100.0 MB 2.0 s"
    unmeasured = fetch_estimate(nodes, nid("c"), [nid("me")], 100_000_000)
    assert not unmeasured.measured and unmeasured.mbps == ASSUMED_FETCH_MBPS
    assert unmeasured.seconds == pytest.approx(100_000_000 / (ASSUMED_FETCH_MBPS * 1e6))
    assert unmeasured.text().startswith("fetch 100.0 MB ~")
    # this node fetching: the link to its source counts
    me_fetching = fetch_estimate(nodes, nid("me"), [nid("b")], 25_000_000)
    assert me_fetching.measured and me_fetching.seconds == pytest.approx(0.5)


def test_model_disk_bytes_counts_files_and_skips_dotfiles(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "config.json").write_bytes(b"{}")
    (tmp_path / ".p2pllm-fetch.json").write_bytes(b"y" * 50)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "t.json").write_bytes(b"z" * 10)
    assert model_disk_bytes(tmp_path) == 1012
    assert model_disk_bytes(tmp_path / "model.safetensors") == 1000
    assert model_disk_bytes(tmp_path / "missing") == 0


def _model(tmp_path: Path) -> LocalModel:
    (tmp_path / "model.safetensors").write_bytes(bytes(1_000_000))
    return LocalModel("m", tmp_path, cfg(), None)


def test_split_plan_takes_fetching_nodes_only_when_it_needs_more(tmp_path: Path) -> None:
    model = _model(tmp_path)
    nodes = [node("me", 4 * GiB, me=True), node("b", 2 * GiB, models=(), mbps=40.0),
             node("c", 2 * GiB, models=())]
    # no shard count: the nodes that have the model (this one), no fetch
    stages = plan_pipeline(nodes, model, SplitRequest(model="m", prompt="x"))
    assert [(s.name, s.fetch) for s in stages] == [("me", None)]
    # three shards: b and c join, fetching their slices from this node (the coordinator
    # holds the last range)
    stages = plan_pipeline(nodes, model, SplitRequest(model="m", prompt="x", shards=3))
    assert [s.name for s in stages] == ["b", "c", "me"]
    assert stages[2].fetch is None and stages[2].sources == () and stages[2].fetch_bytes == 0
    for s in stages[:2]:
        assert s.sources == (nid("me"),)
        assert s.fetch_bytes == slice_fetch_bytes(model.config, 1_000_000, s.start, s.end)
        assert 0 < s.fetch_bytes < 1_000_000
        assert s.describe()["fetch_bytes"] == s.fetch_bytes
    assert stages[0].fetch is not None and stages[0].fetch.measured
    assert stages[0].fetch_s == pytest.approx(stages[0].fetch_bytes / 40e6, abs=1e-3)
    assert stages[1].fetch is not None and not stages[1].fetch.measured
    # the slices' bytes add up to about the model (the head is the last shard's)
    assert sum(slice_fetch_bytes(model.config, 1_000_000, s.start, s.end) for s in stages) \
        == pytest.approx(1_000_000, rel=0.01)


def test_split_plan_prefers_nodes_with_the_model(tmp_path: Path) -> None:
    model = _model(tmp_path)
    nodes = [node("me", GiB, me=True), node("a", GiB, models=()), node("z", GiB)]
    stages = plan_pipeline(nodes, model, SplitRequest(model="m", prompt="x", shards=2))
    assert [(s.name, s.fetch) for s in stages] == [("z", None), ("me", None)]
    stages = plan_pipeline(nodes, model, SplitRequest(model="m", prompt="x", shards=3))
    assert [(s.name, s.sources) for s in stages] == [
        ("a", (nid("me"), nid("z"))), ("z", ()), ("me", ())]


def test_split_plan_without_sources_still_names_who_lacks_it(tmp_path: Path) -> None:
    model = _model(tmp_path)
    nodes = [node("me", GiB, me=True), node("b", GiB, models=(), weights=False)]
    with pytest.raises(ProtocolError) as e:
        plan_pipeline(nodes, model, SplitRequest(model="m", prompt="x", shards=2))
    assert e.value.code == ErrorCode.NOT_FOUND
    assert "b(b-id-012) lacks model 'm'" in e.value.message
    assert "that can fetch it: none" in e.value.message


def test_shard_params_carry_the_sources(tmp_path: Path) -> None:
    p = ShardParams(model="m", start=0, end=8, num_layers=8, first=None, next=None,
                    sources=(nid("me"),))
    meta = p.to_meta()
    assert meta["sources"] == [nid("me")]
    meta["first"] = {"node": "x", "rid": "shard0"}
    assert ShardParams.from_meta(meta).sources == (nid("me"),)
    del meta["sources"]
    assert ShardParams.from_meta(meta).sources == ()
    meta["sources"] = ["", "x"]
    with pytest.raises(ProtocolError):
        ShardParams.from_meta(meta)


# -- split training, speculative placement, FL clients --------------------------------------


def test_splittrain_stages_fetch_only_when_more_stages_are_wanted(tmp_path: Path) -> None:
    from p2pllm.daemon.runner import Exclusions
    from p2pllm.pillars.splittrain.messages import RunSpec
    from p2pllm.pillars.splittrain.planner import plan_stages_for, stage_params
    from p2pllm.plan.layers import StageCost

    (tmp_path / "model.safetensors").write_bytes(bytes(800_000))
    cost = StageCost(num_layers=8, layer_bytes=100, first_extra_bytes=0, last_extra_bytes=0)
    nodes = [node("me", me=True), node("b", models=(), mbps=20.0), node("c", models=(),
                                                                        weights=False)]
    spec = RunSpec(model="m", data="d.txt", batch_size=2, micro_batches=1)
    stages = plan_stages_for(spec, nodes, cost, Exclusions(), None, tmp_path)
    assert [(s.name, s.fetch) for s in stages] == [("me", None)]
    spec2 = RunSpec(model="m", data="d.txt", batch_size=2, micro_batches=1, stages=2)
    stages = plan_stages_for(spec2, nodes, cost, Exclusions(), None, tmp_path)
    assert [s.name for s in stages] == ["me", "b"]  # c neither has it nor fetches
    b = stages[1]
    assert b.sources == (nid("me"),) and b.fetch is not None
    share = cost.stage_bytes(b.start, b.end) / cost.stage_bytes(0, 8)
    assert b.fetch.nbytes == round(800_000 * share)
    assert b.fetch.seconds == pytest.approx(b.fetch.nbytes / 20e6, abs=1e-3)
    assert "fetch" in b.summary() and "fetch" not in stages[0].summary()
    assert stage_params(spec2, stages, b, cost)["sources"] == [nid("me")]
    assert stage_params(spec2, stages, stages[0], cost)["sources"] == []
    # three stages: only two nodes can take one
    spec3 = RunSpec(model="m", data="d.txt", batch_size=2, micro_batches=1, stages=3)
    with pytest.raises(ProtocolError):
        plan_stages_for(spec3, nodes, cost, Exclusions(), None, tmp_path)


def test_spec_placement_ranks_fetching_nodes_after_those_with_the_model() -> None:
    from p2pllm.pillars.speculative.placement import rank_drafters, rank_verifiers

    nodes = [node("me", me=True, models=("draft",)), node("big", models=("target",)),
             node("empty", models=())]
    for n, score in zip(nodes, (1.0, 5.0, 50.0), strict=True):
        n["caps"]["compute_score"] = score
    ranked = rank_verifiers(nodes, "target")
    assert [(c.name, c.tier, c.sources) for c in ranked] == [
        ("big", HAS, ()), ("empty", FETCH, (nid("big"),)), ("me", FETCH, (nid("big"),))]
    drafters = rank_drafters(nodes, "draft", nid("big"), local_has=True)
    assert (drafters[0].name, drafters[0].sources) == ("me", ())
    assert {c.name: c.sources for c in drafters}["empty"] == (nid("me"),)


def test_fl_clients_without_the_base_model_fetch_it_whole(tmp_path: Path) -> None:
    from p2pllm.pillars.federated.coordinator import client_fetch

    (tmp_path / "model.safetensors").write_bytes(bytes(3_000_000))
    nodes = [node("me", me=True), node("b", models=(), mbps=30.0), node("c")]
    assert client_fetch(nodes, nodes[2], "m", tmp_path) is None
    assert client_fetch(nodes, nodes[0], "m", tmp_path) is None
    fetch = client_fetch(nodes, nodes[1], "m", tmp_path)
    assert fetch is not None and fetch.sources == (nid("me"), nid("c"))
    assert fetch.nbytes == 3_000_000 and fetch.seconds == pytest.approx(0.1)


# -- the roles' side: refuse() and where on_start loads from ---------------------------------


def test_model_refusal_accepts_a_missing_model_only_with_sources(tmp_path: Path) -> None:
    from p2pllm.config import DaemonConfig
    from p2pllm.pillars.rolemodel import model_refusal, sources_param

    config = DaemonConfig(models_dir=str(tmp_path))
    assert "is not on this node" in (model_refusal(config, "absent", ()) or "")
    assert model_refusal(config, "absent", ("peer",)) is None
    assert sources_param({}) == () and sources_param({"sources": ["a", "b"]}) == ("a", "b")
    from p2pllm.daemon.roles import Refused

    for bad in ("a", [1], [""], ["x"] * 65):
        with pytest.raises(Refused):
            sources_param({"sources": bad})


async def test_role_model_path_fetches_with_sources_and_refuses_a_failed_fetch(
        tmp_path: Path) -> None:
    from p2pllm.config import DaemonConfig
    from p2pllm.daemon.roles import Refused
    from p2pllm.pillars.rolemodel import need_layers, role_model_path
    from p2pllm.weights.slices import Need

    calls: list[tuple[str, Need | None, tuple[str, ...]]] = []
    cache = tmp_path / "cache" / "m"

    async def fetch_model(ref: str, need: Need | None, sources) -> Path:
        calls.append((ref, need, tuple(sources)))
        if ref == "broken":
            raise ProtocolError(ErrorCode.PEER_DOWN, "model 'broken': 3 pieces missing; a: down")
        return cache

    # what role_model_path reads of a RoleContext: the config and fetch_model
    ctx = SimpleNamespace(config=DaemonConfig(models_dir=str(tmp_path)), fetch_model=fetch_model)
    need = need_layers(2, 4, 4)
    assert need == Need((2, 4), embed=False, head=True)
    assert await role_model_path(ctx, "m", need, ("a",)) == cache
    assert calls == [("m", need, ("a",))]
    with pytest.raises(Refused, match="3 pieces missing"):
        await role_model_path(ctx, "broken", need, ("a",))
    # no sources: the roots, as before (NOT_FOUND becomes a refusal); fetch_model not asked
    with pytest.raises(Refused, match="absent"):
        await role_model_path(ctx, "absent", None, ())
    assert len(calls) == 2


def test_train_split_prints_a_stage_fetch(capsys: pytest.CaptureFixture[str]) -> None:
    from p2pllm.cli.train import _print_event

    _print_event({"event": "plan", "job": "j1", "stages": [
        {"index": 0, "node_id": nid("me"), "name": "me", "layers": [0, 2]},
        {"index": 1, "node_id": nid("b"), "name": "b", "layers": [2, 4], "fetch_bytes": 3_500_000,
         "fetch_s": 0.035, "fetch_measured": False, "sources": [nid("me")]}]}, 1)
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "  stage 0: layers 0-2 on me (me-id-01)"
    assert out[2] == "  stage 1: layers 2-4 on b (b-id-012), fetching 3.5 MB in ~0.0 s"
