"""Finding a model's files on this node, and telling which peers advertise a model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from p2pllm.engine.loader import BUNDLED_MODELS_DIR

__all__ = ["advertised_path", "find_model"]


def find_model(ref: str, models_dir: str | None) -> Path | None:
    """The checkpoint directory ``ref`` names on this node: a path, a folder under
    ``models_dir``, or a bundled model. Never the network (no hub download). None if absent."""
    if not ref:
        return None
    candidates = [Path(ref).expanduser()]
    if models_dir:
        candidates.append(Path(models_dir).expanduser() / ref)
    candidates.append(BUNDLED_MODELS_DIR / ref)
    for c in candidates:
        try:
            if (c / "config.json").is_file():
                return c.resolve()
        except OSError:
            continue
    return None


def advertised_path(caps: Mapping[str, Any], ref: str, local_path: Path | None) -> str | None:
    """The path under which a node's capabilities advertise model ``ref`` (matched by name,
    or by the coordinator's resolved path), or None."""
    models = caps.get("models")
    if not isinstance(models, list):
        return None
    for m in models:
        if not isinstance(m, Mapping):
            continue
        path = m.get("path")
        if not isinstance(path, str):
            continue
        if m.get("name") == ref or path == ref or (local_path is not None and path == str(local_path)):
            return path
    return None
