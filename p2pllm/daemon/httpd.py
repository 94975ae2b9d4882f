"""The daemon's HTTP listener: `p2pllmd --metrics HOST:PORT` serves GET /metrics.

Library: aiohttp. It runs on the daemon's own asyncio (uv)loop, is widely used and kept up,
and the OpenAI API of issue 13 needs what it has and a hand-rolled handler would not
(streaming server-sent events, request bodies, keep-alive, HTTP/1.1 corner cases); that API
mounts :func:`metrics_routes` in its own app, so /metrics is this code either way. A strict
handler of our own for one GET would be ~100 lines but a second HTTP parser to keep safe.

Strictness (aiohttp's limits, set tighter than its defaults): the request line and each
header at most MAX_LINE bytes, at most MAX_HEADERS headers (over: 400 and close); a
connection that has not sent a whole request within READ_TIMEOUT seconds, or sits idle that
long after a response, is closed (aiohttp's keep-alive timer runs from the connection's
start and closes a connection still waiting for its request). Only GET (and HEAD) /metrics:
another path is 404, another method 405 (aiohttp's router). No access log.

The endpoint has no authentication: whoever reaches it reads job ids, peer names and figures.
So it binds loopback unless the daemon has a secret (DaemonConfig, SECURITY.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from p2pllm.daemon.metrics import CONTENT_TYPE, render_metrics

log = logging.getLogger(__name__)

READ_TIMEOUT = 5.0  # seconds a connection may take to send its request (or stay idle)
MAX_LINE = 4096  # bytes of the request line and of each header line
MAX_HEADERS = 32
MAX_BODY = 1024  # bytes of a request body aiohttp would read (GET /metrics reads none)

Snapshot = Callable[[], Mapping[str, Any]]


def metrics_routes(snapshot: Snapshot) -> list[web.RouteDef]:
    """GET /metrics answering render_metrics(snapshot()): what an aiohttp app mounts."""

    async def metrics(request: web.Request) -> web.Response:
        body = render_metrics(snapshot()).encode()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    return [web.get("/metrics", metrics)]


class MetricsListener:
    """An aiohttp server on the running loop serving :func:`metrics_routes` only."""

    def __init__(self, snapshot: Snapshot) -> None:
        app = web.Application(client_max_size=MAX_BODY)
        app.add_routes(metrics_routes(snapshot))
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0,
            keepalive_timeout=READ_TIMEOUT,
            max_line_size=MAX_LINE, max_field_size=MAX_LINE, max_headers=MAX_HEADERS,
        )
        self.host = ""
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0]
        self.host, self.port = str(bound[0]), int(bound[1])
        log.info("metrics on http://%s/metrics", self.address)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def stop(self) -> None:
        await self._runner.cleanup()
