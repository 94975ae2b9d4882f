"""p2pllmd: the daemon every host runs. It wires transport, discovery, peers, roles and jobs.

Connections: the daemon listens on one port; it dials every peer it learns of (mDNS or
--peer) and accepts theirs. Between two nodes only one connection survives: the one opened by
the node with the smaller node id (if both opened one at once), or the newest. The daemon also
dials itself, so work placed on the local node goes through the same code path as work placed
on a peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from p2pllm.config import ROLE_KINDS, DaemonConfig
from p2pllm.daemon import state as ev
from p2pllm.daemon.capabilities import measure, memory_bytes
from p2pllm.daemon.jobs import JobHost, coordinator_registry
from p2pllm.daemon.roles import Refused, Role, RoleContext, RoleHandler, role_registry
from p2pllm.net.auth import HANDSHAKE_TIMEOUT, HandshakeError, client_handshake, proof
from p2pllm.wire.connection import (
    Connection,
    ConnectionClosed,
    RemoteError,
    Reply,
    Request,
    connect,
    serve,
)
from p2pllm.wire.frame import PROTOCOL_VERSION, Buffer, Frame, Limits, ProtocolError
from p2pllm.wire.messages import ErrorCode, MsgType

log = logging.getLogger(__name__)

DIAL_BACKOFF = (0.2, 5.0)
TICK = 0.5
LINK_PROBE_EVERY = 15.0  # seconds between throughput probes of each link
LINK_PROBE_BYTES = 128 * 1024  # ~17 KB/s per link on average


@dataclass
class PeerLink:
    node_id: str
    name: str
    address: str  # host:port the peer listens on
    conn: Connection | None = None
    initiator: str = ""  # node id that opened `conn`
    caps: dict[str, Any] = field(default_factory=dict)
    down_since: float | None = None


@dataclass
class DialTarget:
    host: str
    port: int
    source: str  # "static" | "mdns"
    node_id: str | None = None
    task: asyncio.Task[None] | None = None


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
        self._peers: dict[str, PeerLink] = {}
        self._targets: dict[tuple[str, int], DialTarget] = {}
        self._roles: dict[str, dict[str, Role]] = {}
        self._role_handlers: dict[tuple[str, str], Mapping[MsgType, RoleHandler]] = {}
        self._role_coordinator: dict[tuple[str, str], str] = {}
        self._running_jobs: dict[str, Any] = {}
        self._self_conn: Connection | None = None
        self._server: asyncio.Server | None = None
        self._discovery: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()
        self.registry = role_registry()
        self.coordinators = coordinator_registry()
        self.jobs = JobHost(self, config, self.emit, self._running_jobs)
        self._core = {
            MsgType.STATUS: self._on_status,
            MsgType.SUBSCRIBE: self._on_subscribe,
            MsgType.ASSIGN: self._on_assign,
            MsgType.RELEASE: self._on_release,
            MsgType.JOBS: self._on_jobs,
            MsgType.JOB_STOP: self._on_job_stop,
            MsgType.LINK_PROBE: self._on_link_probe,
            MsgType.CAPS_UPDATE: self._on_caps_update,
            MsgType.GOODBYE: self._on_goodbye,
        }

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def address(self) -> str:
        host = self.config.host
        if host in ("0.0.0.0", "::", ""):
            host = self.config.interface or _local_ip()
        return f"{host}:{self.port}"

    async def run(self) -> None:
        """Serve until stop() or a signal; then shut down cleanly."""
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        self.caps = await asyncio.to_thread(measure, self.config)
        self._server = await serve(
            self.config.host, self.config.port, self._dispatch, self._on_accept, limits=self.limits
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self.state = ev.State(node=ev.NodeInfo(self.node_id, self.name, self.address, self.caps))
        log.info("p2pllmd %s (%s) listening on %s", self.name, self.node_id[:8], self.address)
        try:
            await self._connect_self()
            for peer in self.config.peers:
                from p2pllm.config import parse_hostport

                host, port = parse_hostport(peer)
                self._add_target(host, port, "static")
            if self.config.mdns:
                await self._start_discovery()
            self._spawn(self._tick_loop())
            self._spawn(self._link_probe_loop())
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
        for job_id in list(self._running_jobs):
            self.jobs.stop(job_id)
        for job in list(self._roles):
            await self._release(job, None, "daemon shutting down")
        for link in self._peers.values():
            if link.conn is not None and not link.conn.closed:
                with contextlib.suppress(Exception):
                    await link.conn.notify(MsgType.GOODBYE, {"node_id": self.node_id})
        if self._discovery is not None:
            with contextlib.suppress(Exception):
                await self._discovery.stop()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t
        for link in self._peers.values():
            if link.conn is not None:
                link.conn.close("daemon shutting down")
        if self._self_conn is not None:
            self._self_conn.close("daemon shutting down")
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
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

    def caps_now(self) -> dict[str, Any]:
        _, free = memory_bytes()
        used = sum(r.memory_bytes() for roles in self._roles.values() for r in roles.values())
        held = [
            {"job": job, "rid": rid, "role": r.kind, "summary": r.summary()}
            for job, roles in self._roles.items()
            for rid, r in roles.items()
        ]
        return {**self.caps, "mem_free": free, "mem_used_by_roles": used, "roles_held": held}

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
        for link in self._peers.values():
            if link.conn is not None and not link.conn.closed:
                out.append(
                    {
                        "node_id": link.node_id,
                        "name": link.name,
                        "address": link.address,
                        "caps": link.caps,
                        "self": False,
                    }
                )
        return out

    def connection(self, node_id: str) -> Connection:
        if node_id == self.node_id:
            conn = self._self_conn
        else:
            link = self._peers.get(node_id)
            conn = link.conn if link is not None else None
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
    ) -> None:
        await self.connection(node_id).notify(msg_type, meta, payload)

    # -- connections ----------------------------------------------------------------------

    def _on_accept(self, conn: Connection) -> None:
        conn.info["authed"] = False
        loop = asyncio.get_running_loop()

        def expire() -> None:
            if not conn.info.get("authed") and not conn.closed:
                log.info("closing %s: no handshake within %ss", conn.peername, HANDSHAKE_TIMEOUT)
                conn.close("handshake timeout")

        loop.call_later(HANDSHAKE_TIMEOUT, expire)

        def refused(c: Connection) -> None:
            hello = c.info.get("hello")
            if not c.info.get("authed") and hello is not None and self.secret is not None:
                log.warning(
                    "refused %s %s from %s: it did not prove the shared secret",
                    hello.get("kind"), hello.get("name"), c.peername,
                )

        conn.on_close(refused)

    async def _connect_self(self) -> None:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "") else self.config.host
        if self.config.host == "::":
            host = "::1"
        conn = await connect(host, self.port, self._dispatch, limits=self.limits, name="self")
        await client_handshake(
            conn, node_id=self.node_id, name=self.name, kind="self", port=self.port, secret=self.secret
        )
        conn.info.update(authed=True, kind="self", node_id=self.node_id)
        self._self_conn = conn

    def _add_target(self, host: str, port: int, source: str, node_id: str | None = None) -> None:
        key = (host, port)
        target = self._targets.get(key)
        if target is None:
            target = DialTarget(host, port, source, node_id)
            self._targets[key] = target
        if target.task is None or target.task.done():
            target.task = self._spawn(self._dial_loop(target))

    async def _dial_loop(self, target: DialTarget) -> None:
        delay = DIAL_BACKOFF[0]
        while not self._stop.is_set() and self._targets.get((target.host, target.port)) is target:
            link = self._peers.get(target.node_id or "")
            if link is not None and link.conn is not None and not link.conn.closed:
                await link.conn.wait_closed()
                continue
            try:
                node_id = await self._dial(target)
            except (OSError, TimeoutError, ConnectionClosed, HandshakeError) as exc:
                level = logging.WARNING if isinstance(exc, HandshakeError) else logging.DEBUG
                log.log(level, "cannot connect to %s:%s: %s", target.host, target.port, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, DIAL_BACKOFF[1])
                continue
            if node_id is None:  # ourselves
                self._targets.pop((target.host, target.port), None)
                return
            target.node_id = node_id
            delay = DIAL_BACKOFF[0]
            await asyncio.sleep(0.05)

    async def _dial(self, target: DialTarget) -> str | None:
        conn = await connect(target.host, target.port, self._dispatch, limits=self.limits)
        try:
            hello = await client_handshake(
                conn,
                node_id=self.node_id,
                name=self.name,
                kind="peer",
                port=self.port,
                secret=self.secret,
                caps=self.caps_now(),
            )
        except BaseException:
            conn.close("handshake failed")
            raise
        if hello["node_id"] == self.node_id:
            conn.close("dialed ourselves")
            return None
        conn.info.update(authed=True, kind="peer", node_id=hello["node_id"])
        address = f"{target.host}:{hello.get('port', target.port)}"
        self._admit(conn, hello, address, initiator=self.node_id)
        return str(hello["node_id"])

    def _admit(self, conn: Connection, hello: Mapping[str, Any], address: str, initiator: str) -> None:
        """Make `conn` the link to its peer, unless a better connection already exists."""
        node_id = str(hello["node_id"])
        conn.name = f"{hello.get('name', '?')}({node_id[:8]})"
        conn.info["initiator"] = initiator
        link = self._peers.get(node_id)
        if link is not None and link.conn is not None and not link.conn.closed:
            preferred = min(self.node_id, node_id)
            old_ok = link.initiator == preferred
            new_ok = initiator == preferred
            if old_ok and not new_ok:
                conn.close("duplicate connection")
                return
            link.conn.close("replaced by a newer connection")
        if link is None:
            link = PeerLink(node_id, str(hello.get("name", "")), address)
            self._peers[node_id] = link
        link.name = str(hello.get("name", link.name))
        link.address = address
        link.conn = conn
        link.initiator = initiator
        link.caps = dict(hello.get("caps") or {})
        link.down_since = None
        conn.on_close(lambda c: self._on_link_closed(node_id, c))

        def on_rtt(rtt: float) -> None:
            self.emit(ev.LinkMeasured(node_id, rtt_ms=round(rtt * 1000, 3)))

        conn.start_keepalive(self.config.keepalive_interval, self.config.keepalive_timeout, on_rtt)
        self.emit(ev.PeerUp(node_id, link.name, address, link.caps, time.time()))
        log.info("peer %s (%s) up at %s", link.name, node_id[:8], address)

    def _on_link_closed(self, node_id: str, conn: Connection) -> None:
        link = self._peers.get(node_id)
        if link is None or link.conn is not conn:
            return
        link.conn = None
        link.down_since = time.monotonic()
        self.emit(ev.PeerDown(node_id, conn.close_reason, time.time()))
        log.info("peer %s (%s) down: %s", link.name, node_id[:8], conn.close_reason)
        # Roles whose coordinator died are orphans: release them.
        for (job, rid), coord in list(self._role_coordinator.items()):
            if coord == node_id:
                self._spawn(self._release(job, rid, f"coordinator {link.name} is down"))

    async def _start_discovery(self) -> None:
        from p2pllm.net.discovery import Discovery, PeerAddr

        def found(peer: PeerAddr) -> None:
            if peer.node_id == self.node_id:
                return
            if peer.version != PROTOCOL_VERSION:
                log.warning(
                    "ignoring %s at %s:%s: protocol version %s, ours is %s",
                    peer.name, peer.host, peer.port, peer.version, PROTOCOL_VERSION,
                )
                return
            if peer.node_id not in self.state.peers:
                self.emit(ev.PeerSeen(peer.node_id, peer.name, f"{peer.host}:{peer.port}", time.time()))
            self._add_target(peer.host, peer.port, "mdns", peer.node_id)

        def lost(node_id: str) -> None:
            # Seen on mDNS but never connected: nothing else will remove it.
            seen = self.state.peers.get(node_id)
            if node_id not in self._peers and seen is not None and seen["state"] == "connecting":
                self.emit(ev.PeerRemoved(node_id))
            for key, target in list(self._targets.items()):
                if target.node_id == node_id and target.source == "mdns":
                    self._targets.pop(key, None)
                    if target.task is not None:
                        target.task.cancel()

        self._discovery = Discovery(
            name=self.name,
            node_id=self.node_id,
            port=self.port,
            version=PROTOCOL_VERSION,
            interface=self.config.interface,
            announce_host=None if self.config.host in ("0.0.0.0", "::", "") else self.config.host,
            on_found=found,
            on_lost=lost,
        )
        await self._discovery.start()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            for (job, rid), _ in list(self._role_handlers.items()):
                role = self._roles.get(job, {}).get(rid)
                if role is not None:
                    try:
                        self.emit(ev.RoleMetrics(job, rid, role.metrics()))
                    except Exception:
                        log.debug("metrics of %s/%s failed", job, rid, exc_info=True)
            for node_id, link in list(self._peers.items()):
                if link.conn is not None:
                    self.emit(
                        ev.LinkMeasured(node_id, bytes_in=link.conn.bytes_in, bytes_out=link.conn.bytes_out)
                    )
                elif link.down_since is not None and now - link.down_since > self.config.peer_remove_after:
                    del self._peers[node_id]
                    self.emit(ev.PeerRemoved(node_id))
                    log.info("peer %s (%s) removed", link.name, node_id[:8])

    async def _link_probe_loop(self) -> None:
        """Measure throughput to each peer now and then: a small payload echoed back."""
        payload = bytes(LINK_PROBE_BYTES)
        while True:
            await asyncio.sleep(LINK_PROBE_EVERY)
            for node_id, link in list(self._peers.items()):
                conn = link.conn
                if conn is None or conn.closed:
                    continue
                try:
                    t0 = time.perf_counter()
                    await conn.request(MsgType.LINK_PROBE, {}, [payload], timeout=10)
                    dt = time.perf_counter() - t0
                except (ConnectionClosed, RemoteError, TimeoutError):
                    continue
                # Bytes moved both ways over the round trip, in MB/s.
                self.emit(ev.LinkMeasured(node_id, throughput_mbps=round(2 * len(payload) / dt / 1e6, 1)))

    async def _broadcast_caps(self) -> None:
        caps = self.caps_now()
        self.emit(ev.NodeUpdated(caps))
        for link in list(self._peers.values()):
            if link.conn is not None and not link.conn.closed:
                with contextlib.suppress(ConnectionClosed):
                    await link.conn.notify(MsgType.CAPS_UPDATE, {"caps": caps})

    # -- dispatch -------------------------------------------------------------------------

    async def _dispatch(self, conn: Connection, req: Request) -> Reply | None:
        t = req.frame.msg_type
        if t == MsgType.HELLO:
            return await self._on_hello(conn, req)
        if t == MsgType.AUTH:
            return self._on_auth(conn, req)
        if not conn.info.get("authed"):
            raise ProtocolError(ErrorCode.UNAUTHENTICATED, "send HELLO (and AUTH) first")
        core = self._core.get(t)
        if core is not None:
            return await core(conn, req)
        if "job" in req.meta and t not in self.coordinators:
            return await self._route_to_role(req)
        coordinator = self.coordinators.get(t)
        if coordinator is not None:
            return await coordinator(self.jobs, req)
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"{t.name} is not handled by this daemon")

    async def _on_hello(self, conn: Connection, req: Request) -> Reply:
        m = req.meta
        if m.get("version") != PROTOCOL_VERSION:
            raise ProtocolError(
                ErrorCode.BAD_VERSION,
                f"peer speaks protocol version {m.get('version')}, this node speaks {PROTOCOL_VERSION}",
                fatal=True,
            )
        node_id, name, kind, nonce = m.get("node_id"), m.get("name"), m.get("kind"), m.get("nonce")
        if (
            not isinstance(node_id, str)
            or not isinstance(name, str)
            or kind not in ("peer", "ctl", "self")
            or not isinstance(nonce, bytes)
            or not 8 <= len(nonce) <= 64
        ):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "HELLO needs node_id, name, kind, nonce", fatal=True)
        conn.info.update(node_id=node_id, name=name, kind=kind, hello=m)
        reply: dict[str, Any] = {
            "version": PROTOCOL_VERSION,
            "node_id": self.node_id,
            "name": self.name,
            "port": self.port,
            "auth": self.secret is not None,
        }
        if self.secret is not None:
            nonce_s = os.urandom(16)
            conn.info["nonce_s"] = nonce_s
            reply["nonce"] = nonce_s
            reply["proof"] = proof(self.secret, b"server", nonce, nonce_s, node_id, self.node_id)
        else:
            reply["caps"] = self.caps_now()
            self._authed(conn, m)
        return Reply(MsgType.HELLO, reply)

    def _on_auth(self, conn: Connection, req: Request) -> Reply:
        hello = conn.info.get("hello")
        nonce_s = conn.info.get("nonce_s")
        if self.secret is None or hello is None or nonce_s is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "AUTH without a HELLO that asked for it", fatal=True)
        expected = proof(self.secret, b"client", nonce_s, hello["nonce"], self.node_id, hello["node_id"])
        given = req.meta.get("proof")
        if not isinstance(given, bytes) or not hmac.compare_digest(expected, given):
            log.warning(
                "refused %s %s from %s: wrong shared secret", hello.get("kind"), hello.get("name"), conn.peername
            )
            conn.info["hello"] = None  # logged once
            raise ProtocolError(ErrorCode.AUTH_FAILED, "wrong shared secret", fatal=True)
        caps = req.meta.get("caps")
        self._authed(conn, {**hello, "caps": caps if isinstance(caps, dict) else {}})
        return Reply(MsgType.ACK, {"caps": self.caps_now()})

    def _authed(self, conn: Connection, hello: Mapping[str, Any]) -> None:
        conn.info["authed"] = True
        if hello["kind"] != "peer" or hello["node_id"] == self.node_id:
            return
        host = conn.peername[0] if conn.peername else "?"
        port = hello.get("port")
        self._admit(conn, hello, f"{host}:{port}", initiator=str(hello["node_id"]))
        if isinstance(port, int) and 0 < port < 65536 and host != "?":
            # Dial back later if this link dies and the peer was not otherwise known.
            key = (host, port)
            if key not in self._targets and not any(
                t.node_id == hello["node_id"] for t in self._targets.values()
            ):
                self._targets[key] = DialTarget(host, port, "inbound", str(hello["node_id"]))

    # -- core handlers --------------------------------------------------------------------

    async def _on_status(self, conn: Connection, req: Request) -> Reply:
        self.emit(ev.NodeUpdated(self.caps_now()))
        return Reply(MsgType.STATUS, self.snapshot())

    async def _on_subscribe(self, conn: Connection, req: Request) -> Reply:
        interval = req.meta.get("interval", 0.25)
        if not isinstance(interval, int | float) or not 0.05 <= interval <= 60:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "interval must be within 0.05..60 seconds")
        count = req.meta.get("count")  # None = until cancelled
        sent = 0
        while count is None or sent < count:
            self.emit(ev.NodeUpdated(self.caps_now()))
            await req.partial(MsgType.STATUS, self.snapshot())
            sent += 1
            await asyncio.sleep(float(interval))
        return Reply(MsgType.STATUS, self.snapshot())

    async def _on_link_probe(self, conn: Connection, req: Request) -> Reply:
        """Without "target": echo the payload (a throughput probe). With one: ping that peer."""
        target = req.meta.get("target")
        if target is None:
            return Reply(MsgType.LINK_PROBE, {}, [req.frame.payload] if req.frame.payload.nbytes else [])
        count = req.meta.get("count", 4)
        if not isinstance(target, str) or not isinstance(count, int) or not 1 <= count <= 100:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "LINK_PROBE target must be a string, count 1..100")
        link = self.find_peer(target)
        rtts = []
        for _ in range(count):
            t0 = time.perf_counter()
            await self.request(link.node_id, MsgType.PING, {"t": time.time()}, timeout=10)
            rtts.append(round((time.perf_counter() - t0) * 1000, 3))
        return Reply(
            MsgType.LINK_PROBE,
            {"node_id": link.node_id, "name": link.name, "address": link.address, "rtt_ms": rtts},
        )

    def find_peer(self, text: str) -> PeerLink:
        """A connected peer by exact name, node id (or unique prefix) or address."""
        live = [p for p in self._peers.values() if p.conn is not None and not p.conn.closed]
        for pred in (
            lambda p: p.node_id == text or p.address == text,
            lambda p: p.name == text,
            lambda p: p.node_id.startswith(text),
        ):
            hits = [p for p in live if pred(p)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                names = ", ".join(f"{p.name}({p.node_id[:8]})" for p in hits)
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"{text!r} is ambiguous: {names}")
        known = ", ".join(f"{p.name}({p.node_id[:8]})" for p in live) or "none"
        raise ProtocolError(ErrorCode.NOT_FOUND, f"no connected peer {text!r}; connected peers: {known}")

    async def _on_caps_update(self, conn: Connection, req: Request) -> None:
        node_id = conn.info.get("node_id")
        link = self._peers.get(node_id or "")
        caps = req.meta.get("caps")
        if link is not None and isinstance(caps, dict) and link.conn is conn:
            link.caps = caps
            self.emit(ev.PeerUp(link.node_id, link.name, link.address, caps, time.time()))

    async def _on_goodbye(self, conn: Connection, req: Request) -> None:
        conn.close("peer said goodbye")

    async def _on_jobs(self, conn: Connection, req: Request) -> Reply:
        """Jobs this node coordinates, plus (unless "local") those its peers coordinate."""
        snap = self.snapshot()
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

        return list(await asyncio.gather(*(one(link) for link in list(self._peers.values()))))

    async def _on_job_stop(self, conn: Connection, req: Request) -> Reply:
        job = req.meta.get("job")
        if not isinstance(job, str):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "JOB_STOP needs a job id")
        if self.jobs.stop(job):
            return Reply(MsgType.ACK, {"stopped": job, "where": "coordinator"})
        if job in self._roles:
            coords = {c for (j, _), c in self._role_coordinator.items() if j == job}
            for coord in coords:
                if coord != self.node_id and req.meta.get("forwarded") is None:
                    with contextlib.suppress(ConnectionClosed, RemoteError, TimeoutError):
                        await self.request(coord, MsgType.JOB_STOP, {"job": job, "forwarded": True}, timeout=10)
            await self._release(job, None, "stopped by operator")
            return Reply(MsgType.ACK, {"stopped": job, "where": "member"})
        if req.meta.get("forwarded") is None:
            # Not ours: find the coordinator among the peers and ask it.
            for peer_jobs in await self._peer_jobs():
                for j in peer_jobs:
                    if j["job"] == job and j.get("state") == "running" and j.get("coordinator"):
                        frame = await self.request(
                            j["coordinator"], MsgType.JOB_STOP, {"job": job, "forwarded": True}, timeout=60
                        )
                        return Reply(MsgType.ACK, frame.meta)
        raise ProtocolError(ErrorCode.UNKNOWN_JOB, f"no running job {job} known to {self.name} or its peers")

    async def _on_assign(self, conn: Connection, req: Request) -> Reply:
        m = req.meta
        job, kind, params = m.get("job"), m.get("role"), m.get("params", {})
        rid = m.get("rid", kind)
        if not isinstance(job, str) or not isinstance(kind, str) or not isinstance(rid, str) or not isinstance(params, dict):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "ASSIGN needs job, role (str), rid (str), params (map)")
        if kind in ROLE_KINDS and not self.config.accepts(kind):
            raise Refused(f"role {kind} is pinned elsewhere: {self.name} accepts only {', '.join(self.config.roles)}")
        cls = self.registry.get(kind)
        if cls is None:
            raise Refused(f"unknown role {kind!r}; this daemon hosts {', '.join(sorted(self.registry))}")
        if rid in self._roles.get(job, {}):
            raise Refused(f"{self.name} already holds {rid} in job {job}")
        reason = cls.refuse(self.config, self.caps_now(), params)
        if reason:
            raise Refused(reason)
        coordinator = str(conn.info.get("node_id", self.node_id))
        ctx = RoleContext(
            job=job,
            rid=rid,
            coordinator=coordinator,
            node_id=self.node_id,
            config=self.config,
            cluster=self,
            report=lambda metrics: self.emit(ev.RoleMetrics(job, rid, metrics)),
        )
        role = cls(ctx, params)
        self._roles.setdefault(job, {})[rid] = role
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
            raise Refused(f"{kind} failed to start on {self.name}: {exc}") from exc
        self._role_handlers[(job, rid)] = dict(role.handlers())
        self._role_coordinator[(job, rid)] = coordinator
        self.emit(ev.RoleAssigned(job, rid, kind, coordinator, role.summary(), time.time()))
        log.info("assigned %s/%s (%s) by %s", job, rid, kind, coordinator[:8])
        self._spawn(self._broadcast_caps())
        return Reply(MsgType.ACK, {"job": job, "rid": rid})

    def _forget(self, job: str, rid: str) -> Role | None:
        roles = self._roles.get(job, {})
        role = roles.pop(rid, None)
        if not roles:
            self._roles.pop(job, None)
        self._role_handlers.pop((job, rid), None)
        self._role_coordinator.pop((job, rid), None)
        return role

    async def _on_release(self, conn: Connection, req: Request) -> Reply:
        job, rid = req.meta.get("job"), req.meta.get("rid")
        if not isinstance(job, str) or (rid is not None and not isinstance(rid, str)):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "RELEASE needs job (str) and optional rid (str)")
        released = await self._release(job, rid, "released by coordinator")
        return Reply(MsgType.ACK, {"released": released})

    async def _release(self, job: str, rid: str | None, reason: str) -> list[str]:
        rids = [rid] if rid is not None else list(self._roles.get(job, {}))
        done = []
        for r in rids:
            role = self._forget(job, r)
            if role is None:
                continue
            try:
                await role.stop()
            except Exception:
                log.warning("role %s/%s failed to stop cleanly", job, r, exc_info=True)
            self.emit(ev.RoleReleased(job, r))
            log.info("released %s/%s: %s", job, r, reason)
            done.append(r)
        if done:
            self._spawn(self._broadcast_caps())
        return done

    async def _route_to_role(self, req: Request) -> Reply | None:
        job = req.meta["job"]
        t = req.frame.msg_type
        roles = self._roles.get(job) if isinstance(job, str) else None
        if not roles:
            raise ProtocolError(ErrorCode.UNKNOWN_JOB, f"no job {job!r} on {self.name}")
        rid = req.meta.get("rid")
        if rid is not None:
            handler = self._role_handlers.get((job, rid), {}).get(t)
        else:
            found = [h for r in roles if (h := self._role_handlers.get((job, r), {}).get(t))]
            if len(found) > 1:
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"job {job} has several roles for {t.name}: name a rid")
            handler = found[0] if found else None
        if handler is None:
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"no role of job {job} on {self.name} handles {t.name}")
        return await handler(req)


def _local_ip() -> str:
    """The address this host would use to reach the LAN (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"
