"""Operator job control across the cluster: JOBS (every node's jobs, fanned out to the peers)
and JOB_STOP (stop a job wherever it is coordinated, forwarding once).

Who may stop a job (protocol.md 4.4): a ctl client of its coordinator's daemon (the job
stops), or a ctl client of a member's daemon: that host's operator decides what runs on it, so
the member forwards the stop to the coordinator (which obeys a forwarded JOB_STOP from a current
member of the job) and releases its own roles. A ctl client of any other daemon is told which
daemon coordinates the job (FORBIDDEN). A peer's JOB_STOP must be the forwarded form, and is
obeyed from a member (at the coordinator) or from the coordinator (at a member); others get
FORBIDDEN.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from p2pllm.daemon.messages import JOB_STOP
from p2pllm.daemon.peers import PeerLink
from p2pllm.wire.connection import Connection, ConnectionClosed, RemoteError, Reply, Request
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode, MsgType

if TYPE_CHECKING:
    from p2pllm.daemon.daemon import Daemon


class JobControl:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    async def on_jobs(self, conn: Connection, req: Request) -> Reply:
        """Jobs this node coordinates, plus (unless "local") those its peers coordinate."""
        snap = self.d.snapshot()
        jobs = {j["job"]: j for j in snap["jobs"]}
        if not req.meta.get("local"):
            for peer_jobs in await self._peer_jobs():
                for j in peer_jobs:
                    if j["job"] not in jobs or j.get("coordinator") == j.get("reported_by"):
                        jobs[j["job"]] = j
        ordered = sorted(jobs.values(), key=lambda j: j.get("started") or 0)
        return Reply(MsgType.JOBS, {"jobs": ordered, "roles": snap["node"]["roles"]})

    async def _peer_jobs(self) -> list[list[dict[str, Any]]]:
        async def one(link: PeerLink) -> list[dict[str, Any]]:
            if link.conn is None or link.conn.closed:
                return []
            try:
                frame = await link.conn.request(MsgType.JOBS, {"local": True}, timeout=3)
            except (ConnectionClosed, RemoteError, TimeoutError):
                return []
            jobs = frame.meta.get("jobs")
            if not isinstance(jobs, list):
                return []
            return [{**j, "reported_by": link.node_id} for j in jobs if _well_formed(j)]

        return list(await asyncio.gather(*(one(link) for link in list(self.d.peers.links.values()))))

    async def on_job_stop(self, conn: Connection, req: Request) -> Reply:
        d = self.d
        m = JOB_STOP.parse(req.meta)  # BAD_REQUEST naming the field (protocol.md 4.3)
        job, forwarded = m["job"], m["forwarded"]
        if conn.info.get("kind") == "peer":
            return await self._peer_stop(job, forwarded, d.hosting.sender(conn))
        if d.jobs.stop(job):
            return Reply(MsgType.ACK, {"stopped": job, "where": "coordinator"})
        if job in d.hosting.roles:
            for coord in d.hosting.coordinators(job):
                if coord != d.node_id and not forwarded:
                    with contextlib.suppress(ConnectionClosed, RemoteError, TimeoutError):
                        await d.request(coord, MsgType.JOB_STOP, {"job": job, "forwarded": True}, timeout=10)
            await d.hosting.release(job, None, "stopped by operator")
            return Reply(MsgType.ACK, {"stopped": job, "where": "member"})
        if not forwarded:
            # Neither coordinated nor held here: say where it can be stopped.
            for peer_jobs in await self._peer_jobs():
                for j in peer_jobs:
                    if j["job"] == job and j.get("state") == "running" and j.get("coordinator"):
                        where = self._where(str(j["coordinator"]))
                        raise ProtocolError(ErrorCode.FORBIDDEN, (
                            f"job {job} is coordinated by {where}; {d.name} takes no part in it: "
                            f"stop it from a ctl client of its coordinator (p2pllm ctl stop {job} "
                            f"--daemon ADDRESS) or of one of its members"))
        raise ProtocolError(ErrorCode.UNKNOWN_JOB, f"no running job {job} known to {d.name} or its peers")

    def _where(self, node_id: str) -> str:
        for n in self.d.nodes():
            if n["node_id"] == node_id:
                return f"{n['name']} ({n['address']})"
        return node_id[:8]

    async def _peer_stop(self, job: str, forwarded: bool, sender: str) -> Reply:
        """JOB_STOP from another daemon: only the forwarded form, from a member of the job
        (to its coordinator) or from its coordinator (to a member)."""
        d = self.d
        if not forwarded:
            raise ProtocolError(ErrorCode.FORBIDDEN, (
                f"JOB_STOP for job {job} from peer {sender[:16]}: a peer may send only the "
                f"forwarded form (forwarded: true); an operator stops a job with a ctl client"))
        running = d.jobs.get(job)
        if running is not None:
            if sender in {member.node_id for member in running.members}:
                d.jobs.stop(job)
                return Reply(MsgType.ACK, {"stopped": job, "where": "coordinator"})
            raise ProtocolError(ErrorCode.FORBIDDEN, (
                f"JOB_STOP for job {job} from node {sender[:16]}: {d.name} coordinates it and "
                f"takes a forwarded stop only from its members"))
        grant = d.hosting.grants.get(job)
        if grant is not None:
            if sender == grant.coordinator:
                await d.hosting.release(job, None, "stopped by its coordinator")
                return Reply(MsgType.ACK, {"stopped": job, "where": "member"})
            raise ProtocolError(ErrorCode.FORBIDDEN, (
                f"JOB_STOP for job {job} from node {sender[:16]}: only the job's coordinator "
                f"may stop its roles on {d.name}"))
        raise ProtocolError(ErrorCode.UNKNOWN_JOB, f"no job {job} on {d.name}")


def _well_formed(j: Any) -> bool:
    """A peer's job entry we can merge, sort and forward to (a hostile or broken peer's junk
    would fail JOBS and JOB_STOP for everyone): a string job id, a numeric start, a string
    coordinator."""
    return (isinstance(j, dict) and isinstance(j.get("job"), str)
            and (j.get("started") is None or (isinstance(j["started"], int | float) and not isinstance(j["started"], bool)))
            and (j.get("coordinator") is None or isinstance(j["coordinator"], str)))
