"""Fetching a model from peers when sources fail (issue 16), with real p2pllmd processes on
loopback and the test proxy (tests/weights/proxy.py) between the fetching daemon and a source:

(a) two daemons hold the model, a third pulls it; the first source is killed once it has
    delivered one WEIGHTS_READ answer: the pull completes from the second source, which serves
    fewer bytes than the whole (what the first delivered is kept), and the fetched copy is the
    source's files byte for byte and generates as the model does;
(b) a source whose answers the proxy corrupts is dropped as corrupt and the other is used;
(c) no source left (both corrupt): the pull fails with an error naming the model and every
    source with why it was dropped, and `p2pllm models fetch` exits non-zero saying so.

The model is the bundled shakespeare under another name (a node lacks it unless it is in its
roots; the bundled dir is every daemon's root) plus a 24 MiB data file: the fetch is then
several WEIGHTS_READ batches, so a source can be killed or caught corrupting mid-fetch. The
fetching daemon dials each source through its own proxy (`--peer` the proxy's address, mDNS
off; the sources dial nobody), so every byte between them crosses the proxy.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from p2pllm.cli.client import open_daemon
from p2pllm.lab.daemons import free_ports
from p2pllm.wire.connection import RemoteError
from p2pllm.wire.messages import ErrorCode, MsgType
from tests.conftest import BUNDLED, REPO, DaemonProc, wait_for
from tests.weights.proxy import WEIGHTS_READ, ProxyThread

MODEL = "bard"  # shakespeare's files under a name no daemon has in its roots
EXTRA = 24 << 20  # bytes of a data file in the model's folder (fetched whole, in 4 MiB pieces)
FAST = ("--no-mdns",)  # the default keepalive: a loaded box must not flap links mid-test
RATE = 4_000_000  # bytes/s through each proxy in (a): the fetch takes seconds, not milliseconds


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models dir holding MODEL: shakespeare's files and notes.bin (seeded random bytes)."""
    root = tmp_path_factory.mktemp("weights-failover") / "models"
    folder = root / MODEL
    folder.mkdir(parents=True)
    for f in BUNDLED.iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
    (folder / "notes.bin").write_bytes(random.Random(16).randbytes(EXTRA))
    return root



class Later(DaemonProc):
    """A DaemonProc started by start() (its port may be chosen before: a proxy points at it)."""

    def __init__(self, name: str, args: list[str], log_dir: Path) -> None:
        self.name, self._args, self._log_dir = name, args, log_dir
        self.port, self.node_id = 0, ""
        self.proc = None  # type: ignore[assignment]

    def start(self) -> None:
        port = self.port
        DaemonProc.__init__(self, self.name, self._args, self._log_dir)
        self.port = port

    def stop(self, timeout: float = 15.0) -> int | None:
        return super().stop(timeout) if self.proc is not None else None


class Cluster:
    """Sources holding MODEL, each behind its own Proxy, and one fetching daemon that dials
    every source through its proxy."""

    def __init__(self, tmp: Path, models: Path) -> None:
        self.tmp = tmp
        self.models = models
        self.empty = tmp / "no-models"
        self.empty.mkdir()
        self.sources: list[Later] = []
        self.proxies: list[ProxyThread] = []
        self.fetcher: Later | None = None
        self._conns: list[Any] = []

    def _daemon(self, name: str, *args: str) -> Later:
        return Later(name, [*FAST, "--state-dir", str(self.tmp / f"state-{name}"), *args], self.tmp)

    async def start(self, n: int, started: int | None = None, **proxy_kwargs: Any) -> Cluster:
        """``n`` sources (the first ``started`` of them running now; the others get their port
        and proxy, and start with start_source), and the fetcher."""
        ports = free_ports(n)
        self.sources = [self._daemon(f"src{i}", "--port", str(port), "--models-dir", str(self.models))
                        for i, port in enumerate(ports)]
        started = n if started is None else started
        for d, port in zip(self.sources, ports, strict=True):
            d.port = port
        for d in self.sources[:started]:
            d.start()
            await asyncio.to_thread(d.wait_ready)
        # each proxy on its own loop in a thread: nothing the test blocks on stalls the links
        self.proxies = [ProxyThread(d.port, **proxy_kwargs).start() for d in self.sources]
        peers = [x for p in self.proxies for x in ("--peer", p.proxy.address)]
        self.fetcher = self._daemon("fetcher", "--models-dir", str(self.empty), *peers)
        self.fetcher.start()
        await asyncio.to_thread(self.fetcher.wait_ready)
        await self.sees(started)
        return self

    async def start_source(self, i: int) -> None:
        self.sources[i].start()
        await asyncio.to_thread(self.sources[i].wait_ready)

    async def sees(self, n: int) -> None:
        """Wait until the fetcher has ``n`` sources up that list MODEL."""
        assert self.fetcher is not None

        async def up() -> bool:
            snap = await self.status(self.fetcher)  # type: ignore[arg-type]
            return n == sum(p["state"] == "up" and any(m.get("name") == MODEL for m in p.get("models") or [])
                            for p in snap["peers"])

        await wait_for(up, timeout=30, what=f"the fetcher linked to {n} sources listing {MODEL}")

    async def conn(self, d: DaemonProc) -> Any:
        c = await open_daemon(d.address)
        self._conns.append(c)
        return c

    async def status(self, d: DaemonProc) -> dict[str, Any]:
        c = await open_daemon(d.address)
        try:
            return (await c.request(MsgType.STATUS, {}, timeout=10)).meta
        finally:
            c.close()

    async def stop(self) -> None:
        for c in self._conns:
            c.close()
        for p in self.proxies:
            await asyncio.to_thread(p.stop)
        for d in [*self.sources, *([self.fetcher] if self.fetcher else [])]:
            await asyncio.to_thread(d.stop)


@pytest.fixture
async def cluster(tmp_path: Path, models: Path) -> AsyncIterator[Any]:
    made: list[Cluster] = []

    async def start(n: int, started: int | None = None, **proxy_kwargs: Any) -> Cluster:
        c = Cluster(tmp_path, models)
        made.append(c)
        return await c.start(n, started, **proxy_kwargs)

    yield start
    for c in made:
        await c.stop()


async def pull(conn: Any, progress: list[dict[str, Any]], **meta: Any) -> dict[str, Any]:
    """WEIGHTS_PULL on a ctl connection: partials appended to `progress`, the final's meta."""
    async for frame in conn.stream(MsgType.WEIGHTS_PULL, {"model": MODEL, **meta}, idle_timeout=60):
        if not frame.is_partial:
            return frame.meta
        progress.append(frame.meta)
    raise AssertionError("WEIGHTS_PULL ended without a final answer")


def served(snap: dict[str, Any]) -> int:
    """A node's served piece bytes (protocol.md 7: the snapshot's `served_bytes`)."""
    value = snap.get("served_bytes", (snap.get("node") or {}).get("served_bytes"))
    assert isinstance(value, int), sorted(snap)
    return value


def digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.iterdir()) if f.is_file() and not f.name.startswith(".")}


def check_copy(path: str, models: Path) -> None:
    """The fetched folder holds the source's files byte for byte (a whole-model fetch), and
    the engine loads it and generates the source's greedy ids."""
    from p2pllm.engine.generate import generate_ids
    from p2pllm.engine.loader import load_slice

    got = Path(path)
    assert got.resolve() != (models / MODEL).resolve()
    assert digests(got) == digests(models / MODEL)
    prompt = [1, 20, 30, 40]
    ref = generate_ids(load_slice(models / MODEL), prompt, max_tokens=8).token_ids
    assert generate_ids(load_slice(got), prompt, max_tokens=8).token_ids == ref


def names_in(dropped: list[str], name: str) -> list[str]:
    return [d for d in dropped if name in d]


async def test_killed_source_mid_fetch_resumes_from_the_other(cluster: Any, models: Path) -> None:
    c: Cluster = await cluster(2, rate=RATE)
    first, second = c.sources
    progress: list[dict[str, Any]] = []
    task = asyncio.create_task(pull(await c.conn(c.fetcher), progress))
    kept = await kill_after_first_answer(c, 0, task)
    result = await asyncio.wait_for(task, 120)
    total = progress[-1]["total_bytes"] if progress else result["bytes"]
    assert result["bytes"] == total > kept > 0, (result, kept)
    assert names_in(result["dropped"], first.name), result
    assert second.name in result["sources"], result
    # The second source served the rest, not the whole: what the first delivered was kept.
    by_second = served(await c.status(second))
    assert 0 < by_second <= total - kept, (by_second, total, kept)
    assert any(0 < p["done_bytes"] < total for p in progress), progress
    await asyncio.to_thread(check_copy, result["path"], models)


async def kill_after_first_answer(c: Cluster, i: int, task: asyncio.Task[Any]) -> int:
    """Kill source ``i`` once its proxy has handed the fetcher one whole WEIGHTS_READ answer
    (the proxy then holds the link, so exactly that answer got through); the payload bytes
    it delivered."""
    pt = c.proxies[i]
    p = pt.proxy
    p.pause_when = lambda p: p.frames_of(WEIGHTS_READ) >= 1
    await wait_for(lambda: p.paused or task.done(), timeout=60,
                   what=f"source {i}'s first WEIGHTS_READ answer delivered")
    assert not task.done(), "the fetch ended before the source could be killed"
    c.sources[i].kill()
    kept = p.payload_of(WEIGHTS_READ)
    pt.call(p.drop)  # the link breaks with it: what the proxy still held is lost, as on a wire
    pt.call(p.resume)  # (the fetcher's redials reach the proxy, which cannot reach the source)
    return kept


async def test_failed_fetch_resumes_later_from_a_new_source(cluster: Any, models: Path) -> None:
    """The only source dies mid-fetch: the pull fails naming it and what is missing; a source
    that comes up later serves exactly the missing bytes, nothing the first delivered."""
    c: Cluster = await cluster(2, started=1, rate=RATE)
    progress: list[dict[str, Any]] = []
    task = asyncio.create_task(pull(await c.conn(c.fetcher), progress))
    kept = await kill_after_first_answer(c, 0, task)
    with pytest.raises(RemoteError) as err:
        await asyncio.wait_for(task, 60)
    assert err.value.code == ErrorCode.PEER_DOWN, err.value
    assert MODEL in str(err.value) and c.sources[0].name in str(err.value), err.value
    assert "missing" in str(err.value), err.value
    await c.start_source(1)
    await c.sees(1)
    again: list[dict[str, Any]] = []
    result = await asyncio.wait_for(pull(await c.conn(c.fetcher), again), 120)
    whole = sum(f.stat().st_size for f in (models / MODEL).iterdir())  # safetensors: no gaps
    assert result["bytes"] == whole - kept and kept > 0, (result, kept, whole)
    assert served(await c.status(c.sources[1])) == whole - kept
    assert result["sources"] == [c.sources[1].name], result
    assert not again or again[0]["done_bytes"] >= kept, again
    await asyncio.to_thread(check_copy, result["path"], models)


async def test_corrupting_source_is_dropped_and_another_used(cluster: Any, models: Path) -> None:
    c: Cluster = await cluster(2)
    bad, good = c.sources
    # every WEIGHTS_READ answer from the first source gets one byte flipped
    c.proxies[0].call(c.proxies[0].proxy.corrupt)
    progress: list[dict[str, Any]] = []
    result = await asyncio.wait_for(pull(await c.conn(c.fetcher), progress), 120)
    assert c.proxies[0].proxy.flips, "the corrupting source was never asked for pieces"
    why = names_in(result["dropped"], bad.name)
    assert why and "corrupt" in why[0].lower(), result
    assert result["sources"] == [good.name] or good.name in result["sources"], result
    assert served(await c.status(good)) > 0
    await asyncio.to_thread(check_copy, result["path"], models)
    # The journal kept no corrupt piece: a second pull finds nothing missing.
    again = await asyncio.wait_for(pull(await c.conn(c.fetcher), []), 60)
    assert again["bytes"] == 0 and again["path"] == result["path"], again


async def test_no_source_left_fails_naming_every_source(cluster: Any) -> None:
    c: Cluster = await cluster(2, corrupt=float("inf"))
    with pytest.raises(RemoteError) as err:
        await asyncio.wait_for(pull(await c.conn(c.fetcher), []), 120)
    assert err.value.code == ErrorCode.PEER_DOWN, err.value
    msg = str(err.value)
    assert MODEL in msg, msg
    for d in c.sources:
        assert d.name in msg, msg
    assert "corrupt" in msg.lower(), msg
    assert all(p.proxy.flips for p in c.proxies), [p.proxy.stats() for p in c.proxies]
    # The CLI says so too, and exits non-zero.
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "p2pllm.cli.main", "models", "fetch", MODEL, "--daemon", c.fetcher.address,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=str(REPO))
    out, _ = await asyncio.wait_for(cli.communicate(), 120)
    text = out.decode()
    assert cli.returncode != 0, text
    assert MODEL in text and all(d.name in text for d in c.sources), text
