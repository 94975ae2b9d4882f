"""A userspace TCP link emulator: listen on a port, forward to host:port, with one-way latency,
jitter and a bandwidth cap per direction.

    python bench/linkproxy.py --listen 127.0.0.1:7500 --target 127.0.0.1:7411 \
        --latency-ms 10 --jitter-ms 1 --mbps 100

or, from a benchmark::

    async with LinkProxy(("127.0.0.1", 0), ("127.0.0.1", 7411), Link(latency=0.010)) as px:
        ...  # connect to px.port

Each direction of each connection is one ordered pipe: a chunk read at time t is written no
earlier than t + latency + jitter, and never before the chunk read ahead of it (jitter
delays, it never reorders: TCP's byte order holds). The bandwidth cap serialises the chunks
of a direction: a chunk of n bytes occupies the link for n / rate seconds after the previous
one left it (a token-free "serialisation delay" model, as a real link of that rate). An RTT of
R is ``latency = R / 2`` on each direction. TCP_NODELAY is set on both sides, so the proxy adds
no Nagle delay of its own. Half-close (EOF) is forwarded after the bytes before it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import socket
import sys
from dataclasses import dataclass
from typing import Any

__all__ = ["Link", "LinkProxy", "main"]

CHUNK = 1 << 16


@dataclass(frozen=True)
class Link:
    """One direction's impairments: ``latency`` and ``jitter`` in seconds (the jitter is
    uniform in [0, jitter], added to the latency), ``rate`` in bytes per second (0: no cap)."""

    latency: float = 0.0
    jitter: float = 0.0
    rate: float = 0.0

    def __post_init__(self) -> None:
        if self.latency < 0 or self.jitter < 0 or self.rate < 0:
            raise ValueError(f"Link: latency, jitter and rate must be >= 0, got {self}")

    @classmethod
    def rtt(cls, rtt_ms: float, jitter_ms: float = 0.0, mbps: float = 0.0) -> Link:
        """A direction of a link with this round-trip time (half of it each way)."""
        return cls(rtt_ms / 2000.0, jitter_ms / 1000.0, mbps * 1e6 / 8)


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class LinkProxy:
    """The proxy; ``up`` applies from the listening side to the target, ``down`` back."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], up: Link = Link(),
                 down: Link | None = None, seed: int | None = None) -> None:
        self.listen, self.target = listen, target
        self.up, self.down = up, (up if down is None else down)
        self.rng = random.Random(seed)
        self.server: asyncio.base_events.Server | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        assert self.server is not None, "start() first"
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def address(self) -> str:
        return f"{self.listen[0]}:{self.port}"

    async def start(self) -> LinkProxy:
        self.server = await asyncio.start_server(self._accept, self.listen[0], self.listen[1])
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t

    async def __aenter__(self) -> LinkProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _accept(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            try:
                tr, tw = await asyncio.open_connection(*self.target)
            except OSError:
                cw.close()
                return
            self.connections += 1
            _nodelay(cw)
            _nodelay(tw)
            pipes = [asyncio.ensure_future(self._pipe(cr, tw, self.up, "up")),
                     asyncio.ensure_future(self._pipe(tr, cw, self.down, "down"))]
            try:
                await asyncio.gather(*pipes)
            finally:
                for p in pipes:
                    p.cancel()
                for w in (cw, tw):
                    w.close()
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link,
                    way: str) -> None:
        """Read chunks and release each at its due time, in order, through a queue."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def sender() -> None:
            free_at = 0.0  # when the capped link is done with the previous chunk
            while True:
                due, data = await queue.get()
                if not data:
                    with contextlib.suppress(OSError, RuntimeError):
                        writer.write_eof()
                    return
                if link.rate > 0:
                    start = max(due - link.latency, free_at)  # serialisation starts on arrival
                    free_at = start + len(data) / link.rate
                    due = max(due, free_at + link.latency)
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        send = asyncio.ensure_future(sender())
        last_due = 0.0
        try:
            while True:
                data = await reader.read(CHUNK)
                now = loop.time()
                delay = link.latency + (self.rng.uniform(0.0, link.jitter) if link.jitter else 0.0)
                last_due = max(last_due, now + delay)  # jitter never reorders
                queue.put_nowait((last_due, data))
                if not data:
                    break
                if way == "up":
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
            await send
        except (ConnectionError, OSError):
            pass
        finally:
            send.cancel()


def _hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", type=_hostport, required=True, help="HOST:PORT to listen on")
    ap.add_argument("--target", type=_hostport, required=True, help="HOST:PORT to forward to")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="one-way latency, each way")
    ap.add_argument("--rtt-ms", type=float, default=None, help="instead: round trip (half each way)")
    ap.add_argument("--jitter-ms", type=float, default=0.0, help="extra uniform [0, J] one-way")
    ap.add_argument("--mbps", type=float, default=0.0, help="bandwidth cap per direction (0: none)")
    ap.add_argument("--seed", type=int, default=None, help="jitter seed")
    a = ap.parse_args(argv)
    one_way = a.rtt_ms / 2 if a.rtt_ms is not None else a.latency_ms
    link = Link(one_way / 1000.0, a.jitter_ms / 1000.0, a.mbps * 1e6 / 8)

    async def serve() -> None:
        async with LinkProxy(a.listen, a.target, link, seed=a.seed) as px:
            cap = f"{a.mbps:g} Mbit/s" if a.mbps else "uncapped"
            print(f"linkproxy {px.address} -> {a.target[0]}:{a.target[1]} one-way {one_way:g} "
                  f"ms, jitter {a.jitter_ms:g} ms, {cap}", file=sys.stderr, flush=True)
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
