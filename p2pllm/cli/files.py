"""Files a job's coordinator streams back to its CLI, written by the CLI on its own host.

A daemon writes only under its state dir (issue 12); a CLI that wants a result as files
(`train split --save DIR`, `fl run --out DIR`) asks for them (``send_files``) and receives
partial responses ``{event: "file", name, offset, size}`` + the bytes ``[offset, offset +
len)`` (protocol.md 10 and 11). :class:`FileSink` checks each piece (one plain file name, the
pieces in order, no more than ``size`` bytes), writes them into a temporary directory beside
DIR and renames it into place at the end. DIR must be absent or empty, unless the user passed
``--overwrite`` (then the old DIR is moved aside and deleted once the new one is in place).
No torch here.
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["FileSink", "OutputError", "check_target", "run_name_from"]

_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class OutputError(Exception):
    """The output directory cannot be written (the message says why)."""


def check_target(path: str | Path, overwrite: bool) -> Path:
    """The absolute output directory; OutputError if it exists and may not be replaced."""
    p = Path(path).expanduser().resolve()
    if p.exists() and not p.is_dir():
        raise OutputError(f"{p} exists and is not a directory")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise OutputError(f"{p} is not empty; choose a new or empty directory, or pass "
                          f"--overwrite to replace it")
    return p


def run_name_from(path: str) -> str:
    """A run/output name from a directory's last component (``fl-<name>`` style cleaned)."""
    base = str(path).rstrip("/").rsplit("/", 1)[-1]
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip("._-").replace("..", "_") or "run"
    return cleaned[:100]


class FileSink:
    """Receives "file" partial responses into a temporary directory beside ``target``."""

    def __init__(self, target: Path, overwrite: bool) -> None:
        self.target = target
        self.overwrite = overwrite
        self.tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        self.sizes: dict[str, int] = {}
        self.written: dict[str, int] = {}
        self.bytes = 0

    def add(self, meta: Mapping[str, Any], payload: memoryview | bytes) -> None:
        name, offset, size = meta.get("name"), meta.get("offset"), meta.get("size")
        if not isinstance(name, str) or not _FILE_NAME.fullmatch(name) or ".." in name:
            raise OutputError(f"the daemon sent a file with a bad name {str(name)[:80]!r}")
        if not (isinstance(offset, int) and isinstance(size, int) and 0 <= offset <= size):
            raise OutputError(f"the daemon sent {name} with a bad offset/size")
        done = self.written.get(name, 0)
        if offset != done or self.sizes.get(name, size) != size or offset + len(payload) > size:
            raise OutputError(f"the daemon sent {name} out of order or past its size")
        self.tmp.mkdir(parents=True, exist_ok=True)
        with open(self.tmp / name, "ab" if offset else "wb") as f:
            f.write(payload)
        self.sizes[name] = size
        self.written[name] = offset + len(payload)
        self.bytes += len(payload)

    def finish(self) -> Path:
        """Check every file is complete and rename the directory into place."""
        short = [n for n, s in self.sizes.items() if self.written.get(n) != s]
        if short or not self.sizes:
            self.discard()
            raise OutputError(f"the daemon sent incomplete files: {short or 'none'}")
        t = check_target(self.target, self.overwrite)
        old = None
        if t.exists():
            old = t.with_name(f".{t.name}.old-{uuid.uuid4().hex[:8]}")
            t.rename(old)
        self.tmp.rename(t)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return t

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
