"""JobRunner: plan -> assign every slot -> (refusals: exclude, re-plan) -> run -> release.

A pillar gives the runner two things:

- ``plan(nodes, excluded) -> placement``: pure; ``nodes`` are the cluster's live nodes (those
  lost in this job left out), ``excluded`` the (node, role) pairs that refused and the nodes
  that were lost, with their reasons. A placement is a list of :class:`Slot` (rid, role kind,
  node id, params, summary, label). It raises :class:`~p2pllm.plan.partition.PlanError` (or a
  ``ProtocolError``) when nothing fits.
- ``run(job, members) -> result``: the pillar's own protocol over the assigned members. It
  raises :class:`MemberLost` when a member dies or loses its role.

and optionally ``replay(lost) -> bool``: whether to re-plan on the survivors and call ``run``
again after a loss (default: no; the job fails with an error naming the lost member).

The policy, the same for every pillar (``POLICY``):

1. Assign every slot of a placement at once. A member whose slot (node, rid, kind, params) is
   unchanged from the previous placement is kept, not reloaded; members no longer placed are
   released first.
2. A refusal (REFUSED, or the node unreachable / timing out / shutting down) excludes that
   (node, role kind) for the rest of the job, and the runner re-plans; all refusals of one
   round are excluded together. Any other error (a bad request, a missing dataset) fails the
   job at once: re-planning would not change it.
3. At most ``max_replans`` re-plans (default 3) per placement; past that, or when the planner
   finds no placement without the excluded nodes, the job fails with every refusal listed.
4. A lost member: its node is excluded for every role; if the pillar replays, the runner
   re-places (keeping unchanged members; a node may now take several slots) and runs again,
   else the job fails naming the lost member (its node, rid and what it held).
5. Every role is released when the job ends (the JobHost's ``job`` context), however it ends.
6. Authorization (protocol.md 4.4): every ASSIGN names the nodes of the whole placement as the
   job's members, so neighbours (split shards, split-training stages) may send each other the
   job's frames; after a re-plan the members kept from the previous placement are sent the new
   list (JOB_MEMBERS) before the pillar runs again, so a lost node's frames are refused and a
   new neighbour's are taken.

What the runner did is published in the job's metrics under ``"runner"``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from p2pllm.daemon.jobs import AssignRefused, Job, Member
from p2pllm.plan.partition import PlanError
from p2pllm.wire.connection import ConnectionClosed, RemoteError
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode, MsgType

__all__ = [
    "MAX_REPLANS",
    "POLICY",
    "Exclusions",
    "JobRunner",
    "Lost",
    "MemberLost",
    "Pillar",
    "Placement",
    "Slot",
]

log = logging.getLogger(__name__)

MAX_REPLANS = 3
POLICY = "exclude the refusing (node, role) and re-plan, at most 3 times"
# Codes of a refusal the runner plans around; any other error fails the job.
RETRYABLE = frozenset({ErrorCode.REFUSED, ErrorCode.PEER_DOWN, ErrorCode.TIMEOUT,
                       ErrorCode.SHUTTING_DOWN})

Node = Mapping[str, Any]


@dataclass(frozen=True)
class Slot:
    """One role a placement puts on one node."""

    rid: str
    kind: str
    node_id: str
    params: Mapping[str, Any]
    summary: str = ""
    label: str = ""  # how errors name it, e.g. "shard 1 (layers 2-4) on b"

    @property
    def key(self) -> tuple[str, str]:
        return (self.node_id, self.rid)

    def same(self, other: Slot) -> bool:
        return (self.key == other.key and self.kind == other.kind
                and dict(self.params) == dict(other.params))

    def describe(self) -> str:
        return self.label or f"{self.rid} ({self.kind}) on {self.node_id[:8]}"


Placement = Sequence[Slot]


@dataclass(frozen=True)
class Lost:
    """A member the job lost while running."""

    slot: Slot
    name: str
    detail: str
    code: ErrorCode

    def describe(self) -> str:
        held = f", holding {self.slot.summary}" if self.slot.summary else ""
        return (f"lost {self.slot.describe()} ({self.name} {self.slot.node_id[:8]}, "
                f"rid {self.slot.rid}{held}): {self.detail}")


class MemberLost(Exception):
    """Raised by a pillar's ``run``: the member holding ``rid`` (on ``node_id``, or wherever
    that rid is when the node is not given) died or lost its role."""

    def __init__(self, rid: str, detail: str, *, node_id: str | None = None,
                 code: ErrorCode = ErrorCode.PEER_DOWN) -> None:
        super().__init__(detail)
        self.rid = rid
        self.node_id = node_id
        self.detail = detail
        self.code = code


@dataclass
class Exclusions:
    """What a planner must avoid: (node, role kind) pairs that refused, and lost nodes."""

    refused: dict[tuple[str, str], str] = field(default_factory=dict)
    lost: dict[str, str] = field(default_factory=dict)

    def allows(self, node_id: str, kind: str) -> bool:
        return node_id not in self.lost and (node_id, kind) not in self.refused

    def reason(self, node_id: str, kind: str) -> str | None:
        return self.lost.get(node_id) or self.refused.get((node_id, kind))

    def nodes(self, kind: str) -> set[str]:
        """Node ids that may not take role ``kind``."""
        return set(self.lost) | {n for (n, k) in self.refused if k == kind}

    def reasons(self) -> list[str]:
        return [*self.refused.values(), *self.lost.values()]

    def __bool__(self) -> bool:
        return bool(self.refused or self.lost)


class Pillar(Protocol):
    """What a pillar gives the runner (``replay(lost) -> bool`` is optional)."""

    def plan(self, nodes: Sequence[Node], excluded: Exclusions) -> Placement: ...

    def run(self, job: Job, members: Mapping[tuple[str, str], Slot]) -> Awaitable[Any]: ...


@dataclass
class _Held:
    slot: Slot
    member: Member


class JobRunner:
    """Places and runs one pillar's job on a :class:`~p2pllm.daemon.jobs.Job`."""

    def __init__(self, job: Job, pillar: Any, *, what: str = "",
                 max_replans: int = MAX_REPLANS) -> None:
        self.job = job
        self.pillar = pillar
        self.what = what or job.pillar
        self.max_replans = max_replans
        self.excluded = Exclusions()
        self.held: dict[tuple[str, str], _Held] = {}
        self.plans = 0
        self.kept = 0
        self.replays = 0
        self.refusals: list[dict[str, Any]] = []
        self.losses: list[dict[str, Any]] = []
        self._names: dict[str, str] = {}  # node id -> name, as last seen
        self._told: dict[str, tuple[str, ...]] = {}  # node id -> the member list it holds

    # -- what the pillar sees --------------------------------------------------------------

    @property
    def members(self) -> dict[tuple[str, str], Slot]:
        """The assigned slots, by (node id, rid)."""
        return {k: h.slot for k, h in self.held.items()}

    def nodes(self) -> list[dict[str, Any]]:
        """The cluster's live nodes, without those lost in this job."""
        nodes = self.job.cluster.nodes()
        self._names.update({str(n["node_id"]): str(n["name"]) for n in nodes})
        return [n for n in nodes if n["node_id"] not in self.excluded.lost]

    # -- placing ---------------------------------------------------------------------------

    async def place(self) -> dict[tuple[str, str], Slot]:
        """Plan and assign until every slot is held; see the module's policy."""
        for attempt in range(self.max_replans + 1):
            placement = self._plan()
            allowed = tuple(sorted({s.node_id for s in placement}))
            await self._release_unplaced(placement)
            new = [s for s in placement if s.key not in self.held]
            self.kept += len(placement) - len(new)
            results = await asyncio.gather(*(self._assign(s, allowed) for s in new),
                                           return_exceptions=True)
            refused: list[tuple[Slot, AssignRefused]] = []
            for slot, res in zip(new, results, strict=True):
                if isinstance(res, asyncio.CancelledError):
                    raise res
                if isinstance(res, AssignRefused):
                    refused.append((slot, res))
                elif isinstance(res, BaseException):
                    raise res
            if not refused:
                await self._tell_members(allowed)
                self._publish()
                return self.members
            for slot, exc in refused:
                code = _code(exc)
                entry = {"node_id": slot.node_id, "name": exc.name, "role": slot.kind,
                         "rid": slot.rid, "reason": exc.reason, "code": int(code)}
                self.refusals.append(entry)
                if code not in RETRYABLE:
                    self._publish()
                    raise ProtocolError(code, f"{self.what}: {slot.describe()}: {exc.reason}")
                self.excluded.refused[(slot.node_id, slot.kind)] = (
                    f"{exc.name} refused {slot.kind}: {exc.reason}")
                log.info("%s: %s refused %s (%s); re-planning without it", self.job.id,
                         exc.name, slot.kind, exc.reason)
            self._publish()
            if attempt == self.max_replans:
                break
        raise ProtocolError(ErrorCode.REFUSED, (
            f"{self.what}: no placement was accepted after {self.max_replans} re-plans "
            f"(policy: {POLICY}): " + "; ".join(self.excluded.reasons())))

    def _plan(self) -> list[Slot]:
        self.plans += 1
        try:
            placement = list(self.pillar.plan(self.nodes(), self.excluded))
        except (PlanError, ProtocolError) as exc:
            self._publish()
            raise self._plan_failed(exc) from None
        keys = [s.key for s in placement]
        if len(set(keys)) != len(keys):
            raise ProtocolError(ErrorCode.INTERNAL, f"{self.what}: the plan places one rid "
                                f"twice on a node: {keys}")
        for s in placement:
            if not self.excluded.allows(s.node_id, s.kind):
                raise ProtocolError(ErrorCode.INTERNAL, (
                    f"{self.what}: the plan put {s.describe()} on an excluded node "
                    f"({self.excluded.reason(s.node_id, s.kind)})"))
        return placement

    def _plan_failed(self, exc: PlanError | ProtocolError) -> ProtocolError:
        if isinstance(exc, ProtocolError):
            code, message = ErrorCode(exc.code), exc.message
        else:
            code, message = exc.code or ErrorCode.REFUSED, str(exc)
        if not self.excluded:
            return ProtocolError(code, message)
        if self.excluded.lost:
            lost = "; ".join(self.excluded.lost.values())
            return ProtocolError(ErrorCode.PEER_DOWN, (
                f"{self.what}: {lost}; the survivors cannot take over: {message}"))
        unsaid = [r for r in self.excluded.refused.values() if r not in message]
        return ProtocolError(ErrorCode.REFUSED, (
            f"{self.what}: re-planned without the nodes that refused ({POLICY}), and "
            f"{message}" + (f"; refusals: {'; '.join(unsaid)}" if unsaid else "")))

    async def _release_unplaced(self, placement: Sequence[Slot]) -> None:
        want = {s.key: s for s in placement}
        drop = [h for k, h in self.held.items() if k not in want or not want[k].same(h.slot)]
        for h in drop:
            del self.held[h.slot.key]
        await asyncio.gather(*(self.job.release(h.member) for h in drop))
        self._forget_told()

    async def _assign(self, slot: Slot, allowed: tuple[str, ...]) -> None:
        await self.job.assign(slot.node_id, slot.kind, slot.params, rid=slot.rid,
                              summary=slot.summary, members=allowed)
        self._told[slot.node_id] = allowed
        member = next(m for m in reversed(self.job.members)
                      if m.node_id == slot.node_id and m.rid == slot.rid)
        self.held[slot.key] = _Held(slot, member)

    def _forget_told(self) -> None:
        """Nodes that hold no role of the job any more hold no member list of it either."""
        holding = {h.slot.node_id for h in self.held.values()}
        for node in [n for n in self._told if n not in holding]:
            del self._told[node]

    async def _tell_members(self, allowed: tuple[str, ...]) -> None:
        """JOB_MEMBERS to every member kept from an earlier placement whose list is stale."""
        stale = sorted({h.slot.node_id for h in self.held.values()
                        if self._told.get(h.slot.node_id) != allowed})

        async def tell(node: str) -> None:
            try:
                await self.job.cluster.request(node, MsgType.JOB_MEMBERS,
                                               {"job": self.job.id, "members": list(allowed)},
                                               timeout=30)
            except (ConnectionClosed, RemoteError, TimeoutError) as exc:
                # the pillar meets that member's loss (or refusal) when it runs
                log.warning("%s: cannot send the member list to %s: %s", self.job.id,
                            self._names.get(node, node[:8]), exc)
                return
            self._told[node] = allowed

        await asyncio.gather(*(tell(n) for n in stale))

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> Any:
        """Place, run the pillar; on a lost member replay (if the pillar does) or fail."""
        while True:
            await self.place()
            try:
                return await self.pillar.run(self.job, self.members)
            except MemberLost as exc:
                lost = await self.lose(exc)
                replay: Callable[[Lost], bool] | None = getattr(self.pillar, "replay", None)
                if replay is None or not replay(lost):
                    raise ProtocolError(lost.code, f"{self.what}: {lost.describe()}") from exc
                self.replays += 1
                self._publish()
                log.warning("%s: %s; replaying on the survivors", self.job.id, lost.describe())

    async def lose(self, exc: MemberLost) -> Lost:
        """Record a lost member: exclude its node, forget (and try to release) its roles."""
        held = [h for h in self.held.values() if h.slot.rid == exc.rid
                and (exc.node_id is None or h.slot.node_id == exc.node_id)]
        if held:
            slot = held[0].slot
        else:
            slot = Slot(exc.rid, "?", exc.node_id or "?", {}, label=exc.rid)
        name = self._names.get(slot.node_id) or self.job.node_name(slot.node_id)
        lost = Lost(slot, name, exc.detail, exc.code)
        self.excluded.lost[slot.node_id] = lost.describe()
        self.losses.append({"node_id": slot.node_id, "name": lost.name, "rid": slot.rid,
                            "role": slot.kind, "detail": exc.detail})
        gone = [h for h in self.held.values() if h.slot.node_id == slot.node_id]
        for h in gone:
            del self.held[h.slot.key]
        await asyncio.gather(*(_release_quietly(self.job, h.member, "lost") for h in gone))
        self._forget_told()
        self._publish()
        return lost

    def drop(self, node_id: str, rid: str) -> Slot | None:
        """Forget a member that lost its role without excluding its node (a pillar with
        elastic membership re-places it with the next :meth:`place`)."""
        held = self.held.pop((node_id, rid), None)
        if held is None:
            return None
        self.job.forget(held.member, "lost")
        return held.slot

    def _publish(self) -> None:
        self.job.update(runner={
            "policy": POLICY, "plans": self.plans, "kept": self.kept, "replays": self.replays,
            "refusals": list(self.refusals), "lost": list(self.losses),
            "members": [{"node_id": s.node_id, "rid": s.rid, "role": s.kind}
                        for s in self.members.values()],
        })


def _code(exc: AssignRefused) -> ErrorCode:
    cause = exc.__cause__
    if isinstance(cause, RemoteError):
        try:
            return ErrorCode(cause.code)
        except ValueError:
            return ErrorCode.INTERNAL
    if isinstance(cause, TimeoutError):
        return ErrorCode.TIMEOUT
    if isinstance(cause, ConnectionClosed):
        return ErrorCode.PEER_DOWN
    return ErrorCode.REFUSED


async def _release_quietly(job: Job, member: Member, reason: str) -> None:
    """RELEASE a lost member's role, without waiting long for a node that may be frozen."""
    try:
        async with asyncio.timeout(2.0):
            await job.release(member, reason)
    except TimeoutError:
        job.forget(member, reason)
