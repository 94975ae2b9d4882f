"""Where the verifier and the drafter go (pure: node descriptions in, ranked node ids out).

Verifier: a node that has the target (listed in its capabilities, or — for a checkpoint path
— possibly readable there), with room for it in its memory budget, the highest compute score
first. Drafter: a node that has the draft; the coordinating node first when it has it, then
nodes other than the verifier's (so drafting and verifying run on different hosts), then by
compute score. ``--verifier`` / ``--drafter`` pin a role to one node.

The coordinator ASSIGNs down each ranking until a node accepts: a refusal is a value to
plan around, not the end of the job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Candidate", "PlanError", "find_node", "holds", "rank_drafters", "rank_verifiers"]

HAS = 2  # listed in the node's capabilities
MAYBE = 1  # a checkpoint path the node may be able to read


class PlanError(Exception):
    """No node can take a role; the message says why, node by node."""


@dataclass(frozen=True)
class Candidate:
    node_id: str
    name: str
    local: bool
    tier: int  # HAS or MAYBE
    fits: bool  # the model fits the node's free memory budget (or its size is unknown)
    score: float


def _looks_like_path(model: str) -> bool:
    return "/" in model or model.startswith((".", "~"))


def holds(caps: Mapping[str, Any], model: str, local_path: str | None = None) -> tuple[int, int | None]:
    """(tier, param_bytes) of ``model`` on a node with ``caps``; tier 0 when it lacks it.

    ``local_path``: the model's resolved directory on the coordinating host, matched against
    the paths other nodes list.
    """
    for m in caps.get("models", []) or []:
        if not isinstance(m, Mapping):
            continue
        if m.get("name") == model or m.get("path") == model or (
            local_path is not None and m.get("path") == local_path
        ):
            size = m.get("param_bytes")
            return HAS, int(size) if isinstance(size, int) else None
    if _looks_like_path(model):
        return MAYBE, None
    return 0, None


def _free(caps: Mapping[str, Any]) -> int:
    return int(caps.get("mem_budget", 0) or 0) - int(caps.get("mem_used_by_roles", 0) or 0)


def find_node(nodes: Sequence[Mapping[str, Any]], text: str) -> Mapping[str, Any]:
    """A node by exact name, node id, or unique node id prefix."""
    for pred in (lambda n: n["node_id"] == text, lambda n: n["name"] == text,
                 lambda n: n["node_id"].startswith(text)):
        hits = [n for n in nodes if pred(n)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise PlanError(f"{text!r} names several nodes: "
                            + ", ".join(f"{n['name']}({n['node_id'][:8]})" for n in hits))
    known = ", ".join(f"{n['name']}({n['node_id'][:8]})" for n in nodes) or "none"
    raise PlanError(f"no node {text!r} is up; nodes: {known}")


def _candidates(nodes: Sequence[Mapping[str, Any]], model: str, local_path: str | None,
                local_has: bool, size_hint: int | None, role: str,
                pin: str | None) -> tuple[list[Candidate], list[str]]:
    pool = [find_node(nodes, pin)] if pin else list(nodes)
    out: list[Candidate] = []
    why: list[str] = []
    for n in pool:
        caps = n.get("caps", {}) or {}
        tier, size = holds(caps, model, local_path)
        if n.get("self") and local_has:
            tier = HAS
        if tier == 0 and pin:
            tier = MAYBE  # pinned: let the node say why it cannot
        if tier == 0:
            why.append(f"{n['name']}: does not have {model}")
            continue
        accepts = caps.get("accepts") or ["auto"]
        if "auto" not in accepts and role not in accepts:
            why.append(f"{n['name']}: does not accept the {role} role (--role {', '.join(accepts)})")
            continue
        need = size if size is not None else size_hint
        fits = need is None or need <= _free(caps)
        if need is not None and not fits and not pin:
            why.append(f"{n['name']}: not enough memory for {model} "
                       f"({need / 1e6:.0f} MB needed, {max(_free(caps), 0) / 1e6:.0f} MB free)")
            continue
        out.append(Candidate(n["node_id"], n["name"], bool(n.get("self")), tier, fits,
                             float(caps.get("compute_score", 0.0) or 0.0)))
    return out, why


def rank_verifiers(nodes: Sequence[Mapping[str, Any]], model: str, *, local_path: str | None = None,
                   local_has: bool = False, size_hint: int | None = None,
                   pin: str | None = None) -> list[Candidate]:
    """Nodes that may verify ``model``, best first; PlanError when there is none."""
    cands, why = _candidates(nodes, model, local_path, local_has, size_hint, "verifier", pin)
    if not cands:
        raise PlanError(f"no node can verify with {model}: " + "; ".join(why))
    return sorted(cands, key=lambda c: (-c.tier, -c.score, not c.local, c.node_id))


def rank_drafters(nodes: Sequence[Mapping[str, Any]], model: str, verifier: str, *,
                  local_path: str | None = None, local_has: bool = False,
                  size_hint: int | None = None, pin: str | None = None) -> list[Candidate]:
    """Nodes that may draft with ``model``, best first: this node, then not the verifier's."""
    cands, why = _candidates(nodes, model, local_path, local_has, size_hint, "drafter", pin)
    if not cands:
        raise PlanError(f"no node can draft with {model}: " + "; ".join(why))
    return sorted(cands, key=lambda c: (not (c.local and c.tier == HAS), -c.tier,
                                        c.node_id == verifier, -c.score, c.node_id))
