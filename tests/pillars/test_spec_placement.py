"""Where the verifier and drafter go: pure ranking over node descriptions."""

from __future__ import annotations

from typing import Any

import pytest

from p2pllm.pillars.speculative.placement import (
    HAS,
    MAYBE,
    PlanError,
    find_node,
    holds,
    rank_drafters,
    rank_verifiers,
)

GB = 1 << 30


def node(name: str, *, models: list[str] = (), score: float = 1.0, free: int = 8 * GB,
         local: bool = False, accepts: list[str] | None = None, size: int = GB) -> dict[str, Any]:
    return {
        "node_id": f"{name}-id-0123456789",
        "name": name,
        "self": local,
        "caps": {
            "models": [{"name": m, "path": f"/models/{m}", "param_bytes": size} for m in models],
            "compute_score": score,
            "mem_budget": free,
            "mem_used_by_roles": 0,
            "accepts": accepts or ["auto"],
        },
    }


def ids(cands: list[Any]) -> list[str]:
    return [c.name for c in cands]


def test_holds_by_name_or_path() -> None:
    caps = node("a", models=["big"])["caps"]
    assert holds(caps, "big") == (HAS, GB)
    assert holds(caps, "/models/big") == (HAS, GB)
    assert holds(caps, "other", local_path="/models/big") == (HAS, GB)
    assert holds(caps, "small") == (0, None)
    assert holds(caps, "/somewhere/else") == (MAYBE, None)


def test_verifier_is_the_fastest_node_with_the_target_and_room() -> None:
    nodes = [
        node("laptop", models=["big", "small"], score=10, local=True),
        node("desktop", models=["big"], score=100),
        node("tiny", models=["big"], score=500, free=GB // 2),  # fast but too small
        node("other", models=["small"], score=1000),  # no target
    ]
    assert ids(rank_verifiers(nodes, "big")) == ["desktop", "laptop"]
    with pytest.raises(PlanError, match=r"tiny: not enough memory.*other: does not have big"):
        rank_verifiers([nodes[2], nodes[3]], "big")


def test_drafter_prefers_this_node_then_not_the_verifier() -> None:
    nodes = [
        node("laptop", models=["small"], score=10, local=True),
        node("desktop", models=["big", "small"], score=100),
        node("server", models=["small"], score=50),
    ]
    desktop = nodes[1]["node_id"]
    assert ids(rank_drafters(nodes, "small", desktop)) == ["laptop", "server", "desktop"]
    # without the draft locally: another node than the verifier first
    assert ids(rank_drafters(nodes[1:], "small", desktop)) == ["server", "desktop"]


def test_one_node_takes_both() -> None:
    only = [node("solo", models=["big", "small"], local=True)]
    v = rank_verifiers(only, "big")
    assert ids(v) == ["solo"]
    assert ids(rank_drafters(only, "small", v[0].node_id)) == ["solo"]


def test_local_path_counts_for_this_node() -> None:
    nodes = [node("me", local=True), node("peer", models=["x"])]
    got = rank_verifiers(nodes, "ckpt", local_has=True, local_path="/data/ckpt")
    assert ids(got) == ["me"]
    # a path: remote nodes might read it too, after the ones known to have it
    got = rank_verifiers(nodes, "/data/ckpt", local_has=True, local_path="/data/ckpt")
    assert ids(got) == ["me", "peer"] and got[1].tier == MAYBE


def test_pins() -> None:
    nodes = [node("a", models=["big"], score=100), node("b", models=["big"], score=1, local=True)]
    assert ids(rank_verifiers(nodes, "big", pin="b")) == ["b"]
    assert ids(rank_verifiers(nodes, "big", pin=nodes[0]["node_id"][:6])) == ["a"]
    # a pinned node that does not list the model is still tried (it may say why not)
    assert ids(rank_verifiers(nodes, "nothere", pin="a")) == ["a"]
    with pytest.raises(PlanError, match="no node 'zzz'"):
        rank_verifiers(nodes, "big", pin="zzz")
    with pytest.raises(PlanError, match="several"):
        find_node([node("a"), node("a")], "a")


def test_role_restrictions() -> None:
    nodes = [node("a", models=["big"], score=100, accepts=["shard"]), node("b", models=["big"])]
    assert ids(rank_verifiers(nodes, "big")) == ["b"]
    with pytest.raises(PlanError, match="does not accept the verifier role"):
        rank_verifiers(nodes[:1], "big")


def test_drafter_goes_to_another_node_than_the_verifier_when_one_has_the_draft() -> None:
    """The target's own int4 copy as draft: both nodes hold the model. The verifier takes the
    coordinator (the best score ties, local first); the drafter then goes to the other node,
    so they work at once; the coordinator drafts only when no other node can."""
    nodes = [node("here", models=["m"], local=True), node("there", models=["m"])]
    verifier = rank_verifiers(nodes, "m")[0]
    assert verifier.name == "here"
    assert ids(rank_drafters(nodes, "m", verifier.node_id)) == ["there", "here"]
    assert ids(rank_drafters(nodes[:1], "m", verifier.node_id)) == ["here"]
    # a node that would have to fetch the draft ranks after the verifier's own copy
    fetcher = node("far", models=[])
    assert ids(rank_drafters([nodes[0], fetcher], "m", verifier.node_id)) == ["here"]
