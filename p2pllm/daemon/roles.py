"""Role hosting: the Role base class, what a role sees of its daemon, and the registry.

A coordinator sends ASSIGN(job, rid, role, params); the member's RoleHost checks the role
class's `refuse()` (pinned elsewhere, no memory, model missing), builds it, awaits `start()`,
and routes messages tagged with that job to the role's handlers until RELEASE (or the
coordinator's death) makes it `stop()`.

Every role owns one RoleWorker (`self.worker`, :mod:`.worker`): its compute runs there, in
order, off the event loop. `start()`, `stop()` and `metrics()` are the base class's: they call
the role's `on_start()`, `on_stop()` and `role_metrics()`, close the worker when the role stops
(or fails to start), and add the worker's figures (busy and idle seconds, items, queue depth,
busy fraction) to the role's metrics under "worker".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, final

from p2pllm.daemon.worker import RoleWorker
from p2pllm.wire.connection import Reply, Request
from p2pllm.wire.frame import Buffer, Frame, ProtocolError
from p2pllm.wire.messages import ErrorCode, MsgType

if TYPE_CHECKING:
    from p2pllm.config import DaemonConfig
    from p2pllm.weights.slices import Need

log = logging.getLogger(__name__)

RoleHandler = Callable[[Request], Awaitable[Reply | None]]
# fetch_model(ref, need, sources) -> the folder to load from (protocol.md 4.6 and 13)
FetchModel = Callable[[str, "Need | None", Sequence[str]], Awaitable[Path]]


class Refused(ProtocolError):
    """An ASSIGN this daemon will not take; the reason is shown to the coordinator."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.REFUSED, message)


class Cluster(Protocol):
    """What roles and coordinators may do with the rest of the cluster (the daemon implements it).

    Node ids name peers; the local node's own id works too: the request is handed over
    in-process (:class:`~p2pllm.wire.local.LocalConnection`, no socket), through the same
    dispatch as a remote peer's. Byte counts are bytes on the wire: a response's
    `wire_bytes`/`sent_bytes` and `notify`'s return value, all 0 in-process.
    """

    node_id: str
    name: str

    def nodes(self) -> list[dict[str, Any]]:
        """This node and every peer that is up: {"node_id", "name", "address", "caps", "self"}."""
        ...

    async def request(
        self,
        node_id: str,
        msg_type: MsgType,
        meta: dict[str, Any],
        payload: Sequence[Buffer] = (),
        *,
        timeout: float | None = None,
    ) -> Frame: ...

    def stream(
        self,
        node_id: str,
        msg_type: MsgType,
        meta: dict[str, Any],
        payload: Sequence[Buffer] = (),
        *,
        idle_timeout: float | None = None,
    ) -> AsyncIterator[Frame]: ...

    async def notify(
        self, node_id: str, msg_type: MsgType, meta: dict[str, Any], payload: Sequence[Buffer] = ()
    ) -> int:
        """A one-way message; returns the bytes it took on the wire (0 in-process)."""
        ...

    def notify_nowait(
        self, node_id: str, msg_type: MsgType, meta: dict[str, Any], payload: Sequence[Buffer] = ()
    ) -> int:
        """`notify` from plain code (a RoleWorker follow-up): written when this returns,
        never waits; a sender that may outpace the peer awaits `wait_writable` after."""
        ...

    async def wait_writable(self, node_id: str) -> None:
        """Return once the link to `node_id` takes writes again (at once unless it paused)."""
        ...


@dataclass(frozen=True)
class RoleContext:
    job: str
    rid: str
    coordinator: str
    node_id: str
    config: DaemonConfig
    cluster: Cluster
    report: Callable[[dict[str, Any]], None]  # publish this role's metrics to the state
    # The model's folder: in this host's roots (no fetch), or its models cache holding the
    # pieces ``need`` names (None: the whole model) fetched from ``sources`` (node ids holding
    # it whole; protocol.md 4.6 and 13). ProtocolError NOT_FOUND when the roots lack it and no
    # source is given, PEER_DOWN naming what is missing when the fetch cannot complete.
    # None where no daemon stands behind the role (tests building a context by hand).
    fetch_model: FetchModel | None = None


class Role:
    """Base class: one role instance in one job on one daemon."""

    kind: ClassVar[str] = ""

    def __init__(self, ctx: RoleContext, params: Mapping[str, Any]) -> None:
        self.ctx = ctx
        self.params = dict(params)
        # the role's compute thread (started on first use)
        self.worker = RoleWorker(f"{self.kind or 'role'}:{ctx.rid}@{ctx.job}"[:64])
        self._owns_worker = True

    @classmethod
    def refuse(cls, config: DaemonConfig, caps: Mapping[str, Any], params: Mapping[str, Any]) -> str | None:
        """A reason to refuse this assignment, or None to accept. Must be cheap."""
        return None

    def use_worker(self, worker: RoleWorker) -> None:
        """Compute on a worker shared with other roles (one verifier engine serves every job on
        its target) instead of the role's own: its figures show in this role's metrics, marked
        shared, and its owner closes it."""
        self.worker.close()
        self.worker = worker
        self._owns_worker = False

    @final
    async def start(self) -> None:
        """Run on_start(); if it fails (a refusal included), close the worker and re-raise."""
        try:
            await self.on_start()
        except BaseException:
            await asyncio.shield(self._close_worker())
            raise

    @final
    async def stop(self) -> None:
        """Run on_stop(), then close the worker: queued items fail, a running one finishes."""
        try:
            await self.on_stop()
        finally:
            await asyncio.shield(self._close_worker())

    async def _close_worker(self) -> None:
        if self._owns_worker:
            await self.worker.aclose()

    @final
    def metrics(self) -> dict[str, Any]:
        """The role's own figures, and its worker's under "worker"."""
        worker = self.worker.stats().as_dict()
        if not self._owns_worker:
            worker["shared"] = True
        return {**self.role_metrics(), "worker": worker}

    async def on_start(self) -> None:
        """Load what the role needs (on self.worker). Raise Refused (or ProtocolError) to refuse."""

    async def on_stop(self) -> None:
        """Free everything; called once, on RELEASE, job stop or daemon shutdown."""

    def handlers(self) -> Mapping[MsgType, RoleHandler]:
        return {}

    def role_metrics(self) -> dict[str, Any]:
        """What this role reports (the base class adds the worker's figures)."""
        return {}

    def summary(self) -> str:
        """A short description for status views, e.g. 'layers 0-4'."""
        return ""

    def memory_bytes(self) -> int:
        """Bytes this role holds (weights, caches), for the memory budget."""
        return 0


class EchoRole(Role):
    """A trivial role for tests: answers ROLE_CALL with its params and the request's meta.

    Hosted only by a daemon started with ``test_roles`` (``p2pllmd --test-roles``): tests turn
    it on; anywhere else it is an unknown role."""

    kind = "echo"

    @classmethod
    def refuse(cls, config: DaemonConfig, caps: Mapping[str, Any], params: Mapping[str, Any]) -> str | None:
        if params.get("refuse"):
            return f"echo refused on request: {params['refuse']}"
        need = int(params.get("memory", 0))
        if need > int(caps.get("mem_budget", 0)) - int(caps.get("mem_used_by_roles", 0)):
            return f"not enough memory: need {need} bytes"
        return None

    async def on_start(self) -> None:
        self.calls = 0
        self.stopped = False

    async def on_stop(self) -> None:
        self.stopped = True

    def handlers(self) -> Mapping[MsgType, RoleHandler]:
        return {MsgType.ROLE_CALL: self.on_call}

    async def on_call(self, req: Request) -> Reply:
        self.calls += 1
        self.ctx.report({"calls": self.calls})
        return Reply(MsgType.ROLE_CALL, {"params": self.params, "echo": req.meta.get("data")}, [req.frame.payload] if req.frame.payload.nbytes else [])

    def role_metrics(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def memory_bytes(self) -> int:
        return int(self.params.get("memory", 0))


def role_registry(test_roles: bool = False) -> dict[str, type[Role]]:
    """Every role class the daemon can host, by kind. Pillars plug in here; the test-only
    echo role only with ``test_roles``."""
    registry: dict[str, type[Role]] = {EchoRole.kind: EchoRole} if test_roles else {}
    for module, names in _PILLAR_ROLES:
        try:
            mod = __import__(module, fromlist=names)
        except ImportError as exc:  # a pillar not built yet
            log.debug("roles from %s unavailable: %s", module, exc)
            continue
        for name in names:
            cls = getattr(mod, name, None)
            if isinstance(cls, type) and issubclass(cls, Role):
                registry[cls.kind] = cls
    return registry


# (module, role classes) of the pillars; imported when the daemon starts.
_PILLAR_ROLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("p2pllm.pillars.speculative.roles", ("DrafterRole", "VerifierRole")),
    ("p2pllm.pillars.split.shard", ("ShardRole",)),
    ("p2pllm.pillars.federated.client", ("FLClientRole",)),
    ("p2pllm.pillars.splittrain.stage", ("TrainStageRole",)),
    ("p2pllm.pillars.tp.roles", ("TPRankRole",)),
)
