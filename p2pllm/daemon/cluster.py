"""Cluster queries: the one place planners and roles ask about nodes and models.

- :func:`find_node`: a node by node id, address, exact name or unique node-id prefix;
- :func:`has_model`: whether a node's capabilities list a model (by the name that crosses
  the wire; the paths a node advertises are for its operator's status view, never opened by
  another node);
- :func:`accepts_role`: whether a node takes a role (its ``--role`` settings, as advertised in
  ``caps["accepts"]``, and room in its memory budget), with the reason when it does not;
- :func:`model_tier`: :func:`has_model` over the cluster: a node that lacks the model is still usable
  (tier FETCH) when other nodes list it whole; they are its ``sources`` (issue 16: the role
  fetches the pieces it needs from them before loading);
- :func:`fetch_estimate`: what such a fetch costs (bytes over the measured link throughput);
- :func:`resolve_model_ref`: the checkpoint directory a reference names for the operator's
  own process (any path); requests are resolved by :mod:`p2pllm.daemon.modelrefs` instead.

Node descriptions are the dicts ``Cluster.nodes()`` returns (``node_id``, ``name``,
``address``, ``caps``, ``self``, and for peers the measured ``throughput_mbps`` of the link). Everything here is pure over them, except
:func:`resolve_model_ref`, which looks at this host's files. No torch at import time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pllm.plan.partition import PlanError
from p2pllm.wire.messages import ErrorCode

__all__ = [
    "ASSUMED_FETCH_MBPS",
    "FETCH",
    "HAS",
    "MAYBE",
    "FetchCost",
    "PlanError",
    "accepts_role",
    "advertised_disk_bytes",
    "fetch_estimate",
    "find_node",
    "free_bytes",
    "has_model",
    "label",
    "looks_like_path",
    "model_disk_bytes",
    "model_sources",
    "model_tier",
    "moves_weights",
    "resolve_model_ref",
    "takes_role",
]

log = logging.getLogger(__name__)

HAS = 3  # the node lists the model in its capabilities
MAYBE = 2  # a name the node may resolve in its roots without listing it (org/name)
FETCH = 1  # the node lacks it, other nodes list it whole: the role fetches its pieces first
# Link throughput assumed for a fetch's time when the coordinator has not measured the link
# yet (the first probe runs LINK_PROBE_EVERY after connecting): 100 MB/s, a gigabit LAN less
# overhead. Plans mark such a figure as an estimate (FetchCost.measured False).
ASSUMED_FETCH_MBPS = 100.0

Node = Mapping[str, Any]


def label(node: Node) -> str:
    """How messages name a node: ``name(node-id prefix)``."""
    return f"{node.get('name')}({str(node.get('node_id', ''))[:8]})"


# -- nodes --------------------------------------------------------------------------------------


def find_node(nodes: Sequence[Node], text: str) -> Node:
    """A node by node id or address, then exact name, then unique node-id prefix.

    Raises :class:`PlanError` (code BAD_REQUEST when ambiguous, NOT_FOUND when no node
    matches) naming the known nodes.
    """
    preds: tuple[Callable[[Node], bool], ...] = (
        lambda n: n["node_id"] == text or n.get("address") == text,
        lambda n: n["name"] == text,
        lambda n: str(n["node_id"]).startswith(text),
    )
    for pred in preds:
        hits = [n for n in nodes if pred(n)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise PlanError(f"{text!r} names several nodes: " + ", ".join(map(label, hits)),
                            code=ErrorCode.BAD_REQUEST)
    known = ", ".join(map(label, nodes)) or "none"
    raise PlanError(f"no node {text!r} is up; nodes: {known}", code=ErrorCode.NOT_FOUND)


def free_bytes(caps: Mapping[str, Any]) -> int:
    """Bytes left in a node's memory budget for new roles."""
    return int(caps.get("mem_budget", 0) or 0) - int(caps.get("mem_used_by_roles", 0) or 0)


def takes_role(caps: Mapping[str, Any], kind: str) -> bool:
    """Whether a node's ``--role`` settings (``caps["accepts"]``) allow role ``kind``."""
    accepts = caps.get("accepts") or ["auto"]
    return not isinstance(accepts, list) or "auto" in accepts or kind in accepts


def accepts_role(node: Node, kind: str, need_bytes: int | None = None) -> str | None:
    """None when ``node`` may take role ``kind`` (needing ``need_bytes``), else the reason."""
    caps = node.get("caps") or {}
    if not takes_role(caps, kind):
        accepts = caps.get("accepts") or []
        return f"does not accept the {kind} role (--role {', '.join(map(str, accepts))})"
    if need_bytes is not None and need_bytes > free_bytes(caps):
        return (f"not enough memory for the {kind} role ({need_bytes / 1e6:.0f} MB needed, "
                f"{max(free_bytes(caps), 0) / 1e6:.0f} MB free)")
    return None


# -- models -------------------------------------------------------------------------------------


def looks_like_path(model: str) -> bool:
    return "/" in model or model.startswith((".", "~"))


def _listed(caps: Mapping[str, Any], model: str,
            local_path: str | Path | None) -> Mapping[str, Any] | None:
    models = caps.get("models")
    if not isinstance(models, list):
        return None
    local = str(local_path) if local_path is not None else None
    for m in models:
        if not isinstance(m, Mapping):
            continue
        if m.get("name") == model or m.get("path") == model or (
                local is not None and m.get("path") == local):
            return m
    return None


def has_model(caps: Mapping[str, Any], model: str,
              local_path: str | Path | None = None) -> tuple[int, int | None]:
    """(tier, param_bytes) of ``model`` on a node with ``caps``: HAS when it lists it (by
    name, path, or a given ``local_path``), MAYBE for a name with a ``/`` (a nested folder
    under its roots or a hub id: the node checks on ASSIGN), 0 when it lacks it. Same name =
    same model: coordinators pass the name they send (ModelRef.name), no local path."""
    m = _listed(caps, model, local_path)
    if m is not None:
        size = m.get("param_bytes")
        return HAS, int(size) if isinstance(size, int) else None
    if looks_like_path(model):
        return MAYBE, None
    return 0, None


def moves_weights(node: Node) -> bool:
    """Whether a node serves its models' pieces and fetches them (``caps["weights"]``)."""
    return (node.get("caps") or {}).get("weights") is True


def model_sources(nodes: Sequence[Node], model: str, exclude: str | None = None) -> list[str]:
    """Ids of the nodes that list ``model`` whole (HAS) and serve pieces, other than
    ``exclude``: this node first, then by name. Names cross the wire: the sources serve it by
    that name."""
    hits = [n for n in nodes if str(n.get("node_id")) != exclude and moves_weights(n)
            and _listed(n.get("caps") or {}, model, None) is not None]
    hits.sort(key=lambda n: (not n.get("self"), str(n.get("name")), str(n.get("node_id"))))
    return [str(n["node_id"]) for n in hits]


def model_tier(nodes: Sequence[Node], node: Node, model: str,
               local_path: str | Path | None = None) -> tuple[int, int | None, tuple[str, ...]]:
    """(tier, param_bytes, sources) of ``model`` on ``node`` among ``nodes``: HAS or MAYBE as
    :func:`has_model` says (no sources: the node loads its own copy), else FETCH when the node
    fetches weights and other nodes that serve them list it (their ids; param_bytes as they
    advertise it), else (0, None, ())."""
    tier, size = has_model(node.get("caps") or {}, model, local_path)
    if tier:
        return tier, size, ()
    if not moves_weights(node):
        return 0, None, ()
    sources = model_sources(nodes, model, exclude=str(node.get("node_id")))
    if not sources:
        return 0, None, ()
    by_id = {str(n.get("node_id")): n for n in nodes}
    for nid in sources:
        _, size = has_model(by_id[nid].get("caps") or {}, model)
        if size is not None:
            break
    return FETCH, size, tuple(sources)


@dataclass(frozen=True)
class FetchCost:
    """One member's fetch in a plan: ``nbytes`` from ``sources`` in about ``seconds``, over a
    link of ``mbps`` (10^6 bytes/s); ``measured`` False: the link was not measured yet and
    ``mbps`` is ASSUMED_FETCH_MBPS (the figure is an estimate)."""

    nbytes: int
    seconds: float
    mbps: float
    measured: bool
    sources: tuple[str, ...]

    def describe(self) -> dict[str, Any]:
        """The fields job info shows (``ctl jobs``)."""
        return {"fetch_bytes": self.nbytes, "fetch_s": self.seconds, "fetch_mbps": self.mbps,
                "fetch_measured": self.measured, "sources": list(self.sources)}

    def text(self) -> str:
        """``fetch 42.1 MB ~0.4 s`` (``~``: over an assumed, unmeasured throughput)."""
        return (f"fetch {self.nbytes / 1e6:.1f} MB {'' if self.measured else '~'}"
                f"{self.seconds:.1f} s")


def _mbps(nodes: Sequence[Node], node_id: str) -> float | None:
    for n in nodes:
        if str(n.get("node_id")) == node_id and not n.get("self"):
            v = n.get("throughput_mbps")
            if isinstance(v, int | float) and not isinstance(v, bool) and v > 0:
                return float(v)
    return None


def fetch_estimate(nodes: Sequence[Node], node_id: str, sources: Sequence[str],
                   nbytes: int) -> FetchCost:
    """The cost of fetching ``nbytes`` onto ``node_id`` from ``sources``: bytes over the
    coordinator's measured throughput to that node (``throughput_mbps`` of its link; when the
    node is the coordinator itself, the link to its first source), or over
    ASSUMED_FETCH_MBPS when the link is unmeasured (``fetch_measured`` False)."""
    is_self = any(str(n.get("node_id")) == node_id and n.get("self") for n in nodes)
    mbps = _mbps(nodes, node_id) if not is_self else next(
        (m for s in sources if (m := _mbps(nodes, s)) is not None), None)
    rate = mbps if mbps is not None else ASSUMED_FETCH_MBPS
    return FetchCost(int(nbytes), round(nbytes / (rate * 1e6), 3), rate, mbps is not None,
                     tuple(sources))


def advertised_disk_bytes(nodes: Sequence[Node], model: str, sources: Sequence[str]) -> int | None:
    """``disk_bytes`` of ``model`` as the first of ``sources`` that advertises it says."""
    by_id = {str(n.get("node_id")): n for n in nodes}
    for nid in sources:
        m = _listed((by_id.get(nid) or {}).get("caps") or {}, model, None)
        size = m.get("disk_bytes") if m is not None else None
        if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
            return size
    return None


def model_disk_bytes(path: str | Path) -> int:
    """Bytes of a model folder's files on disk (the regular files in it and one level of
    subfolders; a ``.gguf`` file: its size): what fetching it whole moves."""
    p = Path(path)
    try:
        if p.is_file():
            return p.stat().st_size
        total = 0
        for f in p.iterdir():
            if f.name.startswith("."):
                continue
            if f.is_file():
                total += f.stat().st_size
            elif f.is_dir():
                total += sum(g.stat().st_size for g in f.iterdir()
                             if g.is_file() and not g.name.startswith("."))
        return total
    except OSError:
        return 0


def _bundled_dir() -> Path:
    from p2pllm.engine.registry import BUNDLED_MODELS_DIR

    return BUNDLED_MODELS_DIR


def _is_gguf_model(p: Path) -> bool:
    """A ``.gguf`` file, or a folder holding one (engine.gguf.find_gguf, without torch)."""
    if p.is_file():
        return p.suffix.lower() == ".gguf"
    return p.is_dir() and any(f.is_file() for f in p.glob("*.gguf"))


def resolve_model_ref(ref: str, models_dir: str | Path | None) -> Path | None:
    """The checkpoint directory ``ref`` names on this host, or None. Never the network.

    In order: a directory path, a folder under ``models_dir``, a bundled model, a model
    listed under another name in ``models_dir``. Any path: for the operator's own process
    only. A daemon resolves what a request names with
    :class:`p2pllm.daemon.modelrefs.ModelRoots` (inside its roots), never with this.
    """
    if not ref:
        return None
    candidates = [Path(ref).expanduser()]
    if models_dir and not looks_like_path(ref):
        candidates.append(Path(models_dir).expanduser() / ref)
    if not looks_like_path(ref):
        candidates.append(_bundled_dir() / ref)
    for c in candidates:
        try:
            if (c / "config.json").is_file() or _is_gguf_model(c):
                return c.resolve()
        except OSError:
            continue
    if not looks_like_path(ref):
        try:
            from p2pllm.engine.loader import list_models

            for info in list_models(models_dir):
                if info.name == ref:
                    return info.path
        except Exception as exc:  # a broken models dir is "not found", not a crash
            log.debug("cannot list models in %s: %s", models_dir, exc)
    return None
