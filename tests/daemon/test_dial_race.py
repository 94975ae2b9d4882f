"""Two daemons that dial each other at the same moment keep one link, and no request fails.

Two real Daemons run in this process (real listening sockets, real dial loops, real
handshakes), each started with the other as --peer, so both dial at once. Then, round after
round, both forget their dial target and add it again in the same loop turn: both dial loops
dial the other at the same moment again while the link is busy. All along, each side keeps
requests and streams going to the other by node id through the daemon's Cluster interface
(ROLE_CALL to an echo role with a 256 KiB payload, SUBSCRIBE streams of several partials), so
requests are in flight on whichever link loses a race.

After every round: one TCP connection joins the two (counted by the kernel, /proc/net/tcp:
every other end closed), both peer tables hold that same connection (one's local address is
the other's peer address), it is the one the smaller node id opened (protocol.md 6.2), and
no request or stream failed. Run plain (admitted at HELLO) and with a shared secret (admitted
at AUTH, frames sealed). The old peer table failed both with "replaced by a newer connection".
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from p2pllm.config import DaemonConfig
from p2pllm.daemon.daemon import Daemon
from p2pllm.wire.connection import Connection
from p2pllm.wire.messages import MsgType

ROUNDS = 6
PAYLOAD = bytes(range(256)) * 1024  # 256 KiB per echo call
_OPEN_STATES = {"01", "08"}  # ESTABLISHED, CLOSE_WAIT: the owning process has not closed it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _open_ends(ports: set[int]) -> list[tuple[int, int]]:
    """(local port, remote port) of every loopback TCP end touching one of `ports` that its
    process still holds open."""
    out = []
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            cols = line.split()
            local, remote, state = cols[1], cols[2], cols[3]
            lp, rp = int(local.split(":")[1], 16), int(remote.split(":")[1], 16)
            if state in _OPEN_STATES and (lp in ports or rp in ports) and rp != 0:
                out.append((lp, rp))
    return out


def _ends(conn: Connection) -> tuple[Any, Any]:
    transport = conn._transport
    assert transport is not None
    return tuple(transport.get_extra_info("sockname")[:2]), tuple(transport.get_extra_info("peername")[:2])


async def _settled(a: Daemon, b: Daemon, old: Sequence[Connection] = (), timeout: float = 20.0) -> Connection:
    """Wait until one TCP connection joins a and b, not one of `old`, and both tables name it;
    return a's end."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        ca, cb = a.peers.conn(b.node_id), b.peers.conn(a.node_id)
        ends = _open_ends({a.port, b.port})
        if (ca is not None and cb is not None and not ca.closed and not cb.closed and len(ends) == 2
                and ca not in old):
            sa, pa = _ends(ca)
            sb, pb = _ends(cb)
            assert (sa, pa) == (pb, sb), f"a uses {sa}->{pa}, b uses {sb}->{pb}: not the same link"
            return ca
        if loop.time() > deadline:
            drains = {d.name: [(_ends(c), c.in_flight, c.info.get("draining"))
                                for c in link.draining] for d in (a, b) for link in d.peers.links.values()}
            raise AssertionError(f"no single link after {timeout}s: open TCP ends {ends}, a: {ca} {_ends(ca) if ca else ''},"
                                 f" b: {cb} {_ends(cb) if cb else ''}, draining {drains}")
        await asyncio.sleep(0.05)


async def _traffic(src: Daemon, dst: Daemon, job: str, stop: asyncio.Event, done: list[str],
                   failed: list[str]) -> None:
    """Echo calls and SUBSCRIBE streams src -> dst by node id until `stop`."""

    async def echo() -> None:
        n = 0
        while not stop.is_set():
            try:
                reply = await src.request(dst.node_id, MsgType.ROLE_CALL, {"job": job, "data": n}, [PAYLOAD],
                                          timeout=30)
                assert reply.meta["echo"] == n and bytes(reply.payload) == PAYLOAD
                done.append("echo")
            except Exception as exc:  # every failure is the finding
                failed.append(f"{src.name}->{dst.name} echo: {type(exc).__name__}: {exc}")
                await asyncio.sleep(0.1)  # a failure may come without any await: let the loop run
            n += 1

    async def subscribe() -> None:
        while not stop.is_set():
            try:
                frames = [f async for f in src.stream(dst.node_id, MsgType.SUBSCRIBE,
                                                      {"interval": 0.05, "count": 6}, idle_timeout=30)]
                assert [f.is_partial for f in frames] == [True] * 6 + [False]
                done.append("stream")
            except Exception as exc:
                failed.append(f"{src.name}->{dst.name} stream: {type(exc).__name__}: {exc}")
                await asyncio.sleep(0.1)

    await asyncio.gather(echo(), echo(), subscribe(), subscribe())


@pytest.fixture(params=["plain", "sealed"])
async def pair(request: Any, tmp_path: Path) -> Any:
    secret: dict[str, Any] = {}
    if request.param == "sealed":  # with a shared secret: admitted at AUTH, frames sealed
        path = tmp_path / "secret"
        path.write_bytes(b"dial-race-shared-secret-0123456789abcdef\n")
        path.chmod(0o600)
        secret = {"secret_file": str(path)}
    ports = _free_port(), _free_port()
    daemons = []
    for i, name in enumerate(("race-a", "race-b")):
        config = DaemonConfig(name=name, host="127.0.0.1", port=ports[i], mdns=False,
                              peers=(f"127.0.0.1:{ports[1 - i]}",), state_dir=str(tmp_path / name),
                              threads=1, compute_bench_seconds=0.01, test_roles=True, **secret)
        daemons.append(Daemon(config))
    tasks = [asyncio.create_task(d.run()) for d in daemons]  # both dial the other at once
    await asyncio.wait_for(asyncio.gather(*(d.wait_ready() for d in daemons)), 60)
    yield daemons
    for d in daemons:
        d.stop()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)


async def test_simultaneous_dials_keep_one_link_and_fail_no_request(pair: list[Daemon]) -> None:
    a, b = pair
    for d in pair:
        d.peers.drain_quiet = 0.5  # settle faster than the default; the rule is the same
    first = await _settled(a, b)
    await a.request(b.node_id, MsgType.ASSIGN, {"job": "jab", "rid": "e", "role": "echo", "params": {}}, timeout=10)
    await b.request(a.node_id, MsgType.ASSIGN, {"job": "jba", "rid": "e", "role": "echo", "params": {}}, timeout=10)
    smaller = min(a.node_id, b.node_id)
    stop = asyncio.Event()
    done: list[str] = []
    failed: list[str] = []
    traffic = [asyncio.create_task(_traffic(a, b, "jab", stop, done, failed)),
               asyncio.create_task(_traffic(b, a, "jba", stop, done, failed))]
    winners = [first]
    try:
        for _ in range(ROUNDS):
            await asyncio.sleep(0.3)  # requests and streams are in flight on the current link
            before = len(done)
            # Both forget the other and dial it again, in the same loop turn.
            for d, other in ((a, b), (b, a)):
                key = ("127.0.0.1", other.port)
                d.dialer.targets.pop(key)
                d.dialer.add(*key, "static")
            link = await _settled(a, b, winners)  # a new dial won
            winners.append(link)
            for d, other in ((a, b), (b, a)):
                assert d.peers.links[other.node_id].initiator == smaller, "the link kept is not the smaller id's"
            await asyncio.sleep(0.2)
            assert not failed, failed[:5]
            assert len(done) > before, "no request completed across the race"
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*traffic), 60)
    assert not failed, failed[:5]
    assert done.count("echo") >= ROUNDS and done.count("stream") >= ROUNDS
    await _settled(a, b)


async def test_a_large_frame_right_behind_the_hello_answer_is_read_under_the_full_limits() -> None:
    """Without a secret the dialing side reads only the HELLO answer under the 64 KiB limit
    before trust (protocol.md 2.1). A server admits the link when it answers HELLO and may use
    it at once: its 256 KiB request, written in the same segment as the answer, is served
    (it used to be refused as too large, closing the new link)."""
    from p2pllm.net.auth import client_handshake
    from p2pllm.wire.connection import Reply, Request, connect
    from p2pllm.wire.frame import HEADER, HEADER_SIZE, PROTOCOL_VERSION, Limits, encode_frame
    from p2pllm.wire.messages import Flags

    answered: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readexactly(HEADER_SIZE)
        *_, rid, meta_len, payload_len = HEADER.unpack(head)
        await reader.readexactly(meta_len + payload_len)
        hello = {"version": PROTOCOL_VERSION, "node_id": "server-node", "name": "s", "port": 1, "auth": False,
                 "caps": {}}
        out = [*encode_frame(MsgType.HELLO, hello, flags=int(Flags.RESPONSE), request_id=rid),
               *encode_frame(MsgType.LINK_PROBE, {}, [PAYLOAD], request_id=7)]
        writer.write(b"".join(bytes(b) for b in out))  # one write: the answer and the request
        head = await reader.readexactly(HEADER_SIZE)
        *_, rid, meta_len, payload_len = HEADER.unpack(head)
        answered.set_result(await reader.readexactly(meta_len + payload_len))
        writer.close()

    got: list[int] = []

    async def handler(conn: Connection, req: Request) -> Reply:
        got.append(req.frame.payload.nbytes)
        return Reply(MsgType.LINK_PROBE, {}, [req.frame.payload])

    srv = await asyncio.start_server(server, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    conn = await connect("127.0.0.1", port, handler, limits=Limits())
    try:
        hello = await client_handshake(conn, node_id="client-node", name="c", kind="peer", port=0, secret=None)
        assert hello["node_id"] == "server-node"
        body = await asyncio.wait_for(answered, 10)
        assert got == [len(PAYLOAD)] and body.endswith(PAYLOAD), conn.close_reason
    finally:
        conn.close()
        srv.close()


async def test_the_kept_link_closing_falls_back_to_an_open_drained_one(pair: list[Daemon]) -> None:
    """Losers that still drain when the kept link closes: both sides take the same one back
    (the smaller id's, of those the newest) with no peer-down, and it carries requests."""
    a, b = pair
    old = await _settled(a, b)
    for d in pair:
        d.peers.drain_quiet = 60.0  # the losers of the next race stay open for this test
    for d, other in ((a, b), (b, a)):
        key = ("127.0.0.1", other.port)
        d.dialer.targets.pop(key)
        d.dialer.add(*key, "static")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while not all(len(d.peers.links[o.node_id].draining) == 2 for d, o in ((a, b), (b, a))):
        assert loop.time() < deadline, "the two losers of the race are not both draining"
        await asyncio.sleep(0.05)
    kept = a.peers.conn(b.node_id)
    assert kept is not None and kept is not old
    sa, pa = _ends(kept)
    smaller = min(a.node_id, b.node_id)
    spares = a.peers.links[b.node_id].draining
    expected = max(spares, key=lambda c: (c.info["initiator"] == smaller, c.created))
    kept.close("test: the kept link dies")
    while True:  # b learns of the close from its socket
        ca, cb = a.peers.conn(b.node_id), b.peers.conn(a.node_id)
        if ca is not None and cb is not None and not cb.closed and _ends(cb) != (pa, sa):
            break
        assert loop.time() < deadline, f"no fallback: a {ca}, b {cb}"
        await asyncio.sleep(0.05)
    assert ca is expected and not ca.closed, "a did not fall back to the drained link the rule ranks first"
    assert _ends(cb) == tuple(reversed(_ends(ca))), "the two sides fell back to different links"
    for d, other in ((a, b), (b, a)):
        assert d.snapshot()["peers"][0]["node_id"] == other.node_id
        reply = await d.request(other.node_id, MsgType.LINK_PROBE, {}, [PAYLOAD], timeout=10)
        assert bytes(reply.payload) == PAYLOAD
