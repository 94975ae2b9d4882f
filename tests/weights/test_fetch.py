"""fetch_pieces and agree_manifest with in-process sources over the bundled model's real files
(each read is a pread in a thread, answered as memoryviews of one payload, as the wire does):
failover, corrupt bytes, no source left, the window, resume after a crash, a changed model."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest

from p2pllm.weights.fetch import FetchError, Progress, Source, agree_manifest, fetch_pieces
from p2pllm.weights.manifest import Manifest, build_manifest
from p2pllm.weights.slices import Need, pieces_for
from p2pllm.weights.store import JOURNAL, FetchCache
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode
from tests.conftest import BUNDLED

SMALL = 256 << 10  # small batches: many reads per fetch


class FileSource:
    """A source serving a local model folder. ``fail_after``: calls after the first that many
    raise ``error``; ``corrupt``: piece ids answered with one bit flipped; ``hang``: never
    answer; ``counts``: pieces delivered (answered successfully), shared between sources."""

    def __init__(self, name: str, root: Path, *, fail_after: int | None = None,
                 error: Exception | None = None, corrupt: Sequence[int] = (),
                 hang: bool = False, counts: Counter[int] | None = None,
                 manifest_name: str = "shakespeare") -> None:
        self.name, self.root = name, root
        self.fail_after, self.error = fail_after, error or ConnectionResetError("peer closed")
        self.corrupt, self.hang = set(corrupt), hang
        self.counts = counts if counts is not None else Counter()
        self.calls = 0
        self.delivered: list[int] = []
        self.in_flight = self.max_in_flight = 0
        self.manifest_name = manifest_name

    async def manifest(self) -> Manifest:
        return await asyncio.to_thread(build_manifest, self.root, self.manifest_name)

    async def read(self, manifest: Manifest, ids: Sequence[int]) -> list[memoryview]:
        self.calls += 1
        call = self.calls
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hang:
                await asyncio.Event().wait()
            payload = bytearray(await asyncio.to_thread(self._read, manifest, ids))
            await asyncio.sleep(0.002)  # the answer is on the wire a while: reads overlap
            if self.fail_after is not None and call > self.fail_after:
                raise self.error
            out, at = [], 0
            view = memoryview(payload)
            for i in ids:
                n = manifest.pieces[i].length
                if i in self.corrupt:
                    payload[at + n // 2] ^= 0x10
                out.append(view[at:at + n])
                at += n
            self.delivered.extend(ids)
            self.counts.update(ids)
            return out
        finally:
            self.in_flight -= 1

    def _read(self, manifest: Manifest, ids: Sequence[int]) -> bytes:
        parts = []
        for i in ids:
            p = manifest.pieces[i]
            fd = os.open(self.root / manifest.files[p.file].name, os.O_RDONLY)
            try:
                parts.append(os.pread(fd, p.length, p.offset))
            finally:
                os.close(fd)
        return b"".join(parts)


@pytest.fixture
def manifest() -> Manifest:
    return build_manifest(BUNDLED, "shakespeare")


def same_as_source(entry_path: Path, m: Manifest, ids: Sequence[int], root: Path = BUNDLED) -> bool:
    for i in ids:
        p = m.pieces[i]
        name = m.files[p.file].name
        with open(entry_path / name, "rb") as a, open(root / name, "rb") as b:
            a.seek(p.offset)
            b.seek(p.offset)
            if a.read(p.length) != b.read(p.length):
                return False
    return True


async def test_a_whole_fetch_from_one_source(tmp_path: Path, manifest: Manifest) -> None:
    e = FetchCache(tmp_path / "c").entry(manifest)
    seen: list[Progress] = []
    src = FileSource("a", BUNDLED)
    ids = list(range(len(manifest.pieces)))
    r = await fetch_pieces(e, manifest, ids, [src], batch_bytes=SMALL, on_progress=seen.append)
    assert e.complete() and r.fetched_bytes == manifest.total_bytes == seen[-1].done_bytes
    assert r.pieces == len(ids) and r.sources == ["a"] and r.dropped == {}
    assert seen[0].done_bytes == 0 and [p.done_bytes for p in seen] == \
        sorted(p.done_bytes for p in seen) and seen[-1].pieces_done == len(ids)
    for f in manifest.files:
        assert (e.path / f.name).read_bytes() == (BUNDLED / f.name).read_bytes()
    assert json.loads((e.path / JOURNAL).read_text())["unsynced"] == []  # synced at the end
    # a second fetch of the same pieces reads nothing
    calls = src.calls
    again = await fetch_pieces(e, manifest, ids, [src])
    assert again.fetched_bytes == 0 and src.calls == calls and sorted(src.delivered) == ids


async def test_failover_requeues_outstanding_pieces_and_keeps_recorded_ones(
        tmp_path: Path, manifest: Manifest) -> None:
    counts: Counter[int] = Counter()
    a = FileSource("a", BUNDLED, fail_after=2, counts=counts)
    b = FileSource("b", BUNDLED, counts=counts)
    e = FetchCache(tmp_path / "c").entry(manifest)
    ids = list(range(len(manifest.pieces)))
    r = await fetch_pieces(e, manifest, ids, [a, b], window=4, batch_bytes=SMALL)
    assert e.complete() and same_as_source(e.path, manifest, ids)
    assert a.calls > 2 and a.delivered  # a failed mid-fetch, after delivering two batches
    assert set(counts) == set(ids) and set(counts.values()) == {1}  # nothing read twice
    assert set(a.delivered).isdisjoint(b.delivered)
    assert r.by_source["a"] == manifest.nbytes(a.delivered) > 0
    assert r.by_source["b"] == manifest.nbytes(b.delivered) > 0
    assert "ConnectionResetError: peer closed" in r.dropped["a"] and "b" not in r.dropped


async def test_a_source_sending_corrupt_bytes_is_dropped(tmp_path: Path,
                                                         manifest: Manifest) -> None:
    bad_piece = pieces_for(manifest, Need((1, 2), False, False))[3]
    counts: Counter[int] = Counter()
    a = FileSource("a", BUNDLED, corrupt=[bad_piece], counts=counts)
    b = FileSource("b", BUNDLED, counts=counts)
    e = FetchCache(tmp_path / "c").entry(manifest)
    ids = list(range(len(manifest.pieces)))
    r = await fetch_pieces(e, manifest, ids, [a, b], window=1, batch_bytes=2 << 20)
    assert e.complete() and same_as_source(e.path, manifest, ids)
    assert r.dropped["a"].startswith("corrupt: ") and "sha256" in r.dropped["a"]
    assert str(bad_piece) in r.dropped["a"]
    assert bad_piece in a.delivered and bad_piece in b.delivered
    # the good pieces of a's corrupt answer were kept: b read only what a did not deliver
    # well, and a's last answer held more than the bad piece
    assert set(b.delivered) == set(ids) - set(a.delivered) | {bad_piece}
    assert counts[bad_piece] == 2 and len(a.delivered) > 1


async def test_no_source_left_names_every_source(tmp_path: Path, manifest: Manifest) -> None:
    a = FileSource("node-a", BUNDLED, fail_after=1,
                   error=ProtocolError(ErrorCode.PEER_DOWN, "connection lost"))
    b = FileSource("node-b", BUNDLED, corrupt=range(len(manifest.pieces)))
    e = FetchCache(tmp_path / "c").entry(manifest)
    need = pieces_for(manifest, Need((0, 2), True, False))
    with pytest.raises(FetchError) as err:
        await fetch_pieces(e, manifest, need, [a, b], window=2, batch_bytes=SMALL,
                           dropped={"node-c": "its manifest differs"})
    msg = str(err.value)
    assert "cannot fetch shakespeare" in msg and "still missing" in msg
    assert "node-a (ProtocolError: PEER_DOWN: connection lost)" in msg
    assert "node-b (corrupt: piece" in msg and "node-c (its manifest differs)" in msg
    assert err.value.missing_pieces == len(e.missing(need)) > 0
    assert err.value.missing_bytes == manifest.nbytes(e.missing(need))
    assert e.have() == set(a.delivered)  # what arrived whole stays
    with pytest.raises(FetchError, match="none given"):
        await fetch_pieces(e, manifest, need, [])


@pytest.mark.parametrize("window", [1, 3])
async def test_the_window_bounds_reads_in_flight(tmp_path: Path, manifest: Manifest,
                                                 window: int) -> None:
    ids = list(range(len(manifest.pieces)))
    a, b = FileSource("a", BUNDLED), FileSource("b", BUNDLED)
    now = [0]
    peak = [0]

    def tracked(real):  # type: ignore[no-untyped-def]
        async def read(m: Manifest, batch: Sequence[int]) -> list[memoryview]:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
            try:
                return await real(m, batch)  # type: ignore[no-any-return]
            finally:
                now[0] -= 1
        return read

    a.read, b.read = tracked(a.read), tracked(b.read)  # type: ignore[method-assign]
    e = FetchCache(tmp_path / "c").entry(manifest)
    r = await fetch_pieces(e, manifest, ids, [a, b], window=window, batch_bytes=64 << 10)
    assert e.complete() and r.dropped == {}
    assert a.calls > 1 and b.calls > 1 if window > 1 else a.calls + b.calls > 10
    assert peak[0] == window  # never more, and the window was used


async def test_resume_fetches_only_the_missing_pieces(tmp_path: Path, manifest: Manifest) -> None:
    ids = list(range(len(manifest.pieces)))
    first = FileSource("a", BUNDLED, fail_after=3)
    e = FetchCache(tmp_path / "c").entry(manifest)
    with pytest.raises(FetchError):
        await fetch_pieces(e, manifest, ids, [first], window=1, batch_bytes=SMALL)
    held = e.have()
    assert held == set(first.delivered) and 0 < len(held) < len(ids)
    e.close()  # the process dies; a new one opens the cache
    again = FetchCache(tmp_path / "c").entry(manifest)
    assert again.have() == held
    second = FileSource("b", BUNDLED)
    r = await fetch_pieces(again, manifest, ids, [second], batch_bytes=SMALL)
    assert sorted(second.delivered) == sorted(set(ids) - held)
    assert r.fetched_bytes == manifest.total_bytes - manifest.nbytes(held)
    assert again.complete() and same_as_source(again.path, manifest, ids)


async def test_a_hanging_source_times_out_and_a_short_answer_is_dropped(
        tmp_path: Path, manifest: Manifest) -> None:
    class Short(FileSource):
        async def read(self, manifest: Manifest, ids: Sequence[int]) -> list[memoryview]:
            return (await super().read(manifest, ids))[:-1]

    hang, short, good = (FileSource("hang", BUNDLED, hang=True), Short("short", BUNDLED),
                         FileSource("good", BUNDLED))
    e = FetchCache(tmp_path / "c").entry(manifest)
    ids = list(range(len(manifest.pieces)))
    r = await fetch_pieces(e, manifest, ids, [hang, short, good], batch_bytes=SMALL,
                           read_timeout=0.5)
    assert e.complete() and set(r.dropped) == {"hang", "short"}
    assert r.dropped["hang"] == "timed out after 0.5 s"
    assert re.fullmatch(r"answered \d+ pieces for the \d+ asked", r.dropped["short"])


async def test_agree_manifest_and_a_changed_model(tmp_path: Path, manifest: Manifest) -> None:
    changed = tmp_path / "changed"
    shutil.copytree(BUNDLED, changed)
    (changed / "config.json").write_text((BUNDLED / "config.json").read_text() + "\n")
    a = FileSource("a", BUNDLED)
    b = FileSource("b", changed)
    c = FileSource("c", BUNDLED, manifest_name="other")

    class Down(FileSource):
        async def manifest(self) -> Manifest:
            raise ConnectionRefusedError("refused")

    agreed = await agree_manifest([a, b, c, Down("d", BUNDLED)], model="shakespeare")
    assert agreed.manifest == manifest and agreed.sources == [a]
    assert "differs from a's" in agreed.dropped["b"]
    assert "not 'shakespeare'" in agreed.dropped["c"]
    assert agreed.dropped["d"] == "ConnectionRefusedError: refused"
    with pytest.raises(FetchError, match="no source could describe shakespeare: d"):
        await agree_manifest([Down("d", BUNDLED)], model="shakespeare")
    # a cached slice of the old model; the model changes at the source: the entry is wiped
    # and the slice fetched again, whole
    cache = FetchCache(tmp_path / "cache")
    need = Need((0, 2), True, False)
    await fetch_pieces(cache.entry(manifest), manifest, pieces_for(manifest, need), [a])
    new = (await agree_manifest([b])).manifest
    e = cache.entry(new)
    assert e.have() == set()
    fresh = FileSource("b2", changed)
    r = await fetch_pieces(e, new, pieces_for(new, need), [fresh])
    assert sorted(fresh.delivered) == pieces_for(new, need)
    assert r.fetched_bytes == new.nbytes(pieces_for(new, need))
    assert same_as_source(e.path, new, pieces_for(new, need), changed)


def test_fake_sources_are_sources() -> None:
    assert isinstance(FileSource("a", BUNDLED), Source)


def test_no_torch_at_import() -> None:
    code = "import sys, p2pllm.weights.fetch; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


async def test_a_cancelled_fetch_leaves_a_consistent_entry(tmp_path: Path,
                                                          manifest: Manifest) -> None:
    ids = list(range(len(manifest.pieces)))
    src = FileSource("a", BUNDLED)
    e = FetchCache(tmp_path / "c").entry(manifest)

    def stop(p: Progress) -> None:
        if p.pieces_done >= 5:
            task.cancel()  # mid-fetch: reads in flight, maybe a write in its thread

    task = asyncio.ensure_future(fetch_pieces(e, manifest, ids, [src], batch_bytes=SMALL,
                                              on_progress=stop))
    with pytest.raises(asyncio.CancelledError):
        await task
    held = e.have()
    assert held and held <= set(src.delivered) and not e.complete()
    e.close()
    again = FetchCache(tmp_path / "c").entry(manifest)
    assert again.have() == held and same_as_source(again.path, manifest, sorted(held))


async def test_a_disk_error_fails_the_fetch_not_the_source(tmp_path: Path, manifest: Manifest,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    e = FetchCache(tmp_path / "c").entry(manifest)

    def full(*_: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match="No space left"):
        await fetch_pieces(e, manifest, list(range(len(manifest.pieces))),
                           [FileSource("a", BUNDLED)], batch_bytes=SMALL)
    assert e.have() == set()


async def test_a_fetch_without_sync_leaves_its_pieces_unsynced_until_the_caller_syncs(
        tmp_path: Path, manifest: Manifest) -> None:
    """sync=False (the daemon syncs in the background once it has answered): the journal lists
    the fetched pieces as unsynced, so a reopen re-verifies them, until entry.sync()."""
    e = FetchCache(tmp_path / "c", sync_interval=3600).entry(manifest)
    ids = list(range(len(manifest.pieces)))
    r = await fetch_pieces(e, manifest, ids, [FileSource("a", BUNDLED)], batch_bytes=SMALL,
                           sync=False)
    assert r.pieces == len(ids) and e.complete()
    journal = json.loads((e.path / JOURNAL).read_text())
    assert journal["have"] == journal["unsynced"] == ids
    p = manifest.pieces[1]  # a power loss before the sync took piece 1's bytes
    with open(e.path / manifest.files[p.file].name, "r+b") as fh:
        fh.seek(p.offset)
        fh.write(bytes(p.length))
    again = FetchCache(tmp_path / "c").entry(manifest)
    assert again.missing(ids) == [1]
    e2 = FetchCache(tmp_path / "d", sync_interval=3600).entry(manifest)
    await fetch_pieces(e2, manifest, ids, [FileSource("a", BUNDLED)], sync=False)
    e2.sync()
    assert json.loads((e2.path / JOURNAL).read_text())["unsynced"] == []
