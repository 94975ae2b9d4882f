"""Fetch a model's pieces from peers into a cache entry: a window of reads in flight, batches
verified and written in a thread, sources that fail or send corrupt bytes dropped.

A :class:`Source` is a peer that holds the model whole (the daemon's ``PeerSource`` asks it over
the wire; tests use in-process ones). :func:`agree_manifest` keeps the sources that describe the
model alike; :func:`fetch_pieces` then moves the missing pieces:

1. the missing ids are cut into batches of at most ``batch_bytes`` (pieces in file order);
2. while batches wait and fewer than ``window`` reads are in flight (all sources together: a
   credit window; TCP paces the rest), the live source with the fewest reads in flight gets the
   next batch;
3. each answer is checked and written in a thread (sha256 per piece, ``pwrite``, journal:
   :meth:`~p2pllm.weights.store.CacheEntry.record`, fsynced about once a second and at the
   end, or by the caller with ``sync=False``), while the next reads are in flight;
4. a source whose read raises (connection closed, timeout, ProtocolError) or that answers a
   piece not matching the manifest is dropped for this fetch, and its outstanding batches go
   back to the queue for the others; the good pieces of a partly corrupt answer are kept.

No live source with batches still waiting ⇒ :class:`FetchError` naming the model, what is
missing and every source with why it was dropped. A piece already recorded is never read again,
so a fetch resumes where a crash, a kill or a failed fetch left the entry. Torch-free.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

from p2pllm.weights.manifest import Manifest
from p2pllm.weights.store import CacheEntry, CorruptPiece

__all__ = ["Agreement", "FetchError", "FetchResult", "Progress", "Source", "agree_manifest",
           "fetch_pieces"]

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview


@runtime_checkable
class Source(Protocol):
    """A peer that serves a model's manifest and pieces."""

    name: str

    async def manifest(self) -> Manifest:
        """The model's manifest as the peer sees it."""
        ...

    async def read(self, manifest: Manifest, ids: Sequence[int]) -> Sequence[Buffer]:
        """The bytes of pieces ``ids`` of ``manifest`` (one buffer each, in order)."""
        ...


class FetchError(Exception):
    """A fetch that cannot complete: no source left (or none given)."""

    def __init__(self, message: str, *, model: str, missing_pieces: int = 0,
                 missing_bytes: int = 0, dropped: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.model = model
        self.missing_pieces, self.missing_bytes = missing_pieces, missing_bytes
        self.dropped = dict(dropped or {})


@dataclass(frozen=True)
class Progress:
    """Where a fetch stands: bytes and pieces of those asked for that are here (held before
    the fetch included), the live sources, the dropped ones with why, who sent the last
    batch."""

    model: str
    done_bytes: int
    total_bytes: int
    pieces_done: int
    pieces_total: int
    sources: tuple[str, ...]
    dropped: tuple[tuple[str, str], ...]
    source: str | None = None


@dataclass(frozen=True)
class FetchResult:
    """What a fetch moved: bytes and pieces fetched (verified and recorded), per source."""

    model: str
    fetched_bytes: int
    pieces: int
    seconds: float
    by_source: dict[str, int] = field(default_factory=dict)  # name -> bytes fetched from it
    dropped: dict[str, str] = field(default_factory=dict)  # name -> why

    @property
    def sources(self) -> list[str]:
        return [n for n, b in self.by_source.items() if b]


class Agreement(NamedTuple):
    manifest: Manifest
    sources: list[Source]
    dropped: dict[str, str]


def _why(exc: BaseException, timeout: float | None = None) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout} s" if timeout is not None else "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _describe(dropped: Mapping[str, str]) -> str:
    return "; ".join(f"{n} ({why})" for n, why in dropped.items()) or "none given"


async def agree_manifest(sources: Sequence[Source], *, model: str | None = None,
                         timeout: float | None = None) -> Agreement:
    """Ask every source for its manifest (concurrently). The first source in the given order
    that answers (for ``model``, when given) sets the manifest; sources that fail, answer for
    another model or with another digest are dropped. :class:`FetchError` when none answers."""

    async def ask(s: Source) -> Manifest:
        return await asyncio.wait_for(s.manifest(), timeout)

    answers = await asyncio.gather(*(ask(s) for s in sources), return_exceptions=True)
    chosen: Manifest | None = None
    chosen_by = ""
    kept: list[Source] = []
    dropped: dict[str, str] = {}
    for s, a in zip(sources, answers, strict=True):
        if isinstance(a, BaseException):
            if not isinstance(a, Exception):  # CancelledError, KeyboardInterrupt
                raise a
            dropped[s.name] = _why(a, timeout)
        elif not isinstance(a, Manifest):
            dropped[s.name] = f"answered {type(a).__name__}, not a manifest"
        elif model is not None and a.model != model:
            dropped[s.name] = f"sent the manifest of {a.model!r}, not {model!r}"
        elif chosen is None:
            chosen, chosen_by = a, s.name
            kept.append(s)
        elif a.digest != chosen.digest:
            dropped[s.name] = (f"its manifest (digest {a.digest[:12]}) differs from "
                               f"{chosen_by}'s ({chosen.digest[:12]})")
        else:
            kept.append(s)
    for name, why in dropped.items():
        log.warning("weights: source %s dropped: %s", name, why)
    if chosen is None:
        what = model or "the model"
        raise FetchError(f"no source could describe {what}: {_describe(dropped)}",
                         model=model or "", dropped=dropped)
    return Agreement(chosen, kept, dropped)


def _retrieve(t: asyncio.Future[object]) -> None:
    """Mark a discarded task's outcome as seen (no 'exception was never retrieved')."""
    if not t.cancelled():
        t.exception()


def _batches(manifest: Manifest, ids: Sequence[int], batch_bytes: int) -> deque[list[int]]:
    out: deque[list[int]] = deque()
    cur: list[int] = []
    size = 0
    for i in ids:
        n = manifest.pieces[i].length
        if cur and size + n > batch_bytes:
            out.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    if cur:
        out.append(cur)
    return out


def _write_batch(entry: CacheEntry, ids: Sequence[int], data: Sequence[Buffer],
                 ) -> tuple[list[int], list[int], CorruptPiece | None]:
    """Verify and write one answer (in a thread): (written and recorded ids, corrupt ids, the
    first corruption)."""
    good: list[int] = []
    bad: list[int] = []
    first: CorruptPiece | None = None
    for i, d in zip(ids, data, strict=True):
        try:
            entry.write(i, d)
        except CorruptPiece as e:
            bad.append(i)
            first = first or e
        else:
            good.append(i)
    if good:
        entry.record(good)
    return good, bad, first


async def fetch_pieces(entry: CacheEntry, manifest: Manifest, ids: Sequence[int],
                       sources: Sequence[Source], *, window: int = 4,
                       batch_bytes: int = 8 << 20,
                       on_progress: Callable[[Progress], None] | None = None,
                       read_timeout: float | None = None,
                       dropped: Mapping[str, str] | None = None,
                       sync: bool = True) -> FetchResult:
    """Fetch the pieces ``ids`` of ``manifest`` that ``entry`` lacks from ``sources`` (see
    the module doc). ``dropped``: sources already dropped (by :func:`agree_manifest`), named in
    a :class:`FetchError`. ``read_timeout``: seconds one read may take before its source is
    dropped (None: the source's own timeouts). ``sync=False``: a fetch that completes leaves
    its last pieces recorded as unsynced (re-verified if the entry reopens before a sync) and
    the caller runs :meth:`~p2pllm.weights.store.CacheEntry.sync`, e.g. in the background
    once the result is handed on (a failing fetch syncs what it recorded either way)."""
    if entry.manifest.digest != manifest.digest:
        raise ValueError(f"the entry {entry.path} holds manifest {entry.manifest.digest[:12]}, "
                         f"not {manifest.digest[:12]}")
    if window < 1 or batch_bytes < 1:
        raise ValueError(f"window {window} and batch_bytes {batch_bytes} must be >= 1")
    t0 = time.monotonic()
    wanted = list(dict.fromkeys(ids))
    missing = entry.missing(wanted)
    total_bytes, total_pieces = manifest.nbytes(wanted), len(wanted)
    done_bytes = total_bytes - manifest.nbytes(missing)
    done_pieces = total_pieces - len(missing)
    gone: dict[str, str] = dict(dropped or {})
    live: list[Source] = list(sources)
    by_source: dict[str, int] = {s.name: 0 for s in live}
    fetched_bytes = fetched_pieces = 0

    def progress(last: str | None = None) -> None:
        if on_progress is not None:
            on_progress(Progress(manifest.model, done_bytes, total_bytes, done_pieces,
                                 total_pieces, tuple(s.name for s in live),
                                 tuple(gone.items()), last))

    if missing:
        entry.reserve(manifest.nbytes(missing))
    queue = _batches(manifest, missing, batch_bytes)
    reads: dict[asyncio.Future[Any], tuple[Source, list[int]]] = {}  # -> Sequence[Buffer]
    writes: dict[asyncio.Future[Any], Source] = {}  # -> _write_batch's result
    load: dict[str, int] = {s.name: 0 for s in live}

    def drop(s: Source, why: str) -> None:
        if s not in live:
            return
        live.remove(s)
        gone[s.name] = why
        log.warning("weights: source %s dropped while fetching %s: %s", s.name,
                    manifest.model, why)
        for t, (src, batch) in list(reads.items()):  # its outstanding batches: back in line
            if src is s:
                t.cancel()
                t.add_done_callback(_retrieve)
                del reads[t]
                queue.appendleft(batch)

    async def read(s: Source, batch: list[int]) -> Sequence[Buffer]:
        return await asyncio.wait_for(s.read(manifest, batch), read_timeout)

    progress()
    failed = True
    try:
        while True:
            # 1. keep the window full (and no more answers waiting for the disk than reads)
            while queue and live and len(reads) < window and len(writes) < window:
                s = min(live, key=lambda x: load[x.name])
                batch = queue.popleft()
                load[s.name] += 1
                reads[asyncio.ensure_future(read(s, batch))] = (s, batch)
            if not reads and not writes:
                break
            done, _ = await asyncio.wait([*reads, *writes], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t in writes:  # 3. an answer written: its good pieces are recorded
                    s = writes.pop(t)
                    good, bad, corrupt = t.result()  # an OSError is raised here
                    n = manifest.nbytes(good)
                    done_bytes += n
                    fetched_bytes += n
                    by_source[s.name] += n
                    done_pieces += len(good)
                    fetched_pieces += len(good)
                    if corrupt is not None:
                        drop(s, f"corrupt: {corrupt}")
                        queue.appendleft(bad)
                    progress(s.name)
                    continue
                if t not in reads:  # a read of a source dropped meanwhile: already re-queued
                    continue
                s, batch = reads.pop(t)
                load[s.name] -= 1
                if t.cancelled():
                    queue.appendleft(batch)
                    continue
                exc = t.exception()
                if exc is not None:
                    queue.appendleft(batch)
                    drop(s, _why(exc, read_timeout))
                    continue
                data = t.result()
                if not isinstance(data, Sequence) or len(data) != len(batch):
                    queue.appendleft(batch)
                    drop(s, f"answered {len(data) if isinstance(data, Sequence) else data!r} "
                            f"pieces for the {len(batch)} asked")
                    continue
                writes[asyncio.ensure_future(
                    asyncio.to_thread(_write_batch, entry, batch, data))] = s
        failed = False
    finally:
        for t in reads:
            t.cancel()
        if reads:
            await asyncio.gather(*reads, return_exceptions=True)
        if writes:  # let the threads finish: the journal stays whole
            await asyncio.wait(writes)
            for t in writes:
                _retrieve(t)
        if fetched_pieces:  # what was recorded, durable (fsync of files and journal)
            if not failed:
                if sync:
                    await asyncio.to_thread(entry.sync)
            else:  # failing already: keep that error
                try:
                    await asyncio.to_thread(entry.sync)
                except Exception as exc:
                    log.warning("weights: cannot sync %s: %s", entry.path, _why(exc))
    if queue:
        left = sorted(i for b in queue for i in b)
        nbytes = manifest.nbytes(left)
        raise FetchError(
            f"cannot fetch {manifest.model}: {len(left)} of {total_pieces} pieces "
            f"({nbytes} of {total_bytes} bytes) still missing and no source left; sources: "
            f"{_describe(gone)}", model=manifest.model, missing_pieces=len(left),
            missing_bytes=nbytes, dropped=gone)
    return FetchResult(manifest.model, fetched_bytes, fetched_pieces, time.monotonic() - t0,
                       by_source, gone)
