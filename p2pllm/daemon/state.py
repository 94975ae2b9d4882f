"""Daemon state as a pure reducer: `apply(state, event) -> state`.

Everything `ctl status`, `ctl jobs` and the dashboard show comes from snapshots of this
state; they never reach into roles or connections.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

# -- events --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    name: str
    address: str
    caps: dict[str, Any]


@dataclass(frozen=True)
class PeerUp:
    node_id: str
    name: str
    address: str
    caps: dict[str, Any]
    at: float


@dataclass(frozen=True)
class PeerDown:
    node_id: str
    reason: str
    at: float


@dataclass(frozen=True)
class PeerRemoved:
    node_id: str


@dataclass(frozen=True)
class PeerSeen:
    """Discovered (mDNS or static) but not connected yet."""

    node_id: str
    name: str
    address: str
    at: float


@dataclass(frozen=True)
class LinkMeasured:
    node_id: str
    rtt_ms: float | None = None
    throughput_mbps: float | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None


@dataclass(frozen=True)
class RoleAssigned:
    job: str
    rid: str
    role: str
    coordinator: str
    summary: str
    at: float


@dataclass(frozen=True)
class RoleReleased:
    job: str
    rid: str


@dataclass(frozen=True)
class RoleMetrics:
    job: str
    rid: str
    metrics: dict[str, Any]


@dataclass(frozen=True)
class JobStarted:
    job: str
    pillar: str
    coordinator: str
    at: float
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobMember:
    job: str
    node_id: str
    rid: str
    role: str
    summary: str


@dataclass(frozen=True)
class JobMemberLeft:
    """A member no longer holds its role: ``reason`` "released" (RELEASE sent: re-placed or
    the job ended) or "lost" (its node failed mid-job)."""

    job: str
    node_id: str
    rid: str
    reason: str


@dataclass(frozen=True)
class JobUpdated:
    job: str
    metrics: dict[str, Any]


@dataclass(frozen=True)
class JobEnded:
    job: str
    state: str  # "done" | "failed" | "stopped"
    error: str | None
    at: float


@dataclass(frozen=True)
class NodeUpdated:
    caps: dict[str, Any]


@dataclass(frozen=True)
class FetchUpdated:
    """A fetch of model pieces into this node's models cache (protocol.md 13) started, made
    progress or ended: ``state`` "fetching", "done", "reused" or "failed"."""

    model: str
    job: str
    state: str
    done_bytes: int
    total_bytes: int
    at: float
    pieces_done: int = 0
    pieces_total: int = 0
    source: str = ""
    dropped: tuple[str, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class WeightsServed:
    """This node sent ``nbytes`` of model pieces in a WEIGHTS_READ answer."""

    nbytes: int


Event = (
    PeerUp
    | PeerDown
    | PeerRemoved
    | PeerSeen
    | LinkMeasured
    | RoleAssigned
    | RoleReleased
    | RoleMetrics
    | JobStarted
    | JobMember
    | JobMemberLeft
    | JobUpdated
    | JobEnded
    | NodeUpdated
    | FetchUpdated
    | WeightsServed
)

# -- state ---------------------------------------------------------------------------------

MAX_FINISHED_JOBS = 20
MAX_ENDED_FETCHES = 8


@dataclass(frozen=True)
class State:
    node: NodeInfo
    peers: dict[str, dict[str, Any]] = field(default_factory=dict)
    roles: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    fetches: dict[str, dict[str, Any]] = field(default_factory=dict)  # by model: the latest fetch
    served_bytes: int = 0  # bytes of model pieces served to peers (WEIGHTS_READ)


def _with(d: dict[Any, Any], key: Any, value: Any) -> dict[Any, Any]:
    out = dict(d)
    out[key] = value
    return out


def _without(d: dict[Any, Any], key: Any) -> dict[Any, Any]:
    out = dict(d)
    out.pop(key, None)
    return out


def apply(state: State, event: Event) -> State:
    old: Any
    peer: dict[str, Any]
    match event:
        case PeerSeen():
            if event.node_id in state.peers:
                return state
            peer = {
                "name": event.name,
                "node_id": event.node_id,
                "address": event.address,
                "state": "connecting",
                "caps": {},
                "rtt_ms": None,
                "since": event.at,
            }
            return replace(state, peers=_with(state.peers, event.node_id, peer))
        case PeerUp():
            old = state.peers.get(event.node_id, {})
            peer = {
                **old,
                "name": event.name,
                "node_id": event.node_id,
                "address": event.address,
                "state": "up",
                "caps": event.caps,
                "rtt_ms": old.get("rtt_ms"),
                # a caps update of a peer already up (CAPS_UPDATE) is not a new "since"
                "since": old["since"] if old.get("state") == "up" and "since" in old else event.at,
            }
            return replace(state, peers=_with(state.peers, event.node_id, peer))
        case PeerDown():
            old = state.peers.get(event.node_id)
            if old is None:
                return state
            peer = {**old, "state": "down", "since": event.at, "reason": event.reason}
            return replace(state, peers=_with(state.peers, event.node_id, peer))
        case PeerRemoved():
            return replace(state, peers=_without(state.peers, event.node_id))
        case LinkMeasured():
            old = state.peers.get(event.node_id)
            if old is None:
                return state
            upd = {k: v for k, v in vars(event).items() if k != "node_id" and v is not None}
            return replace(state, peers=_with(state.peers, event.node_id, {**old, **upd}))
        case RoleAssigned():
            role = {
                "job": event.job,
                "rid": event.rid,
                "role": event.role,
                "coordinator": event.coordinator,
                "summary": event.summary,
                "since": event.at,
                "metrics": {},
            }
            return replace(state, roles=_with(state.roles, (event.job, event.rid), role))
        case RoleReleased():
            return replace(state, roles=_without(state.roles, (event.job, event.rid)))
        case RoleMetrics():
            key = (event.job, event.rid)
            old = state.roles.get(key)
            if old is None:
                return state
            return replace(state, roles=_with(state.roles, key, {**old, "metrics": event.metrics}))
        case JobStarted():
            job = {
                "job": event.job,
                "pillar": event.pillar,
                "coordinator": event.coordinator,
                "state": "running",
                "started": event.at,
                "ended": None,
                "members": [],  # live: each holds its role now
                "left": [],  # members that left, oldest first, each with its "reason"
                "metrics": {},
                "params": event.params,
                "error": None,
            }
            jobs = _with(state.jobs, event.job, job)
            finished = [j for j in jobs.values() if j["state"] != "running"]
            if len(finished) > MAX_FINISHED_JOBS:
                oldest = min(finished, key=lambda j: j["started"])
                jobs = _without(jobs, oldest["job"])
            return replace(state, jobs=jobs)
        case JobMember():
            old = state.jobs.get(event.job)
            if old is None:
                return state
            member = {
                "node_id": event.node_id,
                "rid": event.rid,
                "role": event.role,
                "summary": event.summary,
            }
            job = {**old, "members": [*old["members"], member]}
            return replace(state, jobs=_with(state.jobs, event.job, job))
        case JobMemberLeft():
            old = state.jobs.get(event.job)
            if old is None:
                return state
            members = list(old["members"])
            at = next((i for i, m in enumerate(members)
                       if m["node_id"] == event.node_id and m["rid"] == event.rid), None)
            if at is None:
                return state
            gone = {**members.pop(at), "reason": event.reason}
            job = {**old, "members": members, "left": [*old.get("left", []), gone]}
            return replace(state, jobs=_with(state.jobs, event.job, job))
        case JobUpdated():
            old = state.jobs.get(event.job)
            if old is None:
                return state
            job = {**old, "metrics": {**old["metrics"], **event.metrics}}
            return replace(state, jobs=_with(state.jobs, event.job, job))
        case JobEnded():
            old = state.jobs.get(event.job)
            if old is None:
                return state
            job = {**old, "state": event.state, "error": event.error, "ended": event.at}
            return replace(state, jobs=_with(state.jobs, event.job, job))
        case NodeUpdated():
            return replace(state, node=replace(state.node, caps=event.caps))
        case FetchUpdated():
            old = state.fetches.get(event.model)
            fresh = old is None or old["state"] != "fetching" or old["job"] != event.job
            fetch = {
                "model": event.model,
                "job": event.job,
                "state": event.state,
                "done_bytes": event.done_bytes,
                "total_bytes": event.total_bytes,
                "pieces_done": event.pieces_done,
                "pieces_total": event.pieces_total,
                "source": event.source,
                "dropped": list(event.dropped),
                "started": event.at if fresh else old["started"],
                "ended": None if event.state == "fetching" else event.at,
                "error": event.error,
            }
            fetches = _with(state.fetches, event.model, fetch)
            ended = sorted((f for f in fetches.values() if f["state"] != "fetching"),
                           key=lambda f: f["ended"])
            for f in ended[:max(0, len(ended) - MAX_ENDED_FETCHES)]:
                fetches = _without(fetches, f["model"])
            return replace(state, fetches=fetches)
        case WeightsServed():
            return replace(state, served_bytes=state.served_bytes + event.nbytes)
    raise TypeError(f"unknown event {event!r}")  # pragma: no cover


def snapshot(state: State, now: float) -> dict[str, Any]:
    """A JSON-ready view of the state (what STATUS answers)."""
    roles = sorted(state.roles.values(), key=lambda r: (r["job"], r["rid"]))
    return {
        "node": {
            "name": state.node.name,
            "node_id": state.node.node_id,
            "address": state.node.address,
            "state": "up",
            **{k: v for k, v in state.node.caps.items() if k not in ("name", "node_id")},
            "roles": roles,
        },
        "peers": sorted(
            (
                {
                    "name": p["name"],
                    "node_id": p["node_id"],
                    "address": p["address"],
                    "state": p["state"],
                    "since_s": round(now - p["since"], 3),
                    "rtt_ms": p.get("rtt_ms"),
                    "throughput_mbps": p.get("throughput_mbps"),
                    "bytes_in": p.get("bytes_in"),
                    "bytes_out": p.get("bytes_out"),
                    "roles": p["caps"].get("roles_held", []),
                    **{k: v for k, v in p["caps"].items() if k != "roles_held"},
                }
                for p in state.peers.values()
            ),
            key=lambda p: (p["name"], p["node_id"]),
        ),
        "jobs": sorted(state.jobs.values(), key=lambda j: j["started"]),
        "fetches": sorted(state.fetches.values(), key=lambda f: f["started"]),
        "served_bytes": state.served_bytes,
        "time": now,
    }
