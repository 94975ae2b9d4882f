"""What a daemon tells about itself: STATUS, SUBSCRIBE (status as a stream), LINK_PROBE."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from p2pllm.daemon import state as ev
from p2pllm.wire.connection import Connection, Reply, Request
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode, MsgType

if TYPE_CHECKING:
    from p2pllm.daemon.daemon import Daemon


class StatusHandlers:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

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
        sent = 0
        while count is None or sent < count:
            d.emit(ev.NodeUpdated(d.caps_now()))
            await req.partial(MsgType.STATUS, d.snapshot())
            sent += 1
            await asyncio.sleep(float(interval))
        return Reply(MsgType.STATUS, d.snapshot())

    async def on_link_probe(self, conn: Connection, req: Request) -> Reply:
        """Without "target": echo the payload (a throughput probe). With one: ping that peer."""
        target = req.meta.get("target")
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
