"""A model's manifest: its files and the pieces they are cut into, each with its sha256.

A model folder (or a single ``.gguf`` file) is described as the regular files in it (and one
level of subfolder), names of ``[A-Za-z0-9_.-]`` without a leading dot. A ``.gguf`` or
``.safetensors`` file is cut into *head* pieces (bytes ``[0, data start)``: the header, the
tensor table and the padding up to the first tensor) and each tensor's bytes in chunks of at
most :data:`CHUNK` (``Piece.tensor`` = the name stored in the file); the alignment padding
between tensors is in no piece (a sparse copy reads it as zeros, as the writer wrote it).
Every other file is whole pieces of at most :data:`CHUNK`, tensor None.

:func:`build_manifest` reads and hashes a local model (hashes cached in memory per file
version); :meth:`Manifest.from_wire` checks everything a peer sends (names, bounds, overlaps,
counts) and raises :class:`~p2pllm.wire.frame.ProtocolError` ``BAD_REQUEST``. The headers are
parsed here with ``struct`` (no torch): :mod:`p2pllm.engine.gguf` imports torch at its top.
Size: over 400 lines because the manifest, the checks of a peer's and the two header parsers
that cut a file into pieces are one contract (where a piece may lie), read together.

Wire form (``to_wire``; its canonical msgpack's sha256 is :attr:`Manifest.digest`)::

    {"model": str, "format": "gguf"|"safetensors"|"other",
     "files": [[name, size], ...],
     "pieces": [[file index, offset, length, sha256 hex, tensor name | nil], ...]}

A piece's id is its index in ``pieces``; pieces are sorted by (file, offset).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import msgpack

from p2pllm.engine.errors import CheckpointError
from p2pllm.engine.stheader import safetensors_layout
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode

__all__ = [
    "CHUNK",
    "FORMATS",
    "MAX_FILES",
    "MAX_PIECES",
    "MAX_TOTAL_BYTES",
    "FileEntry",
    "Manifest",
    "Piece",
    "build_manifest",
    "check_file_name",
    "check_model_name",
    "model_files",
]

CHUNK = 4 << 20  # the largest piece
MAX_PIECES = 1 << 18  # 1 TiB of 4 MiB pieces
MAX_FILES = 4096
MAX_TOTAL_BYTES = 1 << 42  # 4 TiB, all files together
MAX_NAME = 255  # characters of a model, file or tensor name
FORMATS = ("gguf", "safetensors", "other")
_COMPONENT = re.compile(r"[A-Za-z0-9_.-]+")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_MODEL_PARTS = 8
_HASH_THREADS = max(1, min(4, os.cpu_count() or 1))


class FileEntry(NamedTuple):
    """One file of a model: its name relative to the model folder (``a`` or ``sub/a``), size."""

    name: str
    size: int


class Piece(NamedTuple):
    """Bytes ``[offset, offset + length)`` of file ``files[file]``; ``tensor``: the tensor
    whose bytes they are (None: a header or a non-tensor file)."""

    id: int
    file: int
    offset: int
    length: int
    sha256: str
    tensor: str | None


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, f"bad manifest: {message}")


def _check_components(name: object, what: str, max_parts: int) -> str:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise _bad(f"{what} {name!r} is not a name of 1 to {MAX_NAME} characters")
    parts = name.split("/")
    if len(parts) > max_parts or any(
            not _COMPONENT.fullmatch(p) or p.startswith(".") for p in parts):
        raise _bad(f"{what} {name!r} is not a relative name of at most {max_parts} parts of "
                   f"[A-Za-z0-9_.-], none starting with '.' (no '..', no absolute path)")
    return name


def check_model_name(name: object) -> str:
    """``name`` if it is a model name that may become a folder under the cache (``tiny``,
    ``org/model``); else ProtocolError BAD_REQUEST."""
    return _check_components(name, "model name", _MAX_MODEL_PARTS)


def check_file_name(name: object) -> str:
    """``name`` if it is a file name of a model folder (``model.gguf``, ``sub/x.json``)."""
    return _check_components(name, "file name", 2)


@dataclass(frozen=True)
class Manifest:
    """A model's files and pieces (see the module doc); validated when built."""

    model: str
    format: str
    files: tuple[FileEntry, ...]
    pieces: tuple[Piece, ...]
    _by_tensor: dict[str, list[int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_model_name(self.model)
        if self.format not in FORMATS:
            raise _bad(f"format {self.format!r} is not one of {', '.join(FORMATS)}")
        if len(self.files) > MAX_FILES:
            raise _bad(f"{len(self.files)} files (at most {MAX_FILES})")
        if len(self.pieces) > MAX_PIECES:
            raise _bad(f"{len(self.pieces)} pieces (at most {MAX_PIECES})")
        names: set[str] = set()
        total = 0
        for f in self.files:
            check_file_name(f.name)
            if f.name in names:
                raise _bad(f"file {f.name!r} is listed twice")
            names.add(f.name)
            if type(f.size) is not int or f.size < 0:
                raise _bad(f"file {f.name!r} has size {f.size!r}")
            total += f.size
        folders = {n.split("/")[0] for n in names if "/" in n}
        if folders & names:
            raise _bad(f"{sorted(folders & names)[0]!r} is both a file and a folder")
        if total > MAX_TOTAL_BYTES:
            raise _bad(f"files of {total} bytes in all (at most {MAX_TOTAL_BYTES})")
        by_tensor: dict[str, list[int]] = {}
        prev_file, prev_end = -1, 0
        for i, p in enumerate(self.pieces):
            if p.id != i:
                raise _bad(f"piece #{i} has id {p.id!r}")
            for what, v in (("file", p.file), ("offset", p.offset), ("length", p.length)):
                if type(v) is not int:
                    raise _bad(f"piece {i}: {what} {v!r} is not an integer")
            if not 0 <= p.file < len(self.files):
                raise _bad(f"piece {i} names file #{p.file} of {len(self.files)}")
            if not 0 < p.length <= CHUNK:
                raise _bad(f"piece {i} has length {p.length} (1 to {CHUNK})")
            size = self.files[p.file].size
            if p.offset < 0 or p.offset + p.length > size:
                raise _bad(f"piece {i} lies at bytes [{p.offset}, {p.offset + p.length}) of "
                           f"{self.files[p.file].name!r}, a {size}-byte file")
            if p.file < prev_file or (p.file == prev_file and p.offset < prev_end):
                raise _bad(f"piece {i} overlaps the piece before it or is out of order "
                           f"(pieces are sorted by file and offset)")
            prev_file, prev_end = p.file, p.offset + p.length
            if not isinstance(p.sha256, str) or not _HEX64.fullmatch(p.sha256):
                raise _bad(f"piece {i}: sha256 {p.sha256!r} is not 64 lowercase hex digits")
            if p.tensor is not None:
                if not isinstance(p.tensor, str) or not 0 < len(p.tensor) <= MAX_NAME:
                    raise _bad(f"piece {i}: tensor {p.tensor!r} is not a name of 1 to "
                               f"{MAX_NAME} characters")
                by_tensor.setdefault(p.tensor, []).append(i)
        object.__setattr__(self, "_by_tensor", by_tensor)

    # -- wire -----------------------------------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        return {"model": self.model, "format": self.format,
                "files": [[f.name, f.size] for f in self.files],
                "pieces": [[p.file, p.offset, p.length, p.sha256, p.tensor] for p in self.pieces]}

    @classmethod
    def from_wire(cls, d: object) -> Manifest:
        """A manifest a peer sent (or a journal held), every field checked; ProtocolError
        BAD_REQUEST otherwise."""
        if not isinstance(d, Mapping):
            raise _bad("not a map")
        files, pieces = d.get("files"), d.get("pieces")
        if not isinstance(files, list) or not isinstance(pieces, list):
            raise _bad("files and pieces must be lists")
        if len(files) > MAX_FILES:  # before looking at any entry
            raise _bad(f"{len(files)} files (at most {MAX_FILES})")
        if len(pieces) > MAX_PIECES:
            raise _bad(f"{len(pieces)} pieces (at most {MAX_PIECES})")
        fs = []
        for f in files:
            if not isinstance(f, list | tuple) or len(f) != 2:
                raise _bad(f"file entry {f!r} is not [name, size]")
            fs.append(FileEntry(f[0], f[1]))
        ps = []
        for i, p in enumerate(pieces):
            if not isinstance(p, list | tuple) or len(p) != 5:
                raise _bad(f"piece #{i} is not [file, offset, length, sha256, tensor]")
            ps.append(Piece(i, *p))
        return cls(d.get("model"), d.get("format"), tuple(fs), tuple(ps))  # type: ignore[arg-type]

    @cached_property
    def digest(self) -> str:
        """sha256 (hex) of the canonical msgpack of :meth:`to_wire`."""
        return hashlib.sha256(msgpack.packb(self.to_wire(), use_bin_type=True)).hexdigest()

    # -- queries --------------------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        """Bytes of all pieces (what a whole fetch moves)."""
        return sum(p.length for p in self.pieces)

    @property
    def file_bytes(self) -> int:
        """Bytes of all files (padding included)."""
        return sum(f.size for f in self.files)

    def nbytes(self, ids: Iterable[int]) -> int:
        """Bytes of the pieces ``ids``."""
        return sum(self.pieces[i].length for i in ids)

    def tensor_names(self) -> list[str]:
        """Names of the tensors in the manifest (in file order)."""
        return list(self._by_tensor)

    def tensor_pieces(self, name: str) -> list[int]:
        """Ids of the pieces of tensor ``name`` (empty when there is none)."""
        return list(self._by_tensor.get(name, ()))


# -- reading a local model ------------------------------------------------------------------------


def model_files(model: str | Path) -> list[tuple[str, Path]]:
    """(name, path) of the files of a model folder (or the one ``.gguf`` file ``model`` is),
    sorted by name: regular files directly in it and in its subfolders (one level), names
    matching ``[A-Za-z0-9_.-]+`` without a leading dot; others are skipped."""
    p = Path(model)
    if p.is_file():
        return [(p.name, p)]
    if not p.is_dir():
        raise CheckpointError(f"{p} is neither a model folder nor a model file")

    def ok(q: Path) -> bool:
        return bool(_COMPONENT.fullmatch(q.name)) and not q.name.startswith(".")

    out: list[tuple[str, Path]] = []
    for q in sorted(p.iterdir()):
        if not ok(q):
            continue
        if q.is_file():
            out.append((q.name, q))
        elif q.is_dir():
            out.extend((f"{q.name}/{r.name}", r) for r in sorted(q.iterdir())
                       if ok(r) and r.is_file())
    if len(out) > MAX_FILES:
        raise CheckpointError(f"{p} holds {len(out)} files (a manifest lists at most {MAX_FILES})")
    return out


class _Span(NamedTuple):
    offset: int
    length: int
    tensor: str | None


def _chunks(offset: int, length: int, tensor: str | None) -> list[_Span]:
    return [_Span(o, min(CHUNK, offset + length - o), tensor)
            for o in range(offset, offset + length, CHUNK)]


def _spans(path: Path, size: int) -> list[_Span]:
    """The pieces of one file (before hashing), sorted by offset."""
    suffix = path.suffix.lower()
    if suffix not in (".gguf", ".safetensors") or size == 0:
        return _chunks(0, size, None)
    start, tensors = (_gguf_layout if suffix == ".gguf" else safetensors_layout)(path, size)
    out = _chunks(0, start, None)
    end = start
    for name, lo, n in sorted(tensors, key=lambda t: t[1]):
        if n == 0:
            continue
        if lo < end or lo + n > size:
            raise CheckpointError(f"{path} is corrupt: tensor {name!r} at bytes [{lo}, {lo + n}) "
                                  f"overlaps the header or another tensor, or runs past the "
                                  f"{size}-byte file")
        out.extend(_chunks(lo, n, name))
        end = lo + n
    return out


# GGUF metadata value types: scalar type id -> width; 8 is a string, 9 an array
_GGUF_WIDTHS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _gguf_layout(path: Path, size: int) -> tuple[int, list[tuple[str, int, int]]]:
    """(data start, [(tensor, absolute offset, bytes)]) of a GGUF file (versions 2 and 3),
    parsed as :class:`p2pllm.engine.gguf.GGUFFile` does, skipping the metadata values but
    ``general.alignment``."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # numpy, no torch; ~0.3 s

    try:
        with open(path, "rb") as fh:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    pos = 0

    def take(n: int, what: str) -> int:
        nonlocal pos
        if n < 0 or pos + n > size:
            raise CheckpointError(f"{path} is truncated or corrupt: {what} runs past the end "
                                  f"of the {size}-byte file")
        at, pos = pos, pos + n
        return at

    def u32(what: str) -> int:
        return int(struct.unpack_from("<I", buf, take(4, what))[0])

    def u64(what: str) -> int:
        return int(struct.unpack_from("<Q", buf, take(8, what))[0])

    def string(what: str) -> str:
        n = u64(what)
        at = take(n, what)
        try:
            return buf[at:at + n].decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{path} is corrupt: {what} is not UTF-8") from e

    def skip(vtype: int, what: str) -> None:
        nonlocal pos
        if vtype in _GGUF_WIDTHS:
            take(_GGUF_WIDTHS[vtype], what)
        elif vtype == 8:
            take(u64(what), what)
        elif vtype == 9:
            etype, count = u32(what), u64(what)
            if etype in _GGUF_WIDTHS:
                take(count * _GGUF_WIDTHS[etype], what)
            elif etype == 8:
                take(count * 8, what)  # each string takes at least its 8-byte length
                pos -= count * 8
                unpack = struct.Struct("<Q").unpack_from
                for _ in range(count):
                    (n,) = unpack(buf, take(8, what))
                    take(n, what)
            else:
                for _ in range(count):
                    skip(etype, what)
        else:
            raise CheckpointError(f"{path} is corrupt: {what} has value type {vtype}")

    try:
        if size < 24 or buf[:4] != b"GGUF":
            raise CheckpointError(f"{path} is not a GGUF file (no GGUF magic at its start)")
        pos = 4
        version = u32("the version")
        if version not in (2, 3):
            raise CheckpointError(f"{path}: GGUF version {version} is not supported (2, 3)")
        n_tensors, n_kv = u64("the tensor count"), u64("the metadata count")
        if n_tensors > size // 24 or n_kv > size // 12:
            raise CheckpointError(f"{path} is truncated or corrupt: it claims {n_tensors} "
                                  f"tensors and {n_kv} metadata entries in {size} bytes")
        align: object = 32
        for i in range(n_kv):
            key = string(f"metadata key #{i}")
            vtype = u32(f"metadata {key!r}")
            if key == "general.alignment" and vtype in (4, 10):
                align = u32(key) if vtype == 4 else u64(key)
            else:
                skip(vtype, f"metadata {key!r}")
        entries = []
        for i in range(n_tensors):
            name = string(f"tensor name #{i}")
            n_dims = u32(f"tensor {name!r}")
            if n_dims > 8:
                raise CheckpointError(f"{path} is corrupt: tensor {name!r} has {n_dims} "
                                      f"dimensions")
            dims = struct.unpack_from(f"<{n_dims}Q", buf, take(8 * n_dims, f"tensor {name!r}"))
            type_id, offset = struct.unpack_from("<IQ", buf, take(12, f"tensor {name!r}"))
            entries.append((name, dims, type_id, offset))
        if not isinstance(align, int) or align <= 0:
            raise CheckpointError(f"{path} is corrupt: general.alignment is {align!r}")
        start = (pos + align - 1) // align * align
    finally:
        buf.close()
    out = []
    for name, dims, type_id, offset in entries:
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: tensor {name!r} has ggml type id {type_id}, which "
                                  f"no GGUF reader knows") from e
        n = 1
        for d in dims:
            n *= d
        if dims and dims[0] % block:  # GGUF's dims are innermost first
            raise CheckpointError(f"{path} is corrupt: tensor {name!r} has rows of {dims[0]} "
                                  f"elements, not a multiple of its block of {block}")
        out.append((name, start + offset, n // block * block_bytes))
    return min(start, size), out


# hashes of a file's pieces, by (real path, size, mtime_ns): a model is hashed once per version
_HASHES: OrderedDict[tuple[str, int, int], list[tuple[_Span, str]]] = OrderedDict()
_HASHES_LOCK = threading.Lock()
_HASHES_MAX = 256


def _hash_file(path: Path, spans: Sequence[_Span], pool: ThreadPoolExecutor) -> list[str]:
    fd = os.open(path, os.O_RDONLY)
    try:
        def one(s: _Span) -> str:
            data = os.pread(fd, s.length, s.offset)
            if len(data) != s.length:
                raise CheckpointError(f"{path} shrank while it was read (bytes [{s.offset}, "
                                      f"{s.offset + s.length}))")
            return hashlib.sha256(data).hexdigest()  # releases the GIL

        return list(pool.map(one, spans))
    finally:
        os.close(fd)


def build_manifest(model: str | Path, name: str) -> Manifest:
    """The manifest of the local model folder (or ``.gguf`` file) ``model``, under the name
    ``name`` (what crosses the wire). Reads every byte once per file version (hashes are
    cached in memory by real path, size and mtime); blocking: call it in a thread."""
    check_model_name(name)
    files = model_files(model)
    entries: list[FileEntry] = []
    pieces: list[Piece] = []
    kinds = {p.suffix.lower() for _, p in files}
    fmt = "gguf" if ".gguf" in kinds else "safetensors" if ".safetensors" in kinds else "other"
    with ThreadPoolExecutor(_HASH_THREADS, thread_name_prefix="p2pllm-hash") as pool:
        for index, (fname, path) in enumerate(files):
            try:
                st = os.stat(path)
            except OSError as e:
                raise CheckpointError(f"cannot read {path}: {e}") from e
            key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
            with _HASHES_LOCK:
                hashed = _HASHES.get(key)
                if hashed is not None:
                    _HASHES.move_to_end(key)
            if hashed is None:
                spans = _spans(path, st.st_size)
                hashed = list(zip(spans, _hash_file(path, spans, pool), strict=True))
                with _HASHES_LOCK:
                    _HASHES[key] = hashed
                    while len(_HASHES) > _HASHES_MAX:
                        _HASHES.popitem(last=False)
            entries.append(FileEntry(fname, st.st_size))
            base = len(pieces)
            pieces.extend(Piece(base + j, index, s.offset, s.length, sha, s.tensor)
                          for j, (s, sha) in enumerate(hashed))
    try:
        return Manifest(name, fmt, tuple(entries), tuple(pieces))
    except ProtocolError as e:  # a local model no manifest can describe (too big, odd names)
        raise CheckpointError(f"{model}: {e.message}") from e
