"""The fetch cache: sparse copies of models' files, filled piece by piece, with a journal.

``<root>/<model>/`` (``org/model`` is stored as ``org+model``: one folder per model, ``+`` is in
no valid name) holds the model's files under their own names, each created at its full size
(``ftruncate``: a hole) and written only at its fetched pieces' offsets, so ``st_blocks``
counts only those bytes and :func:`p2pllm.engine.loader.load_slice` reads the folder like the
source's (each tensor at its own offset). ``<entry>/.p2pllm-fetch.json`` (the journal: version,
manifest digest, manifest, ids of the verified pieces, those of them not yet fsynced) is
replaced atomically (tmp, rename) after the pieces it adds were written: a piece the journal
does not list does not exist, so a crash or kill costs at most the pieces in flight. About
once a second (``sync_interval``) and at the end of a fetch (the daemon's runs after its
answer, in the background) the files, then the journal, are fsynced (tmp fsync, rename, folder
fsync); pieces listed as unsynced are re-hashed when the
entry is reopened and kept only if their bytes are there (a power loss may have lost them).
One fsync per batch instead cost a third of the fetch throughput here.
A journal whose digest differs from the manifest asked for (the model changed at the source),
or that cannot be read, wipes the entry.

The cache is not a model root: a partial entry must never be loaded as the whole model; the
daemon hands out an entry's path only after checking it holds the pieces a role needs.
Blocking file I/O: call :meth:`CacheEntry.write` / :meth:`CacheEntry.record` in a thread.
Size: over 400 lines because the entry and the cache share the journal's format and checks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from p2pllm.weights.manifest import Manifest, Piece, check_file_name, check_model_name
from p2pllm.wire.frame import ProtocolError

__all__ = ["JOURNAL", "CacheEntry", "CacheFull", "CorruptPiece", "FetchCache", "StoreError",
           "entry_dirname"]

log = logging.getLogger(__name__)

JOURNAL = ".p2pllm-fetch.json"
_VERSION = 1
_MAX_JOURNAL = 64 << 20


class StoreError(Exception):
    """The cache cannot hold or write what was asked."""


class CorruptPiece(StoreError):
    """Bytes offered for a piece do not match its length and sha256 in the manifest."""

    def __init__(self, piece: Piece, why: str) -> None:
        super().__init__(f"piece {piece.id} ({piece.tensor or 'no tensor'}, {piece.length} "
                         f"bytes at offset {piece.offset}) {why}")
        self.piece = piece


class CacheFull(StoreError):
    """The cache's byte cap leaves no room, even with every other entry evicted."""


def entry_dirname(model: str) -> str:
    """The folder name of a model's entry: the name with ``/`` as ``+``."""
    return check_model_name(model).replace("/", "+")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CacheEntry:
    """One model's sparse copy (see the module doc); made by :meth:`FetchCache.entry`."""

    def __init__(self, cache: FetchCache, path: Path, manifest: Manifest, have: set[int],
                 sync_interval: float = 1.0) -> None:
        self.cache, self.path, self.manifest = cache, path, manifest
        self.sync_interval = sync_interval
        self._have = set(have)
        self._synced = set(have)
        self._last_sync = time.monotonic()
        self._written: set[int] = set()
        self._dirty: set[int] = set()
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()
        self._journal_lock = threading.Lock()
        self._manifest_json = json.dumps(manifest.to_wire(), separators=(",", ":"))
        self.closed = False

    def __repr__(self) -> str:
        return (f"CacheEntry({self.manifest.model!r}, {len(self._have)}/"
                f"{len(self.manifest.pieces)} pieces, {self.path})")

    # -- queries --------------------------------------------------------------------------------

    def have(self) -> set[int]:
        """Ids of the pieces the journal lists (verified and durable)."""
        with self._lock:
            return set(self._have)

    def missing(self, ids: Iterable[int]) -> list[int]:
        """Those of ``ids`` the entry does not hold, in the order given."""
        have = self.have()
        return [i for i in ids if i not in have]

    def complete(self) -> bool:
        """Whether every piece of the manifest is here."""
        return len(self.have()) == len(self.manifest.pieces)

    def have_bytes(self) -> int:
        """Bytes of the pieces held."""
        return self.manifest.nbytes(self.have())

    def disk_bytes(self) -> int:
        """Bytes the entry's files take on disk (``st_blocks * 512``; holes take none)."""
        total = 0
        for f in self.manifest.files:
            try:
                total += os.lstat(self.path / f.name).st_blocks * 512
            except OSError:
                pass
        return total

    # -- writing --------------------------------------------------------------------------------

    def _fd(self, file: int) -> int:
        with self._lock:
            if self.closed:
                raise StoreError(f"{self.path}: the entry was closed (wiped or evicted)")
            fd = self._fds.get(file)
            if fd is None:
                fd = os.open(self.path / self.manifest.files[file].name,
                             os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
                self._fds[file] = fd
            return fd

    def write(self, piece: Piece | int, data: bytes | bytearray | memoryview) -> None:
        """Check ``data`` against the piece (length, sha256: :class:`CorruptPiece`) and write
        it at its offset. Not durable until :meth:`record`. Blocking: call in a thread."""
        p = self.manifest.pieces[piece] if isinstance(piece, int) else piece
        view = memoryview(data).cast("B")
        if len(view) != p.length:
            raise CorruptPiece(p, f"came as {len(view)} bytes")
        if hashlib.sha256(view).hexdigest() != p.sha256:  # releases the GIL
            raise CorruptPiece(p, "does not match its sha256")
        fd = self._fd(p.file)
        done = 0
        while done < p.length:
            n = os.pwrite(fd, view[done:], p.offset + done)
            if n <= 0:
                raise StoreError(f"{self.path}: short write of piece {p.id}")
            done += n
        with self._lock:
            self._written.add(p.id)
            self._dirty.add(p.file)

    def record(self, ids: Iterable[int]) -> None:
        """List pieces written by :meth:`write` in the journal (replaced atomically). At most
        every ``sync_interval`` seconds (and in :meth:`sync`) their files and the journal are
        fsynced first; pieces recorded since the last fsync are listed as unsynced, and
        re-verified when the entry is reopened (after a power loss their bytes may be gone;
        after a crash or kill the page cache still has them). Blocking: call in a thread."""
        ids = set(ids)
        with self._journal_lock:
            with self._lock:
                unknown = ids - self._written - self._have
                if unknown:
                    raise ValueError(f"pieces {sorted(unknown)[:8]} were not written here")
                have = self._have | ids
            now = time.monotonic()
            durable = now - self._last_sync >= self.sync_interval
            if durable:
                self._sync_files()
                self._last_sync = now
                self._synced = set(have)
            self._write_journal(have, have - self._synced, fsync=durable)
            with self._lock:
                self._have |= ids
                self._written -= ids

    def sync(self) -> None:
        """Make every recorded piece durable (fsync of the files, then of the journal). A no-op
        once the entry is closed (wiped or evicted: its folder may hold another entry now)."""
        with self._journal_lock:
            if self.closed:
                return
            have = self.have()
            self._sync_files()
            self._last_sync = time.monotonic()
            self._synced = have
            self._write_journal(have, set(), fsync=True)

    def _sync_files(self) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            fds = [self._fds[f] for f in dirty if f in self._fds]
        for fd in fds:
            os.fsync(fd)

    def _write_journal(self, have: set[int], unsynced: set[int], fsync: bool = True) -> None:
        text = (f'{{"version":{_VERSION},"digest":"{self.manifest.digest}",'
                f'"have":{json.dumps(sorted(have))},"unsynced":{json.dumps(sorted(unsynced))},'
                f'"manifest":{self._manifest_json}}}')
        tmp = self.path / (JOURNAL + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, self.path / JOURNAL)
        if fsync:
            _fsync_dir(self.path)

    def _verify(self, ids: Iterable[int]) -> set[int]:
        """Those of ``ids`` whose bytes on disk match the manifest."""
        good = set()
        for i in ids:
            p = self.manifest.pieces[i]
            try:
                fd = os.open(self.path / self.manifest.files[p.file].name, os.O_RDONLY)
                try:
                    data = os.pread(fd, p.length, p.offset)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                continue
            if hashlib.sha256(data).hexdigest() == p.sha256:
                good.add(i)
        return good

    def reserve(self, nbytes: int) -> None:
        """Make room in the cache for ``nbytes`` more of this entry (:class:`CacheFull`)."""
        self.cache.make_room(nbytes, keep=self.manifest.model)

    def close(self) -> None:
        """Close the entry's files (a later write raises); waits for a :meth:`sync` or
        :meth:`record` in progress (one may run in the background after a fetch)."""
        with self._journal_lock, self._lock:
            self.closed = True
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)


class FetchCache:
    """The entries under ``root``; ``max_bytes`` caps their bytes on disk (None: no cap),
    enforced by :meth:`make_room` (least recently used entries evicted first)."""

    def __init__(self, root: str | Path, max_bytes: int | None = None,
                 sync_interval: float = 1.0) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.sync_interval = sync_interval  # seconds between fsyncs of an entry being filled
        self._open: dict[str, CacheEntry] = {}
        self._lock = threading.Lock()

    def _dir(self, model: str) -> Path:
        path = self.root / entry_dirname(model)
        if path.is_symlink():
            raise StoreError(f"{path} is a symlink; the fetch cache holds only its own folders")
        return path

    def _live(self, model: str) -> CacheEntry | None:
        """The open entry of ``model`` if its folder is still what it recorded: its journal
        and its files at their sizes (an operator may delete a cache folder while the daemon
        runs; an entry trusted from memory would then hand out an empty folder). Under
        ``_lock``."""
        current = self._open.get(model)
        if current is None or current.closed:
            return None
        try:
            ok = (current.path / JOURNAL).is_file() and all(
                os.lstat(current.path / f.name).st_size == f.size
                for f in current.manifest.files)
        except OSError:
            ok = False
        if not ok:
            log.info("fetch cache: %s changed on disk; reopening it", current.path)
            current.close()
            del self._open[model]
            return None
        return current

    def entry(self, manifest: Manifest) -> CacheEntry:
        """The entry of ``manifest``'s model, created (files at full size, all holes) or
        reopened; a journal of another digest (or unreadable) wipes it first. Blocking."""
        for f in manifest.files:
            check_file_name(f.name)
        path = self._dir(manifest.model)
        with self._lock:
            current = self._live(manifest.model)
            if current is not None:
                if current.manifest.digest == manifest.digest:
                    return current
                current.close()
            loaded = self._load(path, manifest)
            if loaded is None:
                if path.exists():
                    log.info("fetch cache: wiping %s (no journal of manifest %s)", path,
                             manifest.digest[:12])
                    shutil.rmtree(path)
                self.root.mkdir(parents=True, exist_ok=True)
                path.mkdir()
                loaded = set(), set()
            have, unsynced = loaded
            e = CacheEntry(self, path, manifest, have - unsynced, self.sync_interval)
            if unsynced:  # recorded but never fsynced: kept only if their bytes are there
                e._have |= e._verify(unsynced)
                e._synced = set(e._have)
                log.info("fetch cache: %s: %d of %d unsynced pieces verified", path,
                         len(e._have) - len(have - unsynced), len(unsynced))
            if unsynced:
                e._write_journal(e._have, set())
            elif not (path / JOURNAL).is_file():  # an empty journal: lost, the entry restarts
                e._write_journal(e._have, set(), fsync=False)
            for f in manifest.files:  # holes of the full size; kept files are already it
                target = path / f.name
                target.parent.mkdir(exist_ok=True)
                fd = os.open(target, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0),
                             0o644)
                try:
                    if os.fstat(fd).st_size != f.size:
                        os.ftruncate(fd, f.size)
                finally:
                    os.close(fd)
            self._open[manifest.model] = e
            os.utime(path / JOURNAL)  # recently used
            return e

    def _load(self, path: Path, want: Manifest | None) -> tuple[set[int], set[int]] | None:
        """The pieces the journal at ``path`` lists and those of them it says were not
        fsynced, if it is readable and (when ``want`` is given) of ``want``'s digest, with its
        files at their sizes; else None."""
        j = path / JOURNAL
        try:
            if j.stat().st_size > _MAX_JOURNAL:
                return None
            d = json.loads(j.read_text(encoding="utf-8"))
            if not isinstance(d, dict) or d.get("version") != _VERSION:
                return None
            m = Manifest.from_wire(d.get("manifest"))
            if d.get("digest") != m.digest or (want is not None and m.digest != want.digest):
                return None
            have: list[int] = d.get("have")  # type: ignore[assignment]  # checked just below
            unsynced: list[int] = d.get("unsynced")  # type: ignore[assignment]
            if not all(isinstance(x, list) and all(type(i) is int and 0 <= i < len(m.pieces)
                                                   for i in x) for x in (have, unsynced)):
                return None
        except (OSError, ValueError, ProtocolError):
            return None
        for i in have:
            f = m.files[m.pieces[i].file]
            try:
                if os.lstat(path / f.name).st_size != f.size:
                    return None
            except OSError:
                return None
        return set(have), set(unsynced) & set(have)

    def find(self, model: str) -> CacheEntry | None:
        """The entry of ``model`` when its journal is readable (whatever it holds); None
        otherwise. Blocking."""
        path = self._dir(model)
        with self._lock:
            current = self._live(model)
            if current is not None:
                return current
        try:
            d = json.loads((path / JOURNAL).read_text(encoding="utf-8"))
            m = Manifest.from_wire(d["manifest"])
        except (OSError, ValueError, KeyError, TypeError, ProtocolError):
            return None
        if m.model != model or self._load(path, m) is None:
            return None
        return self.entry(m)

    def names(self) -> list[str]:
        """Models with a readable journal here."""
        out = []
        if self.root.is_dir():
            for d in sorted(self.root.iterdir()):
                if (d / JOURNAL).is_file() and not d.is_symlink():
                    out.append(d.name.replace("+", "/"))
        return out

    def remove(self, model: str) -> bool:
        """Delete ``model``'s entry; whether there was one."""
        path = self._dir(model)
        with self._lock:
            e = self._open.pop(model, None)
            if e is not None:
                e.close()
        if not path.exists():
            return False
        shutil.rmtree(path)
        return True

    def disk_bytes(self) -> int:
        """Bytes on disk of every entry."""
        total = 0
        if self.root.is_dir():
            for dirpath, _, files in os.walk(self.root):
                for f in files:
                    try:
                        total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
                    except OSError:
                        pass
        return total

    def make_room(self, nbytes: int, keep: str | None = None) -> None:
        """Evict least recently used entries (never ``keep``) until ``nbytes`` more fit under
        ``max_bytes``; :class:`CacheFull` when they cannot."""
        if self.max_bytes is None:
            return
        used = self.disk_bytes()
        if used + nbytes <= self.max_bytes:
            return
        by_age = []
        for name in self.names():
            if name == keep:
                continue
            try:
                by_age.append(((self.root / entry_dirname(name) / JOURNAL).stat().st_mtime, name))
            except (OSError, ProtocolError):
                continue
        for _, name in sorted(by_age):
            log.info("fetch cache: evicting %s to make room for %d bytes", name, nbytes)
            self.remove(name)
            used = self.disk_bytes()
            if used + nbytes <= self.max_bytes:
                return
        raise CacheFull(f"the fetch cache {self.root} holds {used} bytes; {nbytes} more exceed "
                        f"its cap of {self.max_bytes} bytes even with the other entries evicted")

    def close(self) -> None:
        with self._lock:
            entries, self._open = list(self._open.values()), {}
        for e in entries:
            e.close()
