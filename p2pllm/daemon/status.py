"""What a daemon tells about itself: STATUS, SUBSCRIBE (status as a stream), LINK_PROBE.

Caps (issue 12; DaemonConfig, protocol.md 4.5): SUBSCRIBE streams open at once per connection
(max_subscriptions_per_conn) and per daemon (max_subscriptions); LINK_PROBE's echoed payload
(max_probe_bytes) and rate per connection (max_probe_rate, a token bucket as deep as one
second of it). Past one: OVER_LIMIT, and the connection's other requests go on.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from p2pllm.daemon import state as ev
from p2pllm.wire.connection import Connection, Reply, Request
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode, MsgType

if TYPE_CHECKING:
    from p2pllm.daemon.daemon import Daemon


@dataclass
class _PerConnection:
    subscriptions: int = 0
    probe_tokens: float = -1.0  # < 0: a full bucket on the first probe
    probe_at: float = field(default_factory=time.monotonic)


def _over(what: str, cap: int | float, key: str) -> ProtocolError:
    return ProtocolError(ErrorCode.OVER_LIMIT, f"{what} over the cap {cap:g} (config key {key})")


class StatusHandlers:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self._conns: weakref.WeakKeyDictionary[Connection, _PerConnection] = (
            weakref.WeakKeyDictionary())
        self.subscriptions = 0  # SUBSCRIBE streams open now, all connections together

    def _of(self, conn: Connection) -> _PerConnection:
        per = self._conns.get(conn)
        if per is None:
            per = self._conns[conn] = _PerConnection()
        return per

    def _take_probe(self, conn: Connection) -> None:
        """One LINK_PROBE from ``conn``'s bucket (max_probe_rate per second, as deep)."""
        rate = self.d.config.max_probe_rate
        per, now = self._of(conn), time.monotonic()
        tokens = rate if per.probe_tokens < 0 else min(
            rate, per.probe_tokens + (now - per.probe_at) * rate)
        per.probe_at = now
        if tokens < 1.0:
            per.probe_tokens = tokens
            raise _over("LINK_PROBE requests per second", rate, "max_probe_rate")
        per.probe_tokens = tokens - 1.0

    async def on_status(self, conn: Connection, req: Request) -> Reply:
        d = self.d
        d.emit(ev.NodeUpdated(d.caps_now()))
        return Reply(MsgType.STATUS, d.snapshot())

    async def on_subscribe(self, conn: Connection, req: Request) -> Reply:
        d = self.d
        interval = req.meta.get("interval", 0.25)
        if not isinstance(interval, int | float) or not 0.05 <= interval <= 60:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "interval must be within 0.05..60 seconds")
        count = req.meta.get("count")  # None = until cancelled
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"SUBSCRIBE: count must be an integer, got {count!r:.60}")
        per, cfg = self._of(conn), d.config
        if per.subscriptions >= cfg.max_subscriptions_per_conn:
            raise _over(f"SUBSCRIBE stream {per.subscriptions + 1} of this connection",
                        cfg.max_subscriptions_per_conn, "max_subscriptions_per_conn")
        if self.subscriptions >= cfg.max_subscriptions:
            raise _over(f"SUBSCRIBE stream {self.subscriptions + 1} of this daemon",
                        cfg.max_subscriptions, "max_subscriptions")
        per.subscriptions += 1
        self.subscriptions += 1
        try:
            sent = 0
            while count is None or sent < count:
                d.emit(ev.NodeUpdated(d.caps_now()))
                await req.partial(MsgType.STATUS, d.snapshot())
                sent += 1
                await asyncio.sleep(float(interval))
            return Reply(MsgType.STATUS, d.snapshot())
        finally:  # ended, cancelled or its connection gone: the slot is free again
            per.subscriptions -= 1
            self.subscriptions -= 1

    async def on_link_probe(self, conn: Connection, req: Request) -> Reply:
        """Without "target": echo the payload (a throughput probe). With one: ping that peer."""
        target = req.meta.get("target")
        cap = self.d.config.max_probe_bytes
        if req.frame.payload.nbytes > cap:
            raise _over(f"LINK_PROBE payload of {req.frame.payload.nbytes} bytes", cap,
                        "max_probe_bytes")
        self._take_probe(conn)
        if target is None:
            return Reply(MsgType.LINK_PROBE, {}, [req.frame.payload] if req.frame.payload.nbytes else [])
        count = req.meta.get("count", 4)
        if not isinstance(target, str) or not isinstance(count, int) or not 1 <= count <= 100:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "LINK_PROBE target must be a string, count 1..100")
        link = self.d.peers.find(target)
        rtts = []
        for _ in range(count):
            t0 = time.perf_counter()
            await self.d.request(link.node_id, MsgType.PING, {"t": time.time()}, timeout=10)
            rtts.append(round((time.perf_counter() - t0) * 1000, 3))
        return Reply(
            MsgType.LINK_PROBE,
            {"node_id": link.node_id, "name": link.name, "address": link.address, "rtt_ms": rtts},
        )
