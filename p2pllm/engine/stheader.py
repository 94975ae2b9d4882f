"""The header of a safetensors file, read without torch: where each tensor's bytes lie.

One reader for the engine's loader (:mod:`p2pllm.engine.loader`, which maps names to
tensors) and the weights manifest (:mod:`p2pllm.weights.manifest`, which cuts the file into
pieces); both validate the header against the file size the same way.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from p2pllm.engine.errors import CheckpointError

__all__ = ["safetensors_layout"]


def safetensors_layout(path: Path, size: int | None = None) -> tuple[int, list[tuple[str, int, int]]]:
    """(data start, [(tensor, absolute offset, bytes)]) of a safetensors file of ``size``
    bytes (None: its size now). Raises CheckpointError for a truncated or corrupt header."""
    try:
        if size is None:
            size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is not a safetensors file (truncated)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise CheckpointError(f"{path} is not a safetensors file (bad header length)")
            header = json.loads(fh.read(n))
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt (bad header): {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt (header is not an object)")
    start = 8 + n
    out = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            lo, hi = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path} is corrupt (entry {name!r}): {e}") from e
        if not 0 <= lo <= hi <= size - start:
            raise CheckpointError(f"{path} is corrupt or truncated: tensor {name!r} lies at "
                                  f"bytes [{lo}, {hi}) of a {size - start}-byte data section")
        out.append((name, start + lo, hi - lo))
    return start, out
