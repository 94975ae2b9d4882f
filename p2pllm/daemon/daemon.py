"""p2pllmd: the daemon every host runs. This module wires the parts and routes messages.

- :mod:`.peers`      the peer table: one live link per peer, keepalive, link figures
- :mod:`.dialing`    dial targets (--peer, mDNS, inbound) and their dial loops
- :mod:`.handshake`  accepted connections, HELLO / AUTH
- :mod:`.status`     STATUS, SUBSCRIBE, LINK_PROBE
- :mod:`.jobctl`     JOBS across the cluster, JOB_STOP forwarding
- :mod:`.hosting`    ASSIGN / RELEASE and routing job messages to the roles held here
- :mod:`.authz`      which connection kind may send what, who may act on a job's roles
- :mod:`.jobs`       the coordinator side of jobs (JobHost)
- :mod:`.weights`    models' pieces served to peers, fetched from them (WEIGHTS_*, issue 16)

The daemon is the :class:`~p2pllm.daemon.roles.Cluster` its roles and coordinators use:
`request` / `stream` / `notify` to a peer go over that peer's link; to this node itself they
go through a :class:`~p2pllm.wire.local.LocalConnection` (the same request machinery,
handed over in-process: no socket, no loopback TCP).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

from p2pllm.config import DaemonConfig, parse_hostport
from p2pllm.daemon import state as ev
from p2pllm.daemon.authz import kind_refusal
from p2pllm.daemon.capabilities import measure, memory_bytes
from p2pllm.daemon.dialing import Dialer
from p2pllm.daemon.handshake import Handshake
from p2pllm.daemon.hosting import RoleHost
from p2pllm.daemon.jobctl import JobControl
from p2pllm.daemon.jobs import JobHost, coordinator_registry
from p2pllm.daemon.peers import PeerTable
from p2pllm.daemon.serving import load_serve_config
from p2pllm.daemon.status import StatusHandlers
from p2pllm.daemon.weights import WeightsService
from p2pllm.wire.connection import Connection, ConnectionClosed, Reply, Request, serve
from p2pllm.wire.frame import Buffer, Frame, Limits, ProtocolError
from p2pllm.wire.local import LocalConnection
from p2pllm.wire.messages import ErrorCode, MsgType

log = logging.getLogger(__name__)

TICK = 0.5

CoreHandler = Callable[[Connection, Request], Coroutine[Any, Any, Reply | None]]


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.node_id = uuid.uuid4().hex
        self.name = config.name or socket.gethostname()
        self.secret = config.secret()
        self.limits = Limits(config.max_meta, config.max_payload)
        self.port = config.port
        self.caps: dict[str, Any] = {}
        self.state = ev.State(node=ev.NodeInfo(self.node_id, self.name, "", {}))
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.metrics_listener: Any = None  # httpd.MetricsListener with --metrics
        self.api: Any = None  # api.ApiServer with --api
        # --api-serve: the served jobs (read now: a bad file is a ConfigError before starting)
        self.api_jobs = load_serve_config(config.api_serve) \
            if config.api_serve and config.api_address() is not None else {}
        self._local: LocalConnection | None = None
        self._running_jobs: dict[str, Any] = {}
        self.hosting = RoleHost(self, self._spawn)
        self.peers = PeerTable(self.node_id, config, self.emit, self.hosting.release_orphans)
        self.dialer = Dialer(self, self._dispatch, self._spawn)
        self.handshake = Handshake(self)
        self.coordinators = coordinator_registry()
        self.jobs = JobHost(self, config, self.emit, self._running_jobs)
        status, jobctl = StatusHandlers(self), JobControl(self)
        self.weights = WeightsService(self)
        self._core: dict[MsgType, CoreHandler] = {
            MsgType.STATUS: status.on_status,
            MsgType.SUBSCRIBE: status.on_subscribe,
            MsgType.LINK_PROBE: status.on_link_probe,
            MsgType.ASSIGN: self.hosting.on_assign,
            MsgType.RELEASE: self.hosting.on_release,
            MsgType.JOB_MEMBERS: self.hosting.on_members,
            MsgType.JOBS: jobctl.on_jobs,
            MsgType.JOB_STOP: jobctl.on_job_stop,
            MsgType.CAPS_UPDATE: self.peers.on_caps_update,
            MsgType.GOODBYE: self.peers.on_goodbye,
            **self.weights.handlers(),
        }

    @property
    def registry(self) -> dict[str, Any]:
        return self.hosting.registry

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def address(self) -> str:
        host = self.config.host
        if host in ("0.0.0.0", "::", ""):
            host = self.config.interface or _local_ip()
        return f"{host}:{self.port}"

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> None:
        """Serve until stop() or a signal; then shut down cleanly."""
        if self.config.threads:
            import torch

            torch.set_num_threads(self.config.threads)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        self.caps = await asyncio.to_thread(measure, self.config)
        self._server = await serve(
            self.config.host, self.config.port, self._dispatch, self.handshake.on_accept, limits=self.limits
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self.state = ev.State(node=ev.NodeInfo(self.node_id, self.name, self.address, self.caps))
        log.info("p2pllmd %s (%s) listening on %s", self.name, self.node_id[:8], self.address)
        try:
            self.local_connection()
            for peer in self.config.peers:
                host, port = parse_hostport(peer)
                self.dialer.add(host, port, "static")
            if self.config.mdns:
                await self.dialer.start_discovery()
            self._spawn(self._tick_loop())
            self._spawn(self.peers.probe_loop())
            if (where := self.config.metrics_address()) is not None:
                from p2pllm.daemon.httpd import MetricsListener  # aiohttp only when asked

                self.metrics_listener = MetricsListener(self.metrics_snapshot)
                await self.metrics_listener.start(*where)
            if (where := self.config.api_address()) is not None:
                from p2pllm.daemon.api import ApiServer, served_models  # aiohttp only when asked

                dirs = [d for d in (self.config.models_dir, *self.config.models_dirs) if d]
                self.api = ApiServer(lambda: served_models(dirs), self.metrics_snapshot,
                                     api_key=self.config.api_key(),
                                     max_pending=self.config.api_max_pending,
                                     quant=self.config.api_quant, jobs=self.api_jobs,
                                     start_job=self._api_job)
                await self.api.start(*where)
            self._ready.set()
            await self._stop.wait()
        finally:
            await self._shutdown()

    def stop(self) -> None:
        self._stop.set()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def _shutdown(self) -> None:
        log.info("shutting down %s", self.name)
        if self.api is not None:  # first: in-flight API requests finish (drain), new ones 503
            with contextlib.suppress(Exception):
                await self.api.stop()
        for job_id in list(self._running_jobs):
            self.jobs.stop(job_id)
        await self.hosting.release_all("daemon shutting down")
        await self.peers.goodbye()
        with contextlib.suppress(Exception):
            await self.dialer.stop_discovery()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t
        self.peers.close_all("daemon shutting down")
        if self._local is not None:
            self._local.close("daemon shutting down")
        if self.metrics_listener is not None:
            with contextlib.suppress(Exception):
                await self.metrics_listener.stop()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background task failed", exc_info=task.exception())

    # -- state ----------------------------------------------------------------------------

    def emit(self, event: ev.Event) -> None:
        self.state = ev.apply(self.state, event)

    def snapshot(self) -> dict[str, Any]:
        return ev.snapshot(self.state, time.time())

    def metrics_snapshot(self) -> dict[str, Any]:
        """The snapshot GET /metrics renders (daemon/metrics.py): STATUS's, with the node's
        memory figures read now."""
        snap = self.snapshot()
        _, free = memory_bytes()
        snap["node"] = {**snap["node"], "mem_free": free, "mem_used_by_roles": self.hosting.memory_used()}
        if self.api is not None:
            snap["api"] = self.api.metrics()
        return snap

    def caps_now(self) -> dict[str, Any]:
        _, free = memory_bytes()
        return {**self.caps, "mem_free": free, "mem_used_by_roles": self.hosting.memory_used(),
                "roles_held": self.hosting.held(), "fetches": self.weights.running()}

    async def broadcast_caps(self) -> None:
        await self.peers.broadcast_caps(self.caps_now())

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self.hosting.publish_metrics()
            self.peers.tick(time.monotonic())

    # -- cluster interface for roles and coordinators --------------------------------------

    def nodes(self) -> list[dict[str, Any]]:
        out = [
            {
                "node_id": self.node_id,
                "name": self.name,
                "address": self.address,
                "caps": self.caps_now(),
                "self": True,
            }
        ]
        for link in self.peers.live():
            # the link's measured throughput (peers.py's probe; None until the first one):
            # planners charge a fetch of model pieces with it (daemon/cluster.fetch_estimate)
            mbps = (self.state.peers.get(link.node_id) or {}).get("throughput_mbps")
            out.append(
                {"node_id": link.node_id, "name": link.name, "address": link.address, "caps": link.caps, "self": False,
                 "throughput_mbps": mbps}
            )
        return out

    def _api_job(self, meta: dict[str, Any]) -> AsyncGenerator[Frame, None]:
        """A served name's job (daemon/api.py JobModel): GENERATE on the in-process
        connection, as this host's operator (the API key is the API's gate)."""
        return self.local_connection().stream(MsgType.GENERATE, meta)

    def local_connection(self) -> LocalConnection:
        """This node's in-process connection to itself (a new one if the last was closed)."""
        conn = self._local
        if conn is None or (conn.closed and not self.stopping):
            conn = self._local = LocalConnection(self._dispatch, self.limits, name=f"{self.name}(self)")
            conn.info.update(authed=True, kind="self", node_id=self.node_id, name=self.name)
        return conn

    def connection(self, node_id: str) -> Connection:
        """The connection that reaches `node_id`: in-process for this node, else the peer's link."""
        conn = self.local_connection() if node_id == self.node_id else self.peers.conn(node_id)
        if conn is None or conn.closed:
            raise ConnectionClosed(f"peer {node_id[:8]} is not connected")
        return conn

    async def request(
        self,
        node_id: str,
        msg_type: MsgType,
        meta: dict[str, Any],
        payload: Sequence[Buffer] = (),
        *,
        timeout: float | None = None,
    ) -> Frame:
        return await self.connection(node_id).request(msg_type, meta, payload, timeout=timeout)

    async def stream(
        self,
        node_id: str,
        msg_type: MsgType,
        meta: dict[str, Any],
        payload: Sequence[Buffer] = (),
        *,
        idle_timeout: float | None = None,
    ) -> AsyncIterator[Frame]:
        async for frame in self.connection(node_id).stream(
            msg_type, meta, payload, idle_timeout=idle_timeout
        ):
            yield frame

    async def notify(
        self, node_id: str, msg_type: MsgType, meta: dict[str, Any], payload: Sequence[Buffer] = ()
    ) -> int:
        """A one-way message; returns the bytes it took on the wire (0 to this node itself)."""
        return await self.connection(node_id).notify(msg_type, meta, payload)

    def notify_nowait(
        self, node_id: str, msg_type: MsgType, meta: dict[str, Any], payload: Sequence[Buffer] = ()
    ) -> int:
        """`notify` from plain code: written when this returns, never waits (roles.Cluster)."""
        return self.connection(node_id).notify_nowait(msg_type, meta, payload)

    async def wait_writable(self, node_id: str) -> None:
        await self.connection(node_id).wait_writable()

    # -- dispatch -------------------------------------------------------------------------

    async def _dispatch(self, conn: Connection, req: Request) -> Reply | None:
        t = req.frame.msg_type
        if t in (MsgType.HELLO, MsgType.AUTH) and conn.info.get("authed"):
            # a connection's kind and node id are fixed once it is authenticated (protocol.md 4.4)
            raise ProtocolError(ErrorCode.FORBIDDEN, f"{t.name} after the handshake: this connection "
                                f"is already authenticated as {conn.info.get('kind')} "
                                f"{str(conn.info.get('node_id'))[:16]}")
        if t == MsgType.HELLO:
            return await self.handshake.on_hello(conn, req)
        if t == MsgType.AUTH:
            return await self.handshake.on_auth(conn, req)
        if not conn.info.get("authed"):
            raise ProtocolError(ErrorCode.UNAUTHENTICATED, "send HELLO (and AUTH) first")
        local = isinstance(conn, LocalConnection)
        kind = str(conn.info.get("kind"))
        why = kind_refusal(kind, t, local=local)
        if why is None and not local and conn.info.get("node_id") == self.node_id:
            why = "a connection from outside this process cannot use this node's own id"
        if why is not None:  # protocol.md 4.4
            raise ProtocolError(ErrorCode.FORBIDDEN, f"{t.name} refused on {self.name}: {why}")
        core = self._core.get(t)
        if core is not None:
            return await core(conn, req)
        if "job" in req.meta and t not in self.coordinators:
            return await self.hosting.route(conn, req)
        coordinator = self.coordinators.get(t)
        if coordinator is not None:
            return await coordinator(self.jobs, req)
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"{t.name} is not handled by this daemon")


def _local_ip() -> str:
    """The address this host would use to reach the LAN (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"
