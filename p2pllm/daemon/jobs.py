"""Coordinator side of jobs: plan -> ASSIGN -> ACK -> run -> RELEASE, owned by one context.

A pillar's coordinator is an async function `coordinate(host, req) -> Reply` registered for
a message type (GENERATE, FL_RUN, TRAIN_RUN). It opens a `Job` with `host.job(...)`; every role
it assigns through the job is released when the job ends, whatever way it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from p2pllm.daemon import state as ev
from p2pllm.daemon.roles import Cluster
from p2pllm.wire.connection import ConnectionClosed, RemoteError, Reply, Request
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode, MsgType

if TYPE_CHECKING:
    from p2pllm.config import DaemonConfig

log = logging.getLogger(__name__)

ASSIGN_TIMEOUT = 300.0  # loading a model can take a while
ENDED = "job ended"  # the release reason of every member still held when a job ends


class AssignRefused(Exception):
    """A member refused (or failed) an ASSIGN; `node_id` and `reason` say who and why."""

    def __init__(self, node_id: str, name: str, role: str, reason: str) -> None:
        super().__init__(f"{name} ({node_id[:8]}) refused {role}: {reason}")
        self.node_id = node_id
        self.name = name
        self.role = role
        self.reason = reason


@dataclass
class Member:
    node_id: str
    rid: str
    role: str


class Job:
    """One running job, as its coordinator holds it."""

    def __init__(self, host: JobHost, pillar: str, params: Mapping[str, Any]) -> None:
        self.host = host
        self.pillar = pillar
        self.id = f"{pillar}-{uuid.uuid4().hex[:8]}"
        self.params = dict(params)
        self.members: list[Member] = []
        self.stopped = False

    @property
    def cluster(self) -> Cluster:
        return self.host.cluster

    def node_name(self, node_id: str) -> str:
        for n in self.cluster.nodes():
            if n["node_id"] == node_id:
                return str(n["name"])
        return node_id[:8]

    async def assign(
        self, node_id: str, role: str, params: Mapping[str, Any], *, rid: str | None = None, summary: str = "",
        members: Sequence[str] = (),
    ) -> str:
        """ASSIGN a role; raises AssignRefused with the member's reason. ``members``: the node
        ids the role takes the job's frames from besides this coordinator (protocol.md 4.4)."""
        rid = rid or role
        meta = {"job": self.id, "rid": rid, "role": role, "params": dict(params), "pillar": self.pillar}
        if members:
            meta["members"] = list(members)
        try:
            await self.cluster.request(node_id, MsgType.ASSIGN, meta, timeout=ASSIGN_TIMEOUT)
        except RemoteError as exc:
            raise AssignRefused(node_id, self.node_name(node_id), role, exc.message) from exc
        except (ConnectionClosed, TimeoutError) as exc:
            raise AssignRefused(node_id, self.node_name(node_id), role, f"unreachable: {exc}") from exc
        self.members.append(Member(node_id, rid, role))
        self.host.emit(ev.JobMember(self.id, node_id, rid, role, summary))
        return rid

    async def release(self, member: Member, reason: str = "released") -> None:
        try:
            with contextlib.suppress(ConnectionClosed, RemoteError, TimeoutError):
                await self.cluster.request(
                    member.node_id, MsgType.RELEASE, {"job": self.id, "rid": member.rid},
                    timeout=30)
        finally:
            self.forget(member, reason)

    def forget(self, member: Member, reason: str) -> None:
        """``member`` left the job ("released" or "lost"): off the live member list.

        Members released because the job ended (reason ``ENDED``) stay in the job's record:
        a finished job lists who held its roles.
        """
        if member in self.members:
            self.members.remove(member)
            if reason != ENDED:
                self.host.emit(ev.JobMemberLeft(self.id, member.node_id, member.rid, reason))

    async def release_all(self) -> None:
        await asyncio.gather(*(self.release(m, ENDED) for m in list(self.members)))

    def update(self, **metrics: Any) -> None:
        self.host.emit(ev.JobUpdated(self.id, metrics))


class JobHost:
    """What a coordinator function gets from its daemon."""

    def __init__(
        self,
        cluster: Cluster,
        config: DaemonConfig,
        emit: Callable[[ev.Event], None],
        running: dict[str, tuple[Job, asyncio.Task[Any]]],
    ) -> None:
        self.cluster = cluster
        self.config = config
        self.emit = emit
        self._running = running

    @contextlib.asynccontextmanager
    async def job(self, pillar: str, params: Mapping[str, Any]) -> AsyncIterator[Job]:
        job = Job(self, pillar, params)
        task = asyncio.current_task()
        assert task is not None
        self._running[job.id] = (job, task)
        self.emit(ev.JobStarted(job.id, pillar, self.cluster.node_id, time.time(), job.params))
        state, error = "done", None
        try:
            yield job
        except asyncio.CancelledError:
            state, error = "stopped", "stopped by operator"
            if job.stopped:
                task.uncancel()
                raise ProtocolError(ErrorCode.CANCELLED, f"job {job.id} was stopped") from None
            raise
        except BaseException as exc:
            state, error = "failed", str(exc)
            raise
        finally:
            self._running.pop(job.id, None)
            # Release even if we are being cancelled: shield the cleanup.
            await asyncio.shield(job.release_all())
            self.emit(ev.JobEnded(job.id, state, error, time.time()))

    def get(self, job_id: str) -> Job | None:
        """The running job ``job_id`` this node coordinates, or None."""
        entry = self._running.get(job_id)
        return entry[0] if entry is not None else None

    def stop(self, job_id: str) -> bool:
        entry = self._running.get(job_id)
        if entry is None:
            return False
        job, task = entry
        job.stopped = True
        task.cancel()
        return True


Coordinator = Callable[[JobHost, Request], Awaitable[Reply]]
# The fields of a GENERATE request besides its prompt (``prompt`` / ``prompt_ids``): what
# `p2pllm generate` sends from its flags and a serve config may fix (daemon/serving.py); each
# pillar's schema says which of them its mode takes.
GENERATE_KEYS = (
    "mode", "model", "draft_model", "draft_tokens", "adapter", "dtype", "quant", "draft_quant",
    "draft_dtype", "max_tokens", "ignore_eos",
    "temperature", "top_k", "top_p", "repetition_penalty", "seed", "verifier", "drafter",
    "shards", "layers", "wire_dtype", "batch_decode", "keep_alive", "tp",
)


def coordinator_registry() -> dict[MsgType, Coordinator]:
    """Coordinators of the pillars, by the message type a CLI sends to start them."""
    out: dict[MsgType, Coordinator] = {}
    for msg_type, module, name in _COORDINATORS:
        try:
            mod = __import__(module, fromlist=[name])
        except ImportError as exc:
            log.debug("coordinator %s unavailable: %s", module, exc)
            continue
        fn = getattr(mod, name, None)
        if fn is not None:
            out[msg_type] = fn
    return out


async def coordinate_generate(host: JobHost, req: Request) -> Reply:
    """GENERATE: dispatch on meta["mode"] to the pillar that runs it."""
    mode = req.meta.get("mode")
    table = {
        "spec": ("p2pllm.pillars.speculative.coordinator", "coordinate"),
        "split": ("p2pllm.pillars.split.pipeline", "coordinate"),
        "tp": ("p2pllm.pillars.tp.coordinator", "coordinate"),
    }
    if mode not in table:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"unknown generate mode {mode!r}; the daemon runs {sorted(table)}"
        )
    module, name = table[mode]
    try:
        fn: Coordinator = getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError) as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"mode {mode} is not available: {exc}") from exc
    return await fn(host, req)


_COORDINATORS: tuple[tuple[MsgType, str, str], ...] = (
    (MsgType.GENERATE, "p2pllm.daemon.jobs", "coordinate_generate"),
    (MsgType.FL_RUN, "p2pllm.pillars.federated.coordinator", "coordinate"),
    (MsgType.TRAIN_RUN, "p2pllm.pillars.splittrain.coordinator", "coordinate"),
)
