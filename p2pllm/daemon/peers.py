"""The peer table: one live link per peer, what we know of it, and the link-level chatter.

Between two nodes only one connection survives: the one opened by the node with the smaller
node id (if both opened one at once), or the newest. A link that closes leaves its peer
"down" for `peer_remove_after` seconds, then the peer is forgotten. Here too: keepalive and
RTT, bytes in/out per link, throughput probes now and then, CAPS_UPDATE and GOODBYE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from p2pllm.config import DaemonConfig
from p2pllm.daemon import state as ev
from p2pllm.daemon.cluster import PlanError, find_node
from p2pllm.wire.connection import Connection, ConnectionClosed, RemoteError, Request
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode, MsgType

log = logging.getLogger(__name__)

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


class PeerTable:
    def __init__(
        self,
        node_id: str,
        config: DaemonConfig,
        emit: Callable[[ev.Event], None],
        on_down: Callable[[str, str], None],
    ) -> None:
        self.node_id = node_id
        self.config = config
        self.emit = emit
        self._on_down = on_down  # (node_id, name) of a peer whose link just closed
        self.links: dict[str, PeerLink] = {}

    # -- queries ----------------------------------------------------------------------------

    def live(self) -> list[PeerLink]:
        return [p for p in self.links.values() if p.conn is not None and not p.conn.closed]

    def conn(self, node_id: str) -> Connection | None:
        link = self.links.get(node_id)
        return link.conn if link is not None else None

    def find(self, text: str) -> PeerLink:
        """A connected peer by node id or address, exact name, or unique node-id prefix (the
        cluster query :func:`~p2pllm.daemon.cluster.find_node` over the live links)."""
        live = self.live()
        nodes = [{"node_id": p.node_id, "name": p.name, "address": p.address} for p in live]
        try:
            hit = find_node(nodes, text)
        except PlanError as exc:
            raise ProtocolError(exc.code or ErrorCode.NOT_FOUND, f"connected peers: {exc}") from None
        return next(p for p in live if p.node_id == hit["node_id"])

    # -- links ------------------------------------------------------------------------------

    def admit(self, conn: Connection, hello: Mapping[str, Any], address: str, initiator: str) -> None:
        """Make `conn` the link to its peer, unless a better connection already exists."""
        node_id = str(hello["node_id"])
        conn.name = f"{hello.get('name', '?')}({node_id[:8]})"
        conn.info["initiator"] = initiator
        link = self.links.get(node_id)
        if link is not None and link.conn is not None and not link.conn.closed:
            # Two connections between the same pair: keep the one the smaller id opened.
            preferred = min(self.node_id, node_id)
            old_ok = link.initiator == preferred
            new_ok = initiator == preferred
            if old_ok and not new_ok:
                conn.close("duplicate connection")
                return
            link.conn.close("replaced by a newer connection")
        if link is None:
            link = PeerLink(node_id, str(hello.get("name", "")), address)
            self.links[node_id] = link
        link.name = str(hello.get("name", link.name))
        link.address = address
        link.conn = conn
        link.initiator = initiator
        link.caps = dict(hello.get("caps") or {})
        link.down_since = None
        conn.on_close(lambda c: self._closed(node_id, c))

        def on_rtt(rtt: float) -> None:
            self.emit(ev.LinkMeasured(node_id, rtt_ms=round(rtt * 1000, 3)))

        conn.start_keepalive(self.config.keepalive_interval, self.config.keepalive_timeout, on_rtt)
        self.emit(ev.PeerUp(node_id, link.name, address, link.caps, time.time()))
        log.info("peer %s (%s) up at %s", link.name, node_id[:8], address)

    def _closed(self, node_id: str, conn: Connection) -> None:
        link = self.links.get(node_id)
        if link is None or link.conn is not conn:
            return
        link.conn = None
        link.down_since = time.monotonic()
        self.emit(ev.PeerDown(node_id, conn.close_reason, time.time()))
        log.info("peer %s (%s) down: %s", link.name, node_id[:8], conn.close_reason)
        self._on_down(node_id, link.name)

    def tick(self, now: float) -> None:
        """Publish each link's byte counts; forget peers down for too long."""
        for node_id, link in list(self.links.items()):
            if link.conn is not None:
                self.emit(ev.LinkMeasured(node_id, bytes_in=link.conn.bytes_in, bytes_out=link.conn.bytes_out))
            elif link.down_since is not None and now - link.down_since > self.config.peer_remove_after:
                del self.links[node_id]
                self.emit(ev.PeerRemoved(node_id))
                log.info("peer %s (%s) removed", link.name, node_id[:8])

    async def probe_loop(self) -> None:
        """Measure throughput to each peer now and then: a small payload echoed back."""
        payload = bytes(LINK_PROBE_BYTES)
        while True:
            await asyncio.sleep(LINK_PROBE_EVERY)
            for node_id, link in list(self.links.items()):
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

    async def broadcast_caps(self, caps: dict[str, Any]) -> None:
        self.emit(ev.NodeUpdated(caps))
        for link in self.live():
            assert link.conn is not None
            with contextlib.suppress(ConnectionClosed):
                await link.conn.notify(MsgType.CAPS_UPDATE, {"caps": caps})

    async def goodbye(self) -> None:
        for link in self.live():
            assert link.conn is not None
            with contextlib.suppress(Exception):
                await link.conn.notify(MsgType.GOODBYE, {"node_id": self.node_id})

    def close_all(self, reason: str) -> None:
        for link in self.links.values():
            if link.conn is not None:
                link.conn.close(reason)

    # -- handlers (one-way) -----------------------------------------------------------------

    async def on_caps_update(self, conn: Connection, req: Request) -> None:
        node_id = conn.info.get("node_id")
        link = self.links.get(node_id or "")
        caps = req.meta.get("caps")
        if link is not None and isinstance(caps, dict) and link.conn is conn:
            link.caps = caps
            self.emit(ev.PeerUp(link.node_id, link.name, link.address, caps, time.time()))

    async def on_goodbye(self, conn: Connection, req: Request) -> None:
        conn.close("peer said goodbye")
