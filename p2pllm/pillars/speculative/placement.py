"""Where the verifier and the drafter go (pure: node descriptions in, ranked node ids out).

Verifier: a node that has the target (listed in its capabilities, or — for a checkpoint path
— possibly readable there), with room for it in its memory budget, the highest compute score
first. Drafter: a node that has the draft; one other than the verifier's first (drafting and
verifying then run on different hosts, at once: the look-ahead), then the coordinating node,
then by compute score. Nodes that lack the model but can fetch it whole from nodes that list it (tier
FETCH, with its ``sources``) rank after every node that has it. ``--verifier`` /
``--drafter`` pin a role to one node.

The coordinator takes the best of each ranking that the JobRunner has not excluded: a
refusal is a value to plan around, not the end of the job. Node lookups, model and role
checks are the cluster queries of :mod:`p2pllm.daemon.cluster`; failures are the one
:class:`~p2pllm.plan.partition.PlanError` (code NOT_FOUND).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from p2pllm.daemon.cluster import (
    FETCH,
    HAS,
    MAYBE,
    accepts_role,
    find_node,
    free_bytes,
    has_model,
    model_tier,
)
from p2pllm.plan.partition import PlanError
from p2pllm.wire.messages import ErrorCode

__all__ = ["FETCH", "HAS", "MAYBE", "Candidate", "PlanError", "find_node", "holds", "rank_drafters",
           "rank_verifiers"]


@dataclass(frozen=True)
class Candidate:
    node_id: str
    name: str
    local: bool
    tier: int  # HAS, MAYBE or FETCH
    fits: bool  # the model fits the node's free memory budget (or its size is unknown)
    score: float
    sources: tuple[str, ...] = ()  # FETCH: the nodes it fetches the model from


holds = has_model  # (tier, param_bytes) of a model on a node with these caps


def _candidates(nodes: Sequence[Mapping[str, Any]], model: str, local_path: str | None,
                local_has: bool, size_hint: int | None, role: str,
                pin: str | None) -> tuple[list[Candidate], list[str]]:
    try:
        pool = [find_node(nodes, pin)] if pin else list(nodes)
    except PlanError as exc:
        raise PlanError(str(exc), code=ErrorCode.NOT_FOUND) from None
    out: list[Candidate] = []
    why: list[str] = []
    for n in pool:
        caps = n.get("caps", {}) or {}
        tier, size, sources = model_tier(nodes, n, model, local_path)
        if n.get("self") and local_has:
            tier, sources = HAS, ()
        if tier == 0 and pin:
            tier = MAYBE  # pinned: let the node say why it cannot
        if tier == 0:
            why.append(f"{n['name']}: does not have {model}")
            continue
        refusal = accepts_role(n, role)
        if refusal is not None:
            why.append(f"{n['name']}: {refusal}")
            continue
        # size_hint: the coordinator's own estimate for the requested dtype / quant (exact);
        # else what the node advertises (float32 weights: an upper bound)
        need = size_hint if size_hint is not None else size
        fits = need is None or need <= free_bytes(caps)
        if need is not None and not fits and not pin:
            why.append(f"{n['name']}: not enough memory for {model} ({need / 1e6:.0f} MB "
                       f"needed, {max(free_bytes(caps), 0) / 1e6:.0f} MB free)")
            continue
        out.append(Candidate(n["node_id"], n["name"], bool(n.get("self")), tier, fits,
                             float(caps.get("compute_score", 0.0) or 0.0), sources))
    return out, why


def rank_verifiers(nodes: Sequence[Mapping[str, Any]], model: str, *, local_path: str | None = None,
                   local_has: bool = False, size_hint: int | None = None,
                   pin: str | None = None) -> list[Candidate]:
    """Nodes that may verify ``model``, best first; PlanError when there is none."""
    cands, why = _candidates(nodes, model, local_path, local_has, size_hint, "verifier", pin)
    if not cands:
        raise PlanError(f"no node can verify with {model}: " + "; ".join(why),
                        code=ErrorCode.NOT_FOUND)
    return sorted(cands, key=lambda c: (-c.tier, -c.score, not c.local, c.node_id))


def rank_drafters(nodes: Sequence[Mapping[str, Any]], model: str, verifier: str, *,
                  local_path: str | None = None, local_has: bool = False,
                  size_hint: int | None = None, pin: str | None = None) -> list[Candidate]:
    """Nodes that may draft with ``model``, best first: those that have it, not the
    verifier's node before it, this node before others."""
    cands, why = _candidates(nodes, model, local_path, local_has, size_hint, "drafter", pin)
    if not cands:
        raise PlanError(f"no node can draft with {model}: " + "; ".join(why),
                        code=ErrorCode.NOT_FOUND)
    return sorted(cands, key=lambda c: (-c.tier, c.node_id == verifier, not c.local,
                                        -c.score, c.node_id))
