"""Operator job control across the cluster: JOBS (every node's jobs, fanned out to the peers)
and JOB_STOP (stop a job wherever it is coordinated, forwarding once)."""

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
            return [{**j, "reported_by": link.node_id} for j in jobs if isinstance(j, dict) and "job" in j]

        return list(await asyncio.gather(*(one(link) for link in list(self.d.peers.links.values()))))

    async def on_job_stop(self, conn: Connection, req: Request) -> Reply:
        d = self.d
        m = JOB_STOP.parse(req.meta)  # BAD_REQUEST naming the field (protocol.md 4.3)
        job, forwarded = m["job"], m["forwarded"]
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
            # Not ours: find the coordinator among the peers and ask it.
            for peer_jobs in await self._peer_jobs():
                for j in peer_jobs:
                    if j["job"] == job and j.get("state") == "running" and j.get("coordinator"):
                        frame = await d.request(
                            j["coordinator"], MsgType.JOB_STOP, {"job": job, "forwarded": True}, timeout=60
                        )
                        return Reply(MsgType.ACK, frame.meta)
        raise ProtocolError(ErrorCode.UNKNOWN_JOB, f"no running job {job} known to {d.name} or its peers")
