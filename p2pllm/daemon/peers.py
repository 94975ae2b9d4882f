"""The peer table: one live link per peer, what we know of it, and the link-level chatter.

Between two nodes only one connection survives (protocol.md 6.2): of two opened by different
nodes, the one the node with the smaller node id opened; of two opened by the same node, the
newer. Both ends apply the rule to what the handshakes told them, so they pick the same link
without another message. The link that loses is not closed under its requests: it drains (no
new requests go out on it, the peer's are still served), then the node with the smaller id
closes it once nothing has been in flight on it either way for `drain_quiet` seconds; either
end closes it after `drain_timeout` whatever is in flight. If the link kept closes while a
drained one is still open, the drained one is the link again.

A link that closes leaves its peer "down" for `peer_remove_after` seconds, then the peer is
forgotten. Here too: keepalive and RTT, bytes in/out per link, throughput probes now and then,
CAPS_UPDATE and GOODBYE.
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
DRAIN_QUIET = 2.0  # seconds with nothing in flight before the smaller id closes a losing link
DRAIN_TIMEOUT = 300.0  # seconds a losing link may stay open for requests still in flight
DRAIN_POLL = 0.1  # seconds between two looks at a draining link


@dataclass
class PeerLink:
    node_id: str
    name: str
    address: str  # host:port the peer listens on
    conn: Connection | None = None
    initiator: str = ""  # node id that opened `conn`
    caps: dict[str, Any] = field(default_factory=dict)
    down_since: float | None = None
    # links that lost to `conn` and still finish what was in flight on them, oldest first
    draining: list[Connection] = field(default_factory=list)


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
        self.drain_quiet = DRAIN_QUIET
        self.drain_timeout = DRAIN_TIMEOUT
        self._drains: set[asyncio.Task[None]] = set()

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
        """Make `conn` the link to its peer, unless the live one wins (protocol.md 6.2); the
        loser of the two drains (:meth:`_drain`) instead of closing under its requests."""
        node_id = str(hello["node_id"])
        conn.name = f"{hello.get('name', '?')}({node_id[:8]})"
        conn.info["initiator"] = initiator
        link = self.links.get(node_id)
        if link is not None and link.conn is not None and not link.conn.closed:
            if not self.wins(node_id, initiator, link.initiator):
                self._lose(link, conn, f"duplicate link: the one {link.initiator[:8]} opened wins")
                return
            self._lose(link, link.conn, f"duplicate link: a newer one {initiator[:8]} opened wins")
        if link is None:
            link = PeerLink(node_id, str(hello.get("name", "")), address)
            self.links[node_id] = link
        link.name = str(hello.get("name", link.name))
        link.address = address
        link.caps = dict(hello.get("caps") or {})
        self._make_link(link, conn, initiator)

    def wins(self, node_id: str, new: str, old: str) -> bool:
        """Whether a link to `node_id` opened by node `new` replaces a live one opened by
        `old`: the smaller node id's link wins, of one node's links the newer."""
        if new == old:
            return True
        return new == min(self.node_id, node_id)

    def _make_link(self, link: PeerLink, conn: Connection, initiator: str) -> None:
        node_id = link.node_id
        link.conn = conn
        link.initiator = initiator
        link.down_since = None
        conn.on_close(lambda c: self._closed(node_id, c))

        def on_rtt(rtt: float) -> None:
            if link.conn is conn:
                self.emit(ev.LinkMeasured(node_id, rtt_ms=round(rtt * 1000, 3)))

        conn.start_keepalive(self.config.keepalive_interval, self.config.keepalive_timeout, on_rtt)
        self.emit(ev.PeerUp(node_id, link.name, link.address, link.caps, time.time()))
        log.info("peer %s (%s) up at %s", link.name, node_id[:8], link.address)

    def _lose(self, link: PeerLink, conn: Connection, why: str) -> None:
        """`conn` lost to another link to the same peer: it takes no new requests from here
        and closes once drained."""
        log.info("peer %s (%s): %s; draining %s", link.name, link.node_id[:8], why, conn.peername)
        conn.info["draining"] = why
        if conn not in link.draining:
            link.draining.append(conn)
            node_id = link.node_id
            conn.on_close(lambda c: self._drained(node_id, c))
        if link.conn is not conn:  # a new connection that lost: keepalive it while it drains
            conn.start_keepalive(self.config.keepalive_interval, self.config.keepalive_timeout)
        task = asyncio.get_running_loop().create_task(self._drain(link, conn, why))
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(self, link: PeerLink, conn: Connection, why: str) -> None:
        """Close a losing link: the smaller id once nothing was in flight on it for
        `drain_quiet` seconds (the other end has switched to the kept link by then: it did
        before its part of that link's handshake ended), either end after `drain_timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout
        closer = self.node_id < link.node_id
        quiet_since: float | None = None
        while not conn.closed and conn in link.draining:
            now = loop.time()
            if now >= deadline:
                conn.close(f"{why}; still busy after the drain timeout of {self.drain_timeout:g}s")
                return
            if closer:
                if conn.in_flight:
                    quiet_since = None
                elif quiet_since is None:
                    quiet_since = now
                elif now - quiet_since >= self.drain_quiet:
                    # two loop turns: read what may already wait on its socket, then look again
                    await asyncio.sleep(0)
                    await asyncio.sleep(0)
                    if not conn.in_flight and conn in link.draining:
                        conn.close(f"{why}; drained")
                        return
                    quiet_since = None
            await asyncio.sleep(DRAIN_POLL)

    def _drained(self, node_id: str, conn: Connection) -> None:
        link = self.links.get(node_id)
        if link is not None and conn in link.draining:
            link.draining.remove(conn)

    def _closed(self, node_id: str, conn: Connection) -> None:
        link = self.links.get(node_id)
        if link is None or link.conn is not conn:
            return
        preferred = min(self.node_id, node_id)
        spares = [c for c in link.draining if not c.closed]
        # the one the rule ranks first: the smaller id's, of those the newest
        spare = max(spares, key=lambda c: (c.info.get("initiator") == preferred, c.created), default=None)
        if spare is not None:  # a draining link is still open: it is the link again
            link.draining.remove(spare)
            spare.info.pop("draining", None)
            log.info("peer %s (%s): link closed (%s); the draining one %s is the link again",
                     link.name, node_id[:8], conn.close_reason, spare.peername)
            link.conn = spare
            link.initiator = str(spare.info.get("initiator", ""))
            spare.on_close(lambda c: self._closed(node_id, c))  # (a second call is a no-op)
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
        for task in list(self._drains):
            task.cancel()
        for link in self.links.values():
            for conn in list(link.draining):
                conn.close(reason)
            if link.conn is not None:
                link.conn.close(reason)

    # -- handlers (one-way) -----------------------------------------------------------------

    async def on_caps_update(self, conn: Connection, req: Request) -> None:
        node_id = conn.info.get("node_id")
        link = self.links.get(node_id or "")
        caps = req.meta.get("caps")
        # a dialer's caps follow its AUTH on its own connection, which may be one that drains
        if link is not None and isinstance(caps, dict) and (link.conn is conn or conn in link.draining):
            link.caps = caps
            self.emit(ev.PeerUp(link.node_id, link.name, link.address, caps, time.time()))

    async def on_goodbye(self, conn: Connection, req: Request) -> None:
        conn.close("peer said goodbye")
