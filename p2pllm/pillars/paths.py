"""Where the training pillars read datasets and write outputs: by name, inside the roots the
daemon's operator configured (issue 12, protocol.md 10 and 11).

- A dataset name is resolved under ``--data-dir`` (:func:`dataset_path`): after
  ``os.path.realpath`` (so neither ``..`` nor a symlink can leave it) the path must lie inside
  the data dir, else ``FORBIDDEN``; a name that is not there is ``NOT_FOUND``; a daemon
  without ``--data-dir`` has no named datasets. The files of a dataset directory are checked
  one by one (:func:`confined_files`).
- An output name (a split-training checkpoint, an FL run) is one path component
  (:data:`OUTPUT_NAME`), written under ``<state_dir>/<kind>/<name>`` only
  (:func:`output_path`). A directory is written into a temporary directory beside it and
  renamed into place (:func:`write_dir`); an existing one is replaced only when it holds the
  :data:`MARKER` file this module writes into every directory it makes, so the daemon never
  deletes a directory it did not create.
- :func:`file_chunks` cuts an output directory into the ``{event: "file", name, offset, size}``
  partial responses a CLI that wants the files receives (it writes them itself:
  ``p2pllm/cli/files.py``).

No torch here: the CLI and the coordinators import it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode

__all__ = [
    "FILE_CHUNK",
    "MARKER",
    "OUTPUT_NAME",
    "confined_files",
    "dataset_path",
    "file_chunks",
    "inside",
    "is_ours",
    "output_name",
    "output_path",
    "send_files",
    "write_dir",
]

OUTPUT_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
_OUTPUT_NAME = re.compile(OUTPUT_NAME)
MARKER = ".p2pllm-output"  # in every output directory the daemon made (JSON: kind, name, job)
FILE_CHUNK = 4 << 20  # bytes of a file per "file" partial response
MAX_DATASET_NAME = 4096


def _forbidden(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.FORBIDDEN, message)


def inside(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """Whether ``path`` lies in ``root`` (or is it), both after os.path.realpath."""
    p, r = os.path.realpath(path), os.path.realpath(root)
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


# -- datasets -----------------------------------------------------------------------------------


def dataset_path(data_dir: str | None, name: str, where: str = "this host") -> Path:
    """The dataset ``name`` under ``data_dir``: FORBIDDEN outside it, NOT_FOUND if absent."""
    if not data_dir:
        raise ProtocolError(ErrorCode.NOT_FOUND,
                            f"{where} has no --data-dir, so no named datasets (dataset {name!r}); "
                            f"send the file's content instead (`train split --data FILE` does)")
    if not name or len(name) > MAX_DATASET_NAME or "\x00" in name:
        raise _forbidden(f"dataset name {name[:64]!r} is not a name under the data dir")
    if os.path.isabs(name) or name.startswith("~") or ".." in Path(name).parts:
        raise _forbidden(f"dataset {name!r}: a dataset is named relative to the data dir of "
                         f"{where}, not by a path (no absolute paths, no '..')")
    root = Path(data_dir).expanduser()
    path = root / name
    if not inside(path, root):
        raise _forbidden(f"dataset {name!r} resolves outside the data dir of {where}")
    if not path.exists():
        raise ProtocolError(ErrorCode.NOT_FOUND,
                            f"dataset {name} does not exist in the data dir of {where}")
    return path


def confined_files(files: list[Path], root: str | os.PathLike[str], name: str) -> list[Path]:
    """``files`` (of a dataset directory), each checked to resolve inside ``root``."""
    for f in files:
        if not inside(f, root):
            raise _forbidden(f"dataset {name!r}: {f.name} resolves outside the data dir")
    return files


# -- outputs ------------------------------------------------------------------------------------


def output_name(name: Any, what: str = "output name") -> str:
    """``name`` if it is one safe path component (:data:`OUTPUT_NAME`), else FORBIDDEN."""
    if not isinstance(name, str) or not _OUTPUT_NAME.fullmatch(name) or ".." in name:
        shown = name[:64] if isinstance(name, str) else type(name).__name__
        raise _forbidden(f"{what} {shown!r} is not a name: 1-100 letters, digits, '.', '_' or '-', "
                         f"starting with a letter or digit, no '..' (outputs are written under "
                         f"the daemon's state dir by name; the CLI writes your directory itself)")
    return name


def output_path(state_dir: str, kind: str, name: str, what: str = "output name",
                require_ours: bool = True) -> Path:
    """``<state_dir>/<kind>/<name>`` for a valid name; FORBIDDEN if it would leave the state dir
    (a symlink) or names something the daemon did not make (``require_ours``: a directory the
    caller will replace; without it, one it only writes files into)."""
    name = output_name(name, what)
    root = Path(state_dir).expanduser() / kind
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    if path.is_symlink() or not inside(path, state_dir) or not inside(root, state_dir):
        raise _forbidden(f"{what} {name!r} resolves outside the state dir")
    if path.exists() and not (path.is_dir() and (is_ours(path) or not require_ours)):
        raise _forbidden(f"{what} {name!r}: {path} exists and was not made by p2pllm "
                         f"(no {MARKER}); choose another name")
    return path


def is_ours(path: Path) -> bool:
    """Whether the directory holds the marker this module writes (a regular file, no link)."""
    m = path / MARKER
    return m.is_file() and not m.is_symlink()


def write_dir(dest: Path, fill: Callable[[Path], None], info: dict[str, Any]) -> Path:
    """Make ``dest`` by ``fill(tmp)`` in a temporary directory beside it, then a rename; an
    existing ``dest`` is replaced only if the daemon made it (:func:`is_ours`)."""
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        fill(tmp)
        (tmp / MARKER).write_text(json.dumps(info))
        if dest.is_symlink() or (dest.exists() and not (dest.is_dir() and is_ours(dest))):
            raise _forbidden(f"{dest} exists and was not made by p2pllm; not replaced")
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def file_chunks(directory: Path, chunk: int = FILE_CHUNK) -> Iterator[tuple[dict[str, Any], bytes]]:
    """The regular files of an output directory (not hidden, not links), sorted, as
    ``({event: "file", name, offset, size}, bytes)`` pieces of at most ``chunk`` bytes (an empty
    file is one piece of 0 bytes)."""
    for f in sorted(directory.iterdir()):
        if f.name.startswith(".") or f.is_symlink() or not f.is_file():
            continue
        size = f.stat().st_size
        with open(f, "rb") as fh:
            offset = 0
            while True:
                data = fh.read(chunk)
                yield {"event": "file", "name": f.name, "offset": offset, "size": size}, data
                offset += len(data)
                if offset >= size or not data:
                    break


async def send_files(req: Any, msg_type: Any, directory: Path) -> int:
    """Stream :func:`file_chunks` of ``directory`` as partial responses to ``req`` (the file
    reads run off the event loop); returns the bytes sent."""
    gen = file_chunks(directory)
    total = 0
    while True:
        item = await asyncio.to_thread(next, gen, None)
        if item is None:
            return total
        meta, data = item
        await req.partial(msg_type, meta, [data] if data else [])
        total += len(data)
