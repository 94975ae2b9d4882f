"""mDNS discovery on 127.0.0.1: real zeroconf sockets, in one process and across processes.

Other test runs on the same machine may announce `_p2pllm._tcp` too, so every assertion looks
only at the random node ids a test made itself.

Run as a script (``python test_discovery.py child NAME NODE_ID PORT VERSION``) this file is
the child process of `test_separate_processes`: it prints one JSON line per event.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import pytest
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from p2pllm.net.discovery import SERVICE_TYPE, Discovery, PeerAddr

LOOPBACK = "127.0.0.1"
WITHIN_S = 6.0  # every discovery event below is expected well inside this
REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(30)


async def wait_until(cond: Callable[[], bool], what: str, within: float = WITHIN_S) -> None:
    """Poll `cond` until it holds; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.02)


def new_node_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Recorder:
    """Collects one Discovery's callbacks and the threads they ran on."""

    found: list[PeerAddr] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    threads: set[int] = field(default_factory=set)

    def on_found(self, peer: PeerAddr) -> None:
        self.threads.add(threading.get_ident())
        self.found.append(peer)

    def on_lost(self, node_id: str) -> None:
        self.threads.add(threading.get_ident())
        self.lost.append(node_id)

    def latest(self, node_id: str) -> PeerAddr | None:
        """The last address reported for `node_id`, or None."""
        return next((p for p in reversed(self.found) if p.node_id == node_id), None)

    def knows(self, peer: PeerAddr) -> bool:
        return self.latest(peer.node_id) == peer

    def knows_all(self, peers: list[PeerAddr]) -> bool:
        return all(self.knows(p) for p in peers)

    def was_lost(self, node_id: str) -> bool:
        return node_id in self.lost


@dataclass
class Node:
    disc: Discovery
    rec: Recorder
    node_id: str
    addr: PeerAddr  # what the others should see


MakeNode = Callable[..., Node]


@pytest.fixture
async def make_node() -> AsyncIterator[MakeNode]:
    """Build Discovery instances on 127.0.0.1; all are stopped at teardown."""
    made: list[Discovery] = []

    def make(name: str = "host", *, port: int = 7000, version: int = 1) -> Node:
        node_id = new_node_id()
        rec = Recorder()
        disc = Discovery(
            name=name,
            node_id=node_id,
            port=port,
            version=version,
            interface=LOOPBACK,
            on_found=rec.on_found,
            on_lost=rec.on_lost,
        )
        made.append(disc)
        addr = PeerAddr(node_id=node_id, name=name, host=LOOPBACK, port=port, version=version)
        return Node(disc, rec, node_id, addr)

    yield make
    await asyncio.gather(*(d.stop() for d in made))


# -- in one process ---------------------------------------------------------------------------


async def test_three_nodes_find_each_other_with_exact_addresses(make_node: MakeNode) -> None:
    # Prepare: distinct names, ports and protocol versions, so every field is checked.
    nodes = [
        make_node("alpha", port=7101, version=1),
        make_node("beta", port=7102, version=2),
        make_node("gamma", port=7103, version=3),
    ]
    # Execute
    await asyncio.gather(*(n.disc.start() for n in nodes))
    # Assert: each sees exactly the other two, fields as announced; never itself.
    for me in nodes:
        others = [n for n in nodes if n is not me]
        await wait_until(
            partial(me.rec.knows_all, [o.addr for o in others]), f"{me.addr.name} finds the others"
        )
        for other in others:
            assert me.rec.latest(other.node_id) == other.addr
        assert me.rec.latest(me.node_id) is None
        assert {p.node_id for p in me.disc.peers()} >= {o.node_id for o in others}
        assert me.rec.threads == {threading.get_ident()}  # callbacks ran on the loop thread


async def test_same_name_different_node_ids_are_both_found(make_node: MakeNode) -> None:
    twin_a = make_node("twin", port=7201)
    twin_b = make_node("twin", port=7202)
    watcher = make_node("watcher", port=7203)
    await asyncio.gather(twin_a.disc.start(), twin_b.disc.start(), watcher.disc.start())

    assert twin_a.disc.instance_name != twin_b.disc.instance_name
    await wait_until(
        lambda: bool(watcher.rec.latest(twin_a.node_id) and watcher.rec.latest(twin_b.node_id)),
        "watcher finds both twins",
    )
    await wait_until(lambda: twin_a.rec.latest(twin_b.node_id) is not None, "twin a finds b")
    await wait_until(lambda: twin_b.rec.latest(twin_a.node_id) is not None, "twin b finds a")
    assert watcher.rec.latest(twin_a.node_id) == twin_a.addr
    assert watcher.rec.latest(twin_b.node_id) == twin_b.addr


async def test_late_joiner_finds_others_and_stop_reports_lost(make_node: MakeNode) -> None:
    leaver = make_node("leaver", port=7301)
    stayers = [make_node("stay1", port=7302), make_node("stay2", port=7303)]
    # The leaver joins late, after the stayers' announcements: it must find them by querying.
    await asyncio.gather(*(s.disc.start() for s in stayers))
    await leaver.disc.start()
    await wait_until(
        lambda: all(leaver.rec.latest(s.node_id) == s.addr for s in stayers), "late joiner finds"
    )
    for s in stayers:
        await wait_until(partial(s.rec.knows, leaver.addr), "leaver found")

    await leaver.disc.stop()
    await leaver.disc.stop()  # idempotent

    for s in stayers:
        await wait_until(partial(s.rec.was_lost, leaver.node_id), "leaver reported lost")
        assert s.rec.lost.count(leaver.node_id) == 1
        assert leaver.node_id not in {p.node_id for p in s.disc.peers()}
        other = next(o for o in stayers if o is not s)
        assert other.node_id not in s.rec.lost


async def test_start_twice_or_after_stop_is_refused(make_node: MakeNode) -> None:
    node = make_node("once")
    await node.disc.start()
    with pytest.raises(RuntimeError):
        await node.disc.start()
    await node.disc.stop()
    with pytest.raises(RuntimeError):
        await node.disc.start()


def test_bad_arguments_are_rejected() -> None:
    def make(**kw: object) -> Discovery:
        args: dict[str, object] = dict(
            name="n", node_id="id", port=1, version=1, interface=None,
            on_found=lambda p: None, on_lost=lambda n: None,
        )  # fmt: skip
        args.update(kw)
        return Discovery(**args)  # type: ignore[arg-type]

    for bad in ({"name": ""}, {"node_id": ""}, {"port": 0}, {"port": 70000}, {"version": -1}):
        with pytest.raises(ValueError):
            make(**bad)
    with pytest.raises(ValueError):
        make(interface="not-an-ip")
    with pytest.raises(ValueError):
        PeerAddr(node_id="x", name="x", host="nowhere", port=1, version=1)
    # A long name still yields one DNS label (<= 63 bytes) that keeps the node id prefix.
    long = make(name="x" * 150, node_id="abcdef0123456789")
    label = long.instance_name.removesuffix("." + SERVICE_TYPE)
    assert len(label.encode()) <= 63
    assert label.endswith("-abcdef01")


# -- announcements from a foreign responder ---------------------------------------------------


@pytest.fixture
async def raw_zc() -> AsyncIterator[AsyncZeroconf]:
    """A bare zeroconf responder on 127.0.0.1, to announce hand-made records."""
    aiozc = AsyncZeroconf(interfaces=[LOOPBACK])
    yield aiozc
    await aiozc.async_close()


def raw_info(name: str, port: int, props: dict[str, str]) -> AsyncServiceInfo:
    return AsyncServiceInfo(
        SERVICE_TYPE,
        f"{name}.{SERVICE_TYPE}",
        port=port,
        properties=props,
        server=f"{name}.local.",
        parsed_addresses=[LOOPBACK],
    )


async def test_port_change_is_reported_and_malformed_announcement_ignored(
    make_node: MakeNode, raw_zc: AsyncZeroconf
) -> None:
    watcher = make_node("watcher", port=7401)
    await watcher.disc.start()
    peer_id = new_node_id()
    good = raw_info(f"raw-{peer_id[:8]}", 7402, {"node_id": peer_id, "name": "raw", "version": "4"})
    bad = raw_info(f"bad-{peer_id[:8]}", 7403, {"name": "no-node-id", "version": "x"})

    await raw_zc.async_register_service(bad, cooperating_responders=True)
    await raw_zc.async_register_service(good, cooperating_responders=True)
    expected = PeerAddr(node_id=peer_id, name="raw", host=LOOPBACK, port=7402, version=4)
    await wait_until(lambda: watcher.rec.latest(peer_id) == expected, "raw peer found")

    good.port = 7404
    await raw_zc.async_update_service(good)
    moved = PeerAddr(node_id=peer_id, name="raw", host=LOOPBACK, port=7404, version=4)
    await wait_until(lambda: watcher.rec.latest(peer_id) == moved, "port change reported")

    # The malformed one (no node_id) was never reported, nor did it break anything.
    assert all(p.name != "no-node-id" for p in watcher.rec.found)
    assert watcher.rec.found.count(expected) == 1


# -- separate OS processes --------------------------------------------------------------------


@dataclass
class Child:
    proc: asyncio.subprocess.Process
    events: list[dict[str, object]] = field(default_factory=list)

    def saw(self, event: str, node_id: str) -> bool:
        return any(e["event"] == event and e["node_id"] == node_id for e in self.events)

    async def read_events(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.events.append(json.loads(line))


async def spawn_child(name: str, node_id: str, port: int, version: int) -> Child:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "child", name, node_id, str(port), str(version),
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )  # fmt: skip
    return Child(proc)


async def test_separate_processes_discover_and_lose_each_other(make_node: MakeNode) -> None:
    # Prepare: this process plus two child processes, each with its own zeroconf sockets.
    me = make_node("parent", port=7501, version=5)
    ids = [new_node_id(), new_node_id()]
    children = [
        await spawn_child("child0", ids[0], 7502, 5),
        await spawn_child("child1", ids[1], 7503, 5),
    ]
    try:
        async with asyncio.TaskGroup() as tg:
            readers = [tg.create_task(c.read_events()) for c in children]
            await me.disc.start()

            # Assert: everyone finds everyone, with exact addresses.
            for i, child_id in enumerate(ids):
                want = PeerAddr(child_id, f"child{i}", LOOPBACK, 7502 + i, 5)
                await wait_until(partial(me.rec.knows, want), f"child{i} found")
            for i, child in enumerate(children):
                await wait_until(partial(child.saw, "found", me.node_id), f"child{i} finds parent")
                await wait_until(partial(child.saw, "found", ids[1 - i]), f"child{i} finds sibling")
            parent_seen = next(e for e in children[0].events if e["node_id"] == me.node_id)
            assert parent_seen == {"event": "found", **asdict(me.addr)}

            # Execute: SIGTERM child0, which says goodbye on its way out.
            children[0].proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(children[0].proc.wait(), WITHIN_S) == 0
            await wait_until(lambda: ids[0] in me.rec.lost, "parent sees child0 lost")
            await wait_until(lambda: children[1].saw("lost", ids[0]), "child1 sees child0 lost")

            children[1].proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(children[1].proc.wait(), WITHIN_S) == 0
            await asyncio.wait_for(asyncio.gather(*readers), WITHIN_S)
    finally:
        for child in children:
            if child.proc.returncode is None:
                child.proc.kill()
                await child.proc.wait()


async def _child_main(name: str, node_id: str, port: int, version: int) -> None:
    """Child process: run one Discovery until SIGTERM (or 30 s), one JSON line per event."""

    def emit(event: str, **fields: object) -> None:
        sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stdout.flush()

    done = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, done.set)
    disc = Discovery(
        name=name,
        node_id=node_id,
        port=port,
        version=version,
        interface=LOOPBACK,
        on_found=lambda p: emit("found", **asdict(p)),
        on_lost=lambda n: emit("lost", node_id=n),
    )
    async with disc:
        emit("started", node_id=node_id)
        try:
            await asyncio.wait_for(done.wait(), 30)
        except TimeoutError:
            pass


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    _name, _node_id, _port, _version = sys.argv[2:6]
    asyncio.run(_child_main(_name, _node_id, int(_port), int(_version)))
