"""Models travel peer to peer, the daemon's side (protocol.md section 13, issue 16).

- Serving: ``WEIGHTS_MANIFEST`` and ``WEIGHTS_READ`` from peers, for models under this host's
  roots only (names resolved by :class:`~p2pllm.daemon.modelrefs.ModelRoots` like every
  reference: a path or a name escaping the roots is FORBIDDEN, an unknown one NOT_FOUND; the
  models cache is never served). Manifests are built in a thread and kept until a file of the
  model changes size or mtime; pieces are read with ``os.pread`` in a thread, at most
  :data:`READ_CAP` (and the daemon's ``max_payload``) bytes a request.
- Fetching: :meth:`WeightsService.fetch_model` gives a role the folder to load its model from:
  the roots' copy when this host has it, else the models cache
  (``<state_dir>/models-cache``, :class:`p2pllm.weights.store.FetchCache`) once it holds the
  pieces the role needs, fetched from the ``sources`` through :class:`PeerSource` (the byte
  moving, verification and failover are :func:`p2pllm.weights.fetch.fetch_pieces`'s).
- ``WEIGHTS_PULL`` from this host's ctl client (``p2pllm models fetch``): the same fetch with
  its progress streamed back.

Progress goes into the daemon state (``fetches``, ``served_bytes`` in the snapshot) and into
this node's caps (running fetches, sent to the peers at most once a second).

Size: over 400 lines because both ends of the weights messages live here: the checks a server makes
on WEIGHTS_READ and the checks :class:`PeerSource` makes on its answer are each other's
mirror, and kept side by side they cannot drift apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pllm.daemon import state as ev
from p2pllm.daemon.messages import (
    MAX_READ_PIECES,
    WEIGHTS_MANIFEST,
    WEIGHTS_MANIFEST_REPLY,
    WEIGHTS_PULL,
    WEIGHTS_PULL_PROGRESS,
    WEIGHTS_PULL_REPLY,
    WEIGHTS_READ,
    WEIGHTS_READ_REPLY,
)
from p2pllm.daemon.modelrefs import ModelRef, ModelRoots, is_path_ref
from p2pllm.engine.errors import CheckpointError
from p2pllm.weights.fetch import FetchError, Progress, agree_manifest, fetch_pieces
from p2pllm.weights.manifest import Manifest, build_manifest
from p2pllm.weights.slices import Need, pieces_for, tensor_part
from p2pllm.weights.store import CacheEntry, CacheFull, FetchCache
from p2pllm.wire.connection import Connection, ConnectionClosed, RemoteError, Reply, Request
from p2pllm.wire.frame import ProtocolError, encode_meta
from p2pllm.wire.messages import ErrorCode, MsgType

if TYPE_CHECKING:
    from p2pllm.daemon.roles import Cluster

log = logging.getLogger(__name__)

__all__ = ["CACHE_DIR", "READ_CAP", "Fetched", "PeerSource", "WeightsService", "need_for_layers"]

READ_CAP = 16 << 20  # bytes of pieces one WEIGHTS_READ may ask for (and at most max_payload)
CACHE_DIR = "models-cache"  # under the state dir
READ_TIMEOUT = 60.0  # seconds a source may take to answer one WEIGHTS_READ
MANIFEST_TIMEOUT = 300.0  # the first WEIGHTS_MANIFEST of a model hashes all of it
READ_THREADS = 4  # WEIGHTS_READs reading from disk at once, all peers together
PROGRESS_EVERY = 0.1  # seconds between WEIGHTS_PULL partial answers, at least
CAPS_EVERY = 1.0  # seconds between caps updates while fetches run, at least
REF_TTL = 2.0  # seconds a served name's resolution is reused (a hub id's lookup is slow)
META_SLACK = 1024  # bytes of a WEIGHTS_MANIFEST answer's meta besides the manifest

Progressed = Callable[[Progress], None]


# -- serving --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Served:
    """A model's manifest as this node serves it, with what it was built from."""

    manifest: Manifest
    digest: str
    folder: Path
    stamp: tuple[Any, ...]  # the files' (name, size, mtime_ns) and the folder's mtime


def _folder(path: Path) -> Path:
    """The folder a model's files are in (a ModelRef may name a .gguf file)."""
    return path if path.is_dir() else path.parent


def _stamp(folder: Path, names: Iterable[str]) -> tuple[Any, ...]:
    out: list[Any] = [os.stat(folder).st_mtime_ns]
    for name in names:
        try:
            st = os.stat(folder / name)
        except OSError:
            out.append((name, None))
            continue
        out.append((name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _inside(real: str, roots: Iterable[str]) -> bool:
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def _check_files(folder: Path, names: Iterable[str], roots: ModelRoots, model: str) -> None:
    """Every file of a served model must really lie inside a root: a link in a model's folder
    to a file elsewhere is FORBIDDEN (hub snapshots link into the hub cache's blobs: fine)."""
    reals = [os.path.realpath(d) for _, d in roots.model_roots()]
    for name in names:
        if not _inside(os.path.realpath(folder / name), reals):
            raise ProtocolError(ErrorCode.FORBIDDEN, (
                f"model {model!r}: its file {name} links outside this host's model roots; "
                f"it is not served"))


def _read_pieces(served: _Served, ids: Sequence[int]) -> list[bytes]:
    """The pieces' bytes, read with os.pread at the manifest's offsets (in a thread)."""
    m = served.manifest
    fds: dict[int, int] = {}
    out: list[bytes] = []
    try:
        for i in ids:
            p = m.pieces[i]
            fd = fds.get(p.file)
            if fd is None:
                fd = fds[p.file] = os.open(served.folder / m.files[p.file].name, os.O_RDONLY)
            data = os.pread(fd, p.length, p.offset)
            if len(data) != p.length:
                raise ProtocolError(ErrorCode.BAD_REQUEST, (
                    f"model {m.model!r} changed at the source: {m.files[p.file].name} is shorter "
                    f"than its manifest says; ask WEIGHTS_MANIFEST again"))
            out.append(data)
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


# -- a peer as a source ---------------------------------------------------------------------


def _as_protocol_error(who: str, exc: RemoteError) -> ProtocolError:
    try:
        code = ErrorCode(exc.code)
    except ValueError:
        code = ErrorCode.INTERNAL
    return ProtocolError(code, f"{who} answered {code.name}: {exc.message}")


class PeerSource:
    """A peer holding a model whole, as a :class:`p2pllm.weights.fetch.Source`: its manifest
    (``WEIGHTS_MANIFEST``, checked by ``Manifest.from_wire`` and against its digest) and its
    pieces (``WEIGHTS_READ``, each answer checked against the manifest before its bytes are
    handed on; their sha256 is the store's to check). An ERROR answer becomes a ProtocolError
    naming the peer; a closed connection and a timeout propagate as they are."""

    def __init__(self, cluster: Cluster, node_id: str, name: str, model: str, *,
                 timeout: float = READ_TIMEOUT) -> None:
        self.cluster = cluster
        self.node_id = node_id
        self.name = name
        self.model = model
        self.timeout = timeout
        self.digest: str | None = None

    def __repr__(self) -> str:
        return f"PeerSource({self.name}, {self.model!r})"

    async def _request(self, msg_type: MsgType, meta: dict[str, Any], timeout: float) -> Any:
        try:
            return await self.cluster.request(self.node_id, msg_type, meta, timeout=timeout)
        except RemoteError as exc:
            raise _as_protocol_error(self.name, exc) from None

    async def manifest(self) -> Manifest:
        frame = await self._request(MsgType.WEIGHTS_MANIFEST, {"model": self.model},
                                    MANIFEST_TIMEOUT)
        m = WEIGHTS_MANIFEST_REPLY.parse(frame.meta)
        manifest = Manifest.from_wire(m["manifest"])
        if manifest.digest != m["digest"]:
            raise ProtocolError(ErrorCode.BAD_REQUEST, (
                f"{self.name} sent a manifest of {self.model!r} whose digest is "
                f"{manifest.digest}, not the {m['digest']} it claims"))
        if manifest.model != self.model:
            raise ProtocolError(ErrorCode.BAD_REQUEST, (
                f"{self.name} sent the manifest of {manifest.model!r} for {self.model!r}"))
        self.digest = manifest.digest
        return manifest

    async def read(self, manifest: Manifest, ids: Sequence[int]) -> list[memoryview]:
        out: list[memoryview] = []
        for group in _groups(manifest, ids):
            out += await self._read(manifest, group)
        return out

    async def _read(self, manifest: Manifest, ids: list[int]) -> list[memoryview]:
        meta = {"model": self.model, "digest": manifest.digest, "pieces": ids}
        frame = await self._request(MsgType.WEIGHTS_READ, meta, self.timeout)
        m = WEIGHTS_READ_REPLY.parse(frame.meta)
        want = [manifest.pieces[i].length for i in ids]
        if list(m["pieces"]) != ids or list(m["lengths"]) != want:
            raise ProtocolError(ErrorCode.BAD_REQUEST, (
                f"{self.name} answered WEIGHTS_READ with other pieces or lengths than asked"))
        payload = frame.payload
        if payload.nbytes != sum(want):
            raise ProtocolError(ErrorCode.BAD_REQUEST, (
                f"{self.name} answered WEIGHTS_READ with {payload.nbytes} bytes, not the "
                f"{sum(want)} of its pieces"))
        out: list[memoryview] = []
        at = 0
        for n in want:  # views of the receive buffer: no copy before the store hashes them
            out.append(payload[at:at + n])
            at += n
        return out


def _groups(manifest: Manifest, ids: Sequence[int]) -> list[list[int]]:
    """``ids`` cut into WEIGHTS_READ requests within READ_CAP bytes and MAX_READ_PIECES ids."""
    groups: list[list[int]] = []
    cur: list[int] = []
    size = 0
    for i in ids:
        n = manifest.pieces[i].length
        if cur and (size + n > READ_CAP or len(cur) >= MAX_READ_PIECES):
            groups.append(cur)
            cur, size = [], 0
        cur.append(int(i))
        size += n
    if cur:
        groups.append(cur)
    return groups


# -- slices of a pull -----------------------------------------------------------------------

def layer_count(manifest: Manifest) -> int:
    """Layers of a model, from its tensor names (GGUF ``blk.N.``, HF ``model.layers.N.``)."""
    found = [n for t in manifest.tensor_names()
             if (part := tensor_part(t))[0] == "layer" and (n := part[1]) is not None]
    return max(found) + 1 if found else 0


def need_for_layers(text: str | None, num_layers: int) -> Need:
    """``"A-B"`` (layers [A, B); the embedding with A = 0, the final norm and head with B the
    model's last) as a Need; None: the whole model. BAD_REQUEST for anything else."""
    if text is None:
        return Need.whole()
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if not m:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"WEIGHTS_PULL: layers must be \"A-B\", got {text!r}")
    a, b = int(m.group(1)), int(m.group(2))
    if not 0 <= a < b <= num_layers:
        raise ProtocolError(ErrorCode.BAD_REQUEST, (
            f"WEIGHTS_PULL: layers {a}-{b} are not a range inside the model's {num_layers} "
            f"layers (A-B with 0 <= A < B <= {num_layers})"))
    return Need.for_layers(a, b, num_layers)


# -- fetching -------------------------------------------------------------------------------


@dataclass
class Fetched:
    """What one fetch_model call did."""

    model: str
    path: Path
    where: str  # "local": a root has it; "cache": the models cache
    bytes: int = 0  # fetched by this call
    pieces: int = 0
    disk_bytes: int = 0
    seconds: float = 0.0
    sources: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def reply(self) -> dict[str, Any]:
        return WEIGHTS_PULL_REPLY.to_meta({**vars(self), "path": str(self.path)})


class WeightsService:
    """The daemon's weights handlers and fetches (module doc)."""

    def __init__(self, daemon: Any) -> None:
        self.d = daemon
        self.served_bytes = 0
        self._served: dict[tuple[str, str], _Served] = {}
        self._building: dict[tuple[str, str], asyncio.Lock] = {}
        self._fetching: dict[str, asyncio.Lock] = {}
        self._reads = asyncio.Semaphore(READ_THREADS)
        self._caps_at = 0.0
        self._cache: FetchCache | None = None
        self._refs: dict[str, tuple[float, ModelRef]] = {}  # name -> (when, where), REF_TTL

    @property
    def cache_root(self) -> Path:
        return Path(self.d.config.state_dir).expanduser() / CACHE_DIR

    def cache(self) -> FetchCache:
        """This daemon's models cache (one instance: it keeps its entries' files open)."""
        if self._cache is None:
            self._cache = FetchCache(self.cache_root, self.d.config.max_models_cache_bytes)
        return self._cache

    def handlers(self) -> dict[MsgType, Any]:
        return {
            MsgType.WEIGHTS_MANIFEST: self.on_manifest,
            MsgType.WEIGHTS_READ: self.on_read,
            MsgType.WEIGHTS_PULL: self.on_pull,
        }

    def running(self) -> list[dict[str, Any]]:
        """The fetches in progress here, for this node's caps."""
        return [{k: f[k] for k in ("model", "job", "done_bytes", "total_bytes", "source")}
                for f in self.d.state.fetches.values() if f["state"] == "fetching"]

    # -- serving ----------------------------------------------------------------------------

    async def served(self, name: str) -> _Served:
        """The manifest of the model ``name`` under this host's roots (built or reused)."""
        if is_path_ref(name):
            raise ProtocolError(ErrorCode.FORBIDDEN, (
                f"model {name!r} is a path: names cross the wire, not paths (protocol.md 4.6); "
                f"{self.d.name} serves only models under its roots, by name"))
        roots = ModelRoots.of(self.d.config)
        now = time.monotonic()
        hit = self._refs.get(name)
        ref: ModelRef | None
        if hit is not None and now - hit[0] < REF_TTL:  # a fetch's reads: no lookup each
            ref = hit[1]
        else:
            ref = await asyncio.to_thread(roots.find, name)
            if ref is not None:
                if len(self._refs) >= 256:
                    self._refs.clear()
                self._refs[name] = (now, ref)
        if ref is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, (
                f"model {name!r} is not on {self.d.name}: looked under {roots.describe()}"))
        folder = _folder(ref.path)
        key = (str(folder), ref.name)
        async with self._building.setdefault(key, asyncio.Lock()):
            got = self._served.get(key)
            if got is not None and await asyncio.to_thread(
                    _stamp, folder, [f.name for f in got.manifest.files]) == got.stamp:
                return got
            t0 = time.perf_counter()
            try:
                manifest = await asyncio.to_thread(build_manifest, ref.path, ref.name)
            except CheckpointError as exc:  # a local model no manifest can describe
                raise ProtocolError(ErrorCode.NOT_FOUND, (
                    f"model {name!r} on {self.d.name} cannot be served: {exc}")) from None
            names = [f.name for f in manifest.files]
            await asyncio.to_thread(_check_files, folder, names, roots, ref.name)
            got = _Served(manifest, manifest.digest, folder,
                          await asyncio.to_thread(_stamp, folder, names))
            self._served[key] = got
            log.info("manifest of %s: %d files, %d pieces (%.2f s)", ref.name, len(names),
                     len(manifest.pieces), time.perf_counter() - t0)
            return got

    async def on_manifest(self, conn: Connection, req: Request) -> Reply:
        m = WEIGHTS_MANIFEST.parse(req.meta)
        got = await self.served(m["model"])
        wire = got.manifest.to_wire()
        size = len(encode_meta(wire))
        cap = self.d.config.max_meta - META_SLACK
        if size > cap:  # a reader with the same max_meta would close the link on it (2.1)
            raise ProtocolError(ErrorCode.OVER_LIMIT, (
                f"manifest of {m['model']!r} ({len(wire['pieces'])} pieces, {size} bytes) over "
                f"the cap {cap} (config key max_meta)"))
        return Reply(MsgType.WEIGHTS_MANIFEST, {"model": m["model"], "digest": got.digest,
                                                "manifest": wire})

    async def on_read(self, conn: Connection, req: Request) -> Reply:
        m = WEIGHTS_READ.parse(req.meta)
        got = await self.served(m["model"])
        if m["digest"] != got.digest:
            raise ProtocolError(ErrorCode.BAD_REQUEST, (
                f"WEIGHTS_READ: model {m['model']!r} changed at the source: its manifest digest "
                f"on {self.d.name} is {got.digest}, not {m['digest']}; ask WEIGHTS_MANIFEST again"))
        ids = list(m["pieces"])
        pieces = got.manifest.pieces
        if (bad := [i for i in ids if i >= len(pieces)]):
            raise ProtocolError(ErrorCode.BAD_REQUEST, (
                f"WEIGHTS_READ: pieces must be ids below {len(pieces)}, got {bad[:4]}"))
        if len(set(ids)) != len(ids):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "WEIGHTS_READ: a piece id is asked twice")
        total = sum(pieces[i].length for i in ids)
        cap = min(READ_CAP, self.d.config.max_payload)
        if total > cap:
            raise ProtocolError(ErrorCode.OVER_LIMIT, (
                f"WEIGHTS_READ of {total} bytes over the cap {cap} (16 MiB a request, at most "
                f"config key max_payload)"))
        # a reader that does not take its answers must not make this node hold them: no read
        # from disk while the connection's writing is paused (checked again once a read
        # thread is free; the wait holds none, so other peers' reads go on)
        while True:
            await conn.wait_writable()
            async with self._reads:
                if conn.writing_paused:
                    continue
                data = await asyncio.to_thread(_read_pieces, got, ids)
                break
        self.served_bytes += total
        self.d.emit(ev.WeightsServed(total))
        return Reply(MsgType.WEIGHTS_READ, {"pieces": ids, "lengths": [pieces[i].length for i in ids]},
                     data)

    # -- fetching ---------------------------------------------------------------------------

    def _node_name(self, node_id: str) -> str:
        for n in self.d.nodes():
            if n["node_id"] == node_id:
                return str(n["name"])
        return node_id[:8]

    async def fetch_model(self, job: str, ref: str, need: Need | None = None,
                          sources: Sequence[str] = ()) -> Path:
        """The folder to load ``ref`` from for job ``job`` (RoleContext.fetch_model; see
        :meth:`fetch`)."""
        return (await self.fetch(job, ref, need, sources)).path

    async def fetch(self, job: str, ref: str, need: Need | None = None,
                    sources: Sequence[str] = (), on_progress: Progressed | None = None) -> Fetched:
        """``ref`` in this host's roots: its path, no fetch. Else the models cache entry, once
        it holds the pieces ``need`` names (None: the whole model): reused when it already
        does, else fetched from ``sources`` (node ids holding the model whole), one fetch per
        model at a time. NOT_FOUND when the roots lack it and no source is given; OVER_LIMIT
        past max_models_cache_bytes; PEER_DOWN with the fetch's reason when it cannot
        complete."""
        t0 = time.monotonic()
        roots = ModelRoots.of(self.d.config)
        found = await asyncio.to_thread(roots.find, ref)  # BAD_REQUEST / FORBIDDEN raise
        if found is not None:
            return Fetched(found.name, found.path, "local", seconds=time.monotonic() - t0)
        need = need or Need.whole()
        async with self._fetching.setdefault(ref, asyncio.Lock()):
            try:
                return await self._fetch(job, ref, need, sources, on_progress, roots, t0)
            except BaseException as exc:
                self.d.emit(ev.FetchUpdated(ref, job, "failed", 0, 0, time.time(),
                                            error=str(exc) or type(exc).__name__))
                self._publish(force=True)
                raise

    async def _fetch(self, job: str, ref: str, need: Need, sources: Sequence[str],
                     on_progress: Progressed | None, roots: ModelRoots, t0: float) -> Fetched:
        cache = self.cache()
        entry = await asyncio.to_thread(cache.find, ref)
        if entry is not None:
            ids = pieces_for(entry.manifest, need)
            if not entry.missing(ids):
                total = entry.manifest.nbytes(ids)
                self.d.emit(ev.FetchUpdated(ref, job, "reused", total, total, time.time(),
                                            len(ids), len(ids)))
                return Fetched(ref, entry.path, "cache",
                               disk_bytes=await asyncio.to_thread(entry.disk_bytes),
                               seconds=time.monotonic() - t0)
        peers = [s for s in dict.fromkeys(sources) if s != self.d.node_id]
        if not peers:
            raise ProtocolError(ErrorCode.NOT_FOUND, (
                f"model {ref!r} is not on {self.d.name} (looked under {roots.describe()}) and "
                f"no node holding it was named to fetch it from"))
        srcs = [PeerSource(self.d, p, self._node_name(p), ref) for p in peers]
        try:
            agreed = await agree_manifest(srcs, model=ref)
        except FetchError as exc:
            raise ProtocolError(ErrorCode.PEER_DOWN, str(exc)) from None
        manifest = agreed.manifest
        entry = await asyncio.to_thread(cache.entry, manifest)
        ids = pieces_for(manifest, need)
        held = manifest.nbytes(ids) - manifest.nbytes(entry.missing(ids))
        await asyncio.to_thread(self._make_room, cache, manifest.nbytes(ids) - held, ref)
        names = ", ".join(s.name for s in agreed.sources)
        first = tuple(f"{n}: {why}" for n, why in agreed.dropped.items())
        self.d.emit(ev.FetchUpdated(ref, job, "fetching", held, manifest.nbytes(ids), time.time(),
                                    len(ids) - len(entry.missing(ids)), len(ids), names, first))
        self._publish(force=True)

        def progress(p: Progress) -> None:
            self.d.emit(ev.FetchUpdated(
                ref, job, "fetching", p.done_bytes, p.total_bytes, time.time(), p.pieces_done,
                p.pieces_total, ", ".join(p.sources), tuple(f"{n}: {why}" for n, why in p.dropped)))
            self._publish()
            if on_progress is not None:
                on_progress(p)

        try:
            result = await fetch_pieces(entry, manifest, ids, agreed.sources, on_progress=progress,
                                        dropped=agreed.dropped, sync=False)
        except FetchError as exc:
            raise ProtocolError(ErrorCode.PEER_DOWN, str(exc)) from None
        except CacheFull as exc:  # another model's fetch took the room meanwhile
            raise ProtocolError(ErrorCode.OVER_LIMIT, (
                f"{exc} (config key max_models_cache_bytes)")) from None
        if result.pieces:  # durable in the background: the role loads from the page cache
            self._sync_later(entry)
        dropped = [f"{n}: {why}" for n, why in result.dropped.items()]
        total = manifest.nbytes(ids)
        self.d.emit(ev.FetchUpdated(ref, job, "done", total, total, time.time(), len(ids),
                                    len(ids), ", ".join(result.sources), tuple(dropped)))
        self._publish(force=True)
        log.info("fetched %s for %s: %d pieces, %d bytes in %.2f s from %s", ref, job,
                 result.pieces, result.fetched_bytes, result.seconds,
                 ", ".join(result.sources) or "-")
        return Fetched(ref, entry.path, "cache", bytes=result.fetched_bytes, pieces=result.pieces,
                       disk_bytes=await asyncio.to_thread(entry.disk_bytes),
                       seconds=time.monotonic() - t0, sources=result.sources, dropped=dropped)

    def _sync_later(self, entry: CacheEntry) -> None:
        """fsync a fetched entry's files and journal after the fetch has answered (10-27 ms
        of a 24 MB slice's 60-120 ms pull here). Crash-safe as it stands: until it ends, the
        journal lists the last pieces as unsynced and the store re-verifies them when the
        entry reopens; a sync of an entry closed meanwhile does nothing."""

        async def run() -> None:
            try:
                await asyncio.to_thread(entry.sync)
            except Exception as exc:
                log.warning("weights: cannot sync %s: %s", entry.path, exc)

        self.d._spawn(run())

    def _make_room(self, cache: FetchCache, todo: int, model: str) -> None:
        """Room for ``todo`` more bytes (least recently used other entries evicted), or
        OVER_LIMIT naming the cap (protocol.md 4.5)."""
        try:
            cache.make_room(todo, keep=model)
        except CacheFull:
            raise ProtocolError(ErrorCode.OVER_LIMIT, (
                f"models cache of {cache.disk_bytes() + todo} bytes (with the {todo} bytes "
                f"{model!r} still needs) over the cap {self.d.config.max_models_cache_bytes} "
                f"(config key max_models_cache_bytes)")) from None

    def _publish(self, force: bool = False) -> None:
        """Send the peers this node's caps (with its running fetches), at most once a second."""
        now = time.monotonic()
        if not force and now - self._caps_at < CAPS_EVERY:
            return
        self._caps_at = now
        with contextlib.suppress(RuntimeError):
            self.d._spawn(self.d.broadcast_caps())

    # -- WEIGHTS_PULL -----------------------------------------------------------------------

    def _sources(self, model: str, source: str | None) -> list[str]:
        if source is not None:
            return [self.d.peers.find(source).node_id]  # NOT_FOUND naming the connected peers
        out = [n["node_id"] for n in self.d.nodes() if not n.get("self")
               and any(isinstance(m, dict) and m.get("name") == model
                       for m in (n.get("caps") or {}).get("models") or [])]
        if not out:
            raise ProtocolError(ErrorCode.NOT_FOUND, (
                f"no peer of {self.d.name} that is up lists model {model!r}; name one with "
                f"--from PEER"))
        return out

    def _layers(self, model: str, sources: list[str]) -> int:
        for n in self.d.nodes():
            if n["node_id"] in sources:
                for m in (n.get("caps") or {}).get("models") or []:
                    if isinstance(m, dict) and m.get("name") == model and isinstance(
                            m.get("num_layers"), int) and m["num_layers"] > 0:
                        return int(m["num_layers"])
        return 0

    async def on_pull(self, conn: Connection, req: Request) -> Reply:
        m = WEIGHTS_PULL.parse(req.meta)
        model = m["model"]
        job = f"pull-{uuid.uuid4().hex[:8]}"
        roots = ModelRoots.of(self.d.config)
        if await asyncio.to_thread(roots.find, model) is not None:
            done = await self.fetch(job, model)
            return Reply(MsgType.WEIGHTS_PULL, done.reply())
        sources = self._sources(model, m["source"])
        need = Need.whole()
        if m["layers"] is not None:
            layers = self._layers(model, sources)
            if not layers:  # no source said: read it off the manifest's tensor names
                layers = layer_count(await PeerSource(self.d, sources[0], self._node_name(
                    sources[0]), model).manifest())
            need = need_for_layers(m["layers"], layers)
        latest: list[Progress] = []
        wake = asyncio.Event()

        def on_progress(p: Progress) -> None:
            latest[:] = [p]
            wake.set()

        async def report() -> None:
            while True:
                await wake.wait()
                wake.clear()
                f = self.d.state.fetches.get(model)
                if latest and f is not None:
                    await req.partial(MsgType.WEIGHTS_PULL, WEIGHTS_PULL_PROGRESS.to_meta({
                        "done_bytes": f["done_bytes"], "total_bytes": f["total_bytes"],
                        "source": f["source"]}))
                await asyncio.sleep(PROGRESS_EVERY)

        reporter = asyncio.get_running_loop().create_task(report())
        try:
            done = await self.fetch(job, model, need, sources, on_progress)
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed, Exception):
                await reporter
        return Reply(MsgType.WEIGHTS_PULL, done.reply())
