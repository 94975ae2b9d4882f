"""Reaching peers: dial targets (--peer, mDNS, peers that dialed us) and their dial loops.

Each target has one loop: while its peer has no live link, dial (with backoff), handshake,
and hand the connection to the peer table; once linked, wait for the link to close and dial
again. mDNS discovery feeds targets in and takes them out; a target that turns out to be this
node is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from p2pllm.daemon import state as ev
from p2pllm.net.auth import HandshakeError, client_handshake
from p2pllm.wire.connection import ConnectionClosed, Handler, connect
from p2pllm.wire.frame import PROTOCOL_VERSION

if TYPE_CHECKING:
    from p2pllm.daemon.daemon import Daemon

log = logging.getLogger(__name__)

DIAL_BACKOFF = (0.2, 5.0)


@dataclass
class DialTarget:
    host: str
    port: int
    source: str  # "static" | "mdns" | "inbound"
    node_id: str | None = None
    task: asyncio.Task[None] | None = None


class Dialer:
    def __init__(self, daemon: Daemon, dispatch: Handler,
                 spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]]) -> None:
        self.d = daemon
        self._dispatch = dispatch
        self._spawn = spawn
        self.targets: dict[tuple[str, int], DialTarget] = {}
        self._discovery: Any = None

    def add(self, host: str, port: int, source: str, node_id: str | None = None) -> None:
        key = (host, port)
        target = self.targets.get(key)
        if target is None:
            target = DialTarget(host, port, source, node_id)
            self.targets[key] = target
        if target.task is None or target.task.done():
            target.task = self._spawn(self._dial_loop(target))

    def remember_inbound(self, host: str, port: Any, node_id: str) -> None:
        """Dial back later if the link a peer opened to us dies and it was not otherwise known."""
        if isinstance(port, int) and 0 < port < 65536 and host != "?":
            key = (host, port)
            if key not in self.targets and not any(t.node_id == node_id for t in self.targets.values()):
                self.targets[key] = DialTarget(host, port, "inbound", node_id)

    async def _dial_loop(self, target: DialTarget) -> None:
        delay = DIAL_BACKOFF[0]
        while not self.d.stopping and self.targets.get((target.host, target.port)) is target:
            conn = self.d.peers.conn(target.node_id or "")
            if conn is not None and not conn.closed:
                await conn.wait_closed()
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
                self.targets.pop((target.host, target.port), None)
                return
            target.node_id = node_id
            delay = DIAL_BACKOFF[0]
            await asyncio.sleep(0.05)

    async def _dial(self, target: DialTarget) -> str | None:
        d = self.d
        conn = await connect(target.host, target.port, self._dispatch, limits=d.limits)
        try:
            hello = await client_handshake(
                conn,
                node_id=d.node_id,
                name=d.name,
                kind="peer",
                port=d.port,
                secret=d.secret,
                caps=d.caps_now(),
            )
        except BaseException:
            conn.close("handshake failed")
            raise
        if hello["node_id"] == d.node_id:
            conn.close("dialed ourselves")
            return None
        conn.info.update(authed=True, kind="peer", node_id=hello["node_id"])
        address = f"{target.host}:{hello.get('port', target.port)}"
        d.peers.admit(conn, hello, address, initiator=d.node_id)
        return str(hello["node_id"])

    # -- mDNS ---------------------------------------------------------------------------------

    async def start_discovery(self) -> None:
        from p2pllm.net.discovery import Discovery, PeerAddr

        d = self.d

        def found(peer: PeerAddr) -> None:
            if peer.node_id == d.node_id:
                return
            if peer.version != PROTOCOL_VERSION:
                log.warning(
                    "ignoring %s at %s:%s: protocol version %s, ours is %s",
                    peer.name, peer.host, peer.port, peer.version, PROTOCOL_VERSION,
                )
                return
            if peer.node_id not in d.state.peers:
                d.emit(ev.PeerSeen(peer.node_id, peer.name, f"{peer.host}:{peer.port}", time.time()))
            self.add(peer.host, peer.port, "mdns", peer.node_id)

        def lost(node_id: str) -> None:
            # Seen on mDNS but never connected: nothing else will remove it.
            seen = d.state.peers.get(node_id)
            if node_id not in d.peers.links and seen is not None and seen["state"] == "connecting":
                d.emit(ev.PeerRemoved(node_id))
            for key, target in list(self.targets.items()):
                if target.node_id == node_id and target.source == "mdns":
                    self.targets.pop(key, None)
                    if target.task is not None:
                        target.task.cancel()

        self._discovery = Discovery(
            name=d.name,
            node_id=d.node_id,
            port=d.port,
            version=PROTOCOL_VERSION,
            interface=d.config.mdns_interface(),  # a loopback-only daemon: loopback only
            announce_host=d.config.mdns_announce_host(),
            on_found=found,
            on_lost=lost,
        )
        await self._discovery.start()

    async def stop_discovery(self) -> None:
        if self._discovery is not None:
            await self._discovery.stop()
