"""Keepalive under a stalled event loop: a live peer survives the stall, a silent one does not.

When a synchronous call that overran the keepalive timeout ends right before the keepalive's
wake-up, the keepalive runs before the loop polls the socket again: counting the stall as the
peer's silence, and not reading the frames already waiting, it closed a live link. Each case
runs on the stdlib loop and, where it is installed, on uvloop (which the daemon prefers).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from p2pllm.wire.connection import Connection, Request, connect
from p2pllm.wire.frame import Limits
from p2pllm.wire.messages import MsgType
from p2pllm.wire.receive import FrameProtocol

INTERVAL, TIMEOUT, STALL = 0.05, 0.4, 1.2  # the stall is three keepalive timeouts long

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
try:
    import uvloop
except ImportError:  # optional: the daemon falls back to the stdlib loop
    pass
else:
    LOOPS["uvloop"] = uvloop.new_event_loop


async def _ignore(conn: Connection, req: Request) -> None:
    return None


def _run(loop: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(main())


class PingingPeer:
    """A peer on its own thread and event loop that pings us every INTERVAL, and so keeps
    sending while our loop is stalled."""

    def __init__(self) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.pings = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        self.srv.setblocking(False)
        sock, _ = await loop.sock_accept(self.srv)
        conn = await _adopt(sock)
        while not self._stop.is_set() and not conn.closed:
            await conn.notify(MsgType.PING, {"t": time.time()})
            self.pings += 1
            await asyncio.sleep(INTERVAL)
        conn.close()

    def start(self) -> PingingPeer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.srv.close()


async def _adopt(sock: socket.socket) -> Connection:
    """A Connection on an accepted socket."""
    loop = asyncio.get_running_loop()
    _, proto = await loop.connect_accepted_socket(
        lambda: FrameProtocol(lambda t, p: Connection(t, p, _ignore, Limits(), "peer")), sock
    )
    conn = await proto.made
    assert isinstance(conn, Connection)
    return conn


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_live_peer_survives_a_loop_stall_longer_than_the_keepalive_timeout(loop: str) -> None:
    peer = PingingPeer().start()

    async def main() -> None:
        ev = asyncio.get_running_loop()
        conn = await connect("127.0.0.1", peer.port, _ignore)
        stalled = asyncio.Event()
        armed = False

        def stall() -> None:
            time.sleep(STALL)  # a synchronous call that overran: the loop is blocked
            stalled.set()

        def on_rtt(rtt: float) -> None:
            # Called by the keepalive right before it sleeps INTERVAL. The stall is due before
            # its wake-up, and a short block first lets both come due together: the keepalive
            # then runs right after the stall, before the loop polls the socket again.
            nonlocal armed
            if not armed:
                armed = True
                ev.call_soon(time.sleep, 2 * INTERVAL)
                ev.call_later(INTERVAL / 2, stall)

        try:
            await asyncio.sleep(4 * INTERVAL)  # the peer pinging us
            before = peer.pings
            conn.start_keepalive(INTERVAL, TIMEOUT, on_rtt)
            await asyncio.wait_for(stalled.wait(), 5)
            assert peer.pings > before + 5  # the peer kept sending during the stall
            await asyncio.sleep(4 * INTERVAL)
            assert not conn.closed, conn.close_reason
            await asyncio.sleep(2 * TIMEOUT)  # and the link stays up afterwards
            assert not conn.closed, conn.close_reason
        finally:
            conn.close()

    try:
        _run(loop, main)
    finally:
        peer.stop()


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_silent_peer_is_still_closed_after_a_loop_stall(loop: str) -> None:
    srv = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does) and never sends
    port = srv.getsockname()[1]

    async def main() -> None:
        conn = await connect("127.0.0.1", port, _ignore)
        try:
            conn.start_keepalive(INTERVAL, TIMEOUT)
            await asyncio.sleep(4 * INTERVAL)
            assert not conn.closed
            time.sleep(STALL)
            t0 = time.monotonic()
            await asyncio.wait_for(conn.wait_closed(), 3)
            assert time.monotonic() - t0 < TIMEOUT + 2 * INTERVAL + 0.5  # at once, not a timeout later
            assert "keepalive" in conn.close_reason
        finally:
            conn.close()

    try:
        _run(loop, main)
    finally:
        srv.close()


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_silent_peer_is_closed_within_the_keepalive_timeout(loop: str) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    async def main() -> None:
        conn = await connect("127.0.0.1", port, _ignore)
        t0 = time.monotonic()
        conn.start_keepalive(INTERVAL, TIMEOUT)
        await asyncio.wait_for(conn.wait_closed(), 3)
        waited = time.monotonic() - t0
        assert TIMEOUT <= waited < TIMEOUT + 2 * INTERVAL + 0.5, waited
        assert "keepalive" in conn.close_reason

    try:
        _run(loop, main)
    finally:
        srv.close()
