"""Role hosting: ASSIGN builds and starts a role, messages tagged with its job reach its
handlers, RELEASE (or its coordinator going down, or shutdown) stops it.

Authorization (protocol.md 4.4, :mod:`.authz`): the first ASSIGN of a job here makes its
sender the job's coordinator on this node; only it may ASSIGN more of the job's roles, RELEASE
them or send JOB_MEMBERS, and only it and the members it named may send the roles frames.

The role classes, their context and registry are in :mod:`p2pllm.daemon.roles`; this module
holds the roles this daemon runs, by job and rid.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from p2pllm.config import ROLE_KINDS
from p2pllm.daemon import state as ev
from p2pllm.daemon.authz import Grant
from p2pllm.daemon.messages import ASSIGN, JOB_MEMBERS, RELEASE
from p2pllm.daemon.roles import Refused, Role, RoleContext, RoleHandler, role_registry
from p2pllm.wire.connection import Connection, Reply, Request
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode, MsgType

if TYPE_CHECKING:
    from p2pllm.daemon.daemon import Daemon

log = logging.getLogger(__name__)


def _view(read: Callable[[], Any], default: Any) -> Any:
    """A role's status view (summary, memory), or `default` when it cannot tell yet."""
    try:
        value = read()
        if isinstance(default, int) and (isinstance(value, bool) or not isinstance(value, int)):
            return default
        return value
    except Exception as exc:
        log.debug("a role's view failed (%s: %s)", type(exc).__name__, exc)
        return default


class RoleHost:
    def __init__(self, daemon: Daemon, spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]]) -> None:
        self.d = daemon
        self._spawn = spawn
        self.registry = role_registry(daemon.config.test_roles)
        self.roles: dict[str, dict[str, Role]] = {}
        self.grants: dict[str, Grant] = {}  # job -> who may act on its roles here
        self._handlers: dict[tuple[str, str], Mapping[MsgType, RoleHandler]] = {}
        self.coordinator_of: dict[tuple[str, str], str] = {}

    # -- views --------------------------------------------------------------------------------

    def memory_used(self) -> int:
        return sum(_view(r.memory_bytes, 0) for roles in self.roles.values() for r in roles.values())

    def held(self) -> list[dict[str, Any]]:
        # A role is listed from ASSIGN on, while it may still be starting: its views must not
        # fail HELLO / AUTH / STATUS for everyone (caps_now() reads them).
        return [
            {"job": job, "rid": rid, "role": r.kind, "summary": _view(r.summary, "starting")}
            for job, roles in self.roles.items()
            for rid, r in roles.items()
        ]

    def coordinators(self, job: str) -> set[str]:
        return {c for (j, _), c in self.coordinator_of.items() if j == job}

    def publish_metrics(self) -> None:
        for (job, rid) in list(self._handlers):
            role = self.roles.get(job, {}).get(rid)
            if role is not None:
                try:
                    self.d.emit(ev.RoleMetrics(job, rid, role.metrics()))
                except Exception:
                    log.debug("metrics of %s/%s failed", job, rid, exc_info=True)

    # -- ASSIGN / RELEASE ---------------------------------------------------------------------

    def sender(self, conn: Connection) -> str:
        """The node id a connection's handshake gave (this node's own for the in-process one)."""
        return str(conn.info.get("node_id") or "")

    def _grant(self, job: str, sender: str, what: str) -> Grant | None:
        """The job's grant here if ``sender`` coordinates it; None if the job is not held
        here; FORBIDDEN if another node coordinates it."""
        grant = self.grants.get(job)
        if grant is not None and grant.coordinator != sender:
            raise ProtocolError(ErrorCode.FORBIDDEN, (
                f"{what} for job {job} from node {sender[:16]}: only the job's coordinator "
                f"may send it to {self.d.name}"))
        return grant

    async def on_assign(self, conn: Connection, req: Request) -> Reply:
        d = self.d
        m = ASSIGN.parse(req.meta)  # BAD_REQUEST naming the field (protocol.md 4.3)
        job, kind, params = m["job"], m["role"], dict(m["params"])
        rid = m["rid"] or kind
        coordinator = self.sender(conn)
        grant = self._grant(job, coordinator, "ASSIGN")
        if kind in ROLE_KINDS and not d.config.accepts(kind):
            raise Refused(f"role {kind} is pinned elsewhere: {d.name} accepts only {', '.join(d.config.roles)}")
        cls = self.registry.get(kind)
        if cls is None:
            raise Refused(f"unknown role {kind!r}; this daemon hosts {', '.join(sorted(self.registry))}")
        if rid in self.roles.get(job, {}):
            raise Refused(f"{d.name} already holds {rid} in job {job}")
        reason = cls.refuse(d.config, d.caps_now(), params)
        if reason:
            raise Refused(reason)
        ctx = RoleContext(
            job=job,
            rid=rid,
            coordinator=coordinator,
            node_id=d.node_id,
            config=d.config,
            cluster=d,
            report=lambda metrics: d.emit(ev.RoleMetrics(job, rid, metrics)),
            fetch_model=functools.partial(d.weights.fetch_model, job),
        )
        role = cls(ctx, params)
        if grant is None:
            grant = self.grants[job] = Grant(coordinator)
        grant.name(m["members"])
        self.roles.setdefault(job, {})[rid] = role
        try:
            await role.start()
        except ProtocolError:
            self._forget(job, rid)
            raise
        except asyncio.CancelledError:
            self._forget(job, rid)
            with contextlib.suppress(Exception):
                await role.stop()
            raise
        except Exception as exc:
            self._forget(job, rid)
            log.warning("role %s in %s failed to start", kind, job, exc_info=True)
            raise Refused(f"{kind} failed to start on {d.name}: {exc}") from exc
        self._handlers[(job, rid)] = dict(role.handlers())
        self.coordinator_of[(job, rid)] = coordinator
        d.emit(ev.RoleAssigned(job, rid, kind, coordinator, role.summary(), time.time()))
        log.info("assigned %s/%s (%s) by %s", job, rid, kind, coordinator[:8])
        self._spawn(d.broadcast_caps())
        return Reply(MsgType.ACK, {"job": job, "rid": rid})

    def _forget(self, job: str, rid: str) -> Role | None:
        roles = self.roles.get(job, {})
        role = roles.pop(rid, None)
        if not roles:
            self.roles.pop(job, None)
        self._handlers.pop((job, rid), None)
        self.coordinator_of.pop((job, rid), None)
        if job not in self.roles:
            self.grants.pop(job, None)
        return role

    async def on_release(self, conn: Connection, req: Request) -> Reply:
        m = RELEASE.parse(req.meta)
        self._grant(m["job"], self.sender(conn), "RELEASE")
        released = await self.release(m["job"], m["rid"], "released by coordinator")
        return Reply(MsgType.ACK, {"released": released})

    async def on_members(self, conn: Connection, req: Request) -> Reply:
        """JOB_MEMBERS: the coordinator's new member list of a job (after a re-plan)."""
        m = JOB_MEMBERS.parse(req.meta)
        job = m["job"]
        grant = self._grant(job, self.sender(conn), "JOB_MEMBERS")
        if grant is None:
            raise ProtocolError(ErrorCode.UNKNOWN_JOB, f"no job {job!r} on {self.d.name}")
        grant.name(m["members"])
        return Reply(MsgType.ACK, {"job": job, "members": len(grant.members)})

    async def release(self, job: str, rid: str | None, reason: str) -> list[str]:
        rids = [rid] if rid is not None else list(self.roles.get(job, {}))
        done = []
        for r in rids:
            role = self._forget(job, r)
            if role is None:
                continue
            try:
                await role.stop()
            except Exception:
                log.warning("role %s/%s failed to stop cleanly", job, r, exc_info=True)
            self.d.emit(ev.RoleReleased(job, r))
            log.info("released %s/%s: %s", job, r, reason)
            done.append(r)
        if done:
            self._spawn(self.d.broadcast_caps())
        return done

    def release_orphans(self, node_id: str, name: str) -> None:
        """Roles whose coordinator died are orphans: release them."""
        for (job, rid), coord in list(self.coordinator_of.items()):
            if coord == node_id:
                self._spawn(self.release(job, rid, f"coordinator {name} is down"))

    async def release_all(self, reason: str) -> None:
        for job in list(self.roles):
            await self.release(job, None, reason)

    # -- routing ------------------------------------------------------------------------------

    async def route(self, conn: Connection, req: Request) -> Reply | None:
        d = self.d
        job = req.meta["job"]
        t = req.frame.msg_type
        roles = self.roles.get(job) if isinstance(job, str) else None
        if not roles:
            raise ProtocolError(ErrorCode.UNKNOWN_JOB, f"no job {job!r} on {d.name}")
        grant = self.grants.get(job)
        sender = self.sender(conn)
        if grant is None or not grant.may_send(sender):
            # before any rid or type is looked up: a non-member learns nothing of the roles
            raise ProtocolError(ErrorCode.FORBIDDEN, (
                f"{t.name} for job {job} from node {sender[:16]}: {d.name} takes the job's "
                f"frames only from its coordinator and the members it named"))
        rid = req.meta.get("rid")
        if rid is not None and not isinstance(rid, str):  # a list or map is unhashable below
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{t.name}: rid must be a string, got {type(rid).__name__}")
        if rid is not None:
            handler = self._handlers.get((job, rid), {}).get(t)
        else:
            found = [h for r in roles if (h := self._handlers.get((job, r), {}).get(t))]
            if len(found) > 1:
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"job {job} has several roles for {t.name}: name a rid")
            handler = found[0] if found else None
        if handler is None:
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"no role of job {job} on {d.name} handles {t.name}")
        return await handler(req)
