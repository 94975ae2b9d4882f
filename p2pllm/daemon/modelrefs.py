"""Model and adapter references: names cross the wire, paths stay inside the operator's roots.

Every request that names a model or an adapter on a daemon (GENERATE, FL_RUN, TRAIN_RUN, the
ASSIGN params of every role) is resolved here, by the daemon that receives it, and only inside
the roots its operator configured:

- models: the models dir(s) (``--models-dir``, repeatable; ``models_dir`` / ``models_dirs`` in
  the config file), the pulled-models dir (``p2pllm models pull``), the bundled models
  (``p2pllm/models``), and the Hugging Face hub cache (a hub id already there). A hub id that
  is not cached is downloaded only when the daemon was started with ``--allow-hub``, and
  :meth:`ModelRoots.resolve` (which may download) must run in a thread, never on the event
  loop (:meth:`ModelRoots.aresolve` does that);
- adapters: ``<state dir>/adapters`` and the models dirs. The state dir is where this daemon's
  own runs write (what it trained is its operator's), and the models dirs are where an operator
  already puts checkpoints by hand; nothing else (not the pulled or bundled models, which hold
  no adapters, not the hub cache).

A name is a relative path under a root (``tiny``, ``org/model``), or a hub id. A path (absolute,
or starting with ``.`` or ``~``, or with a ``..`` part) is accepted only if its real path (after
``os.path.realpath``: symlinks and ``..`` cannot escape) lies inside a root; so is a name: a
symlink inside a models dir that points outside every root is refused (one into another root,
e.g. a models dir linking a bundled model, is fine). Refusals are typed:
``FORBIDDEN`` for a path outside the roots (naming them and how to add one), ``NOT_FOUND`` for
an unknown name (saying where it looked). Coordinators send members :attr:`ModelRef.name`, the
name under the root (or the hub id), never their own local path. No torch at import time.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from p2pllm.engine.registry import BUNDLED_MODELS_DIR, HUB_PATTERNS
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode

__all__ = [
    "ADD_ROOT_HINT",
    "BUNDLED_DIR",
    "ModelRef",
    "ModelRoots",
    "cli_model_ref",
    "config_models_dirs",
    "is_path_ref",
    "looks_like_hub_id",
]

log = logging.getLogger(__name__)

BUNDLED_DIR = BUNDLED_MODELS_DIR
MAX_REF = 4096
ADD_ROOT_HINT = "the operator can add a root with `p2pllmd --models-dir DIR` (repeatable)"


@dataclass(frozen=True)
class ModelRef:
    """A model (or adapter) reference resolved on this daemon."""

    name: str  # what crosses the wire: the relative path under its root, or the hub id
    path: Path  # the real path here (a checkpoint folder, or a .gguf file)
    root: str  # which root: "models-dir", "pulled", "bundled", "hf-cache", "adapters"


def is_path_ref(ref: str) -> bool:
    """Whether ``ref`` is a path rather than a name: absolute, ``.``/``~``-relative, or with a
    ``..`` part (a name never climbs out of its root)."""
    return (ref.startswith(("/", ".", "~", "\\")) or "\\" in ref
            or any(part == ".." for part in ref.split("/")))


def looks_like_hub_id(ref: str) -> bool:
    """``name`` or ``org/name`` of letters, digits and ``-_.`` (not a path)."""
    if not ref or is_path_ref(ref) or ref.count("/") > 1:
        return False
    return all(part and part not in (".", "..") and all(c.isalnum() or c in "-_." for c in part)
               for part in ref.split("/"))


def is_model_at(p: Path) -> bool:
    """A Hugging Face checkpoint folder (config.json), a GGUF file, or a folder holding one."""
    try:
        if p.is_file():
            return p.suffix.lower() == ".gguf"
        return p.is_dir() and ((p / "config.json").is_file()
                               or any(f.is_file() for f in p.glob("*.gguf")))
    except OSError:
        return False


def is_adapter_at(p: Path) -> bool:
    """A peft adapter folder (adapter_config.json)."""
    try:
        return p.is_dir() and (p / "adapter_config.json").is_file()
    except OSError:
        return False


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def config_models_dirs(config: Any) -> tuple[str, ...]:
    """The models dirs of a DaemonConfig: ``models_dir`` then ``models_dirs``, without
    repeats."""
    dirs: list[str] = []
    first = getattr(config, "models_dir", None)
    for d in ([first] if first else []) + list(getattr(config, "models_dirs", ()) or ()):
        if d and d not in dirs:
            dirs.append(str(d))
    return tuple(dirs)


def _hub_cache_dir() -> Path | None:
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a dependency of transformers
        return None
    return Path(constants.HF_HUB_CACHE)


class ModelRoots:
    """The roots one daemon resolves model and adapter references in (see the module doc)."""

    def __init__(self, models_dirs: Iterable[str | Path] = (), *,
                 pulled: str | Path | None = None, bundled: str | Path | None = BUNDLED_DIR,
                 hub_cache: str | Path | None = None, allow_hub: bool = False,
                 adapters_dirs: Iterable[str | Path] = ()) -> None:
        self.models_dirs = tuple(Path(d).expanduser() for d in models_dirs)
        self.pulled = Path(pulled).expanduser() if pulled is not None else None
        self.bundled = Path(bundled) if bundled is not None else None
        self.hub_cache = Path(hub_cache).expanduser() if hub_cache is not None else None
        self.allow_hub = allow_hub
        self.adapters_dirs = tuple(Path(d).expanduser() for d in adapters_dirs)

    @classmethod
    def of(cls, config: Any) -> ModelRoots:
        """The roots of a DaemonConfig (models dirs, pulled, bundled, hub cache, adapters);
        given one models dir (a str or Path, or None): that, pulled, bundled, hub cache."""
        from p2pllm.engine.registry import pulled_models_dir

        if config is None or isinstance(config, str | os.PathLike):
            config = SimpleNamespace(models_dir=os.fspath(config) if config else None)
        dirs = config_models_dirs(config)
        state = getattr(config, "state_dir", None)
        adapters = ([Path(state).expanduser() / "adapters"] if state else []) + [Path(d) for d in dirs]
        return cls(dirs, pulled=pulled_models_dir(), hub_cache=_hub_cache_dir(),
                   allow_hub=bool(getattr(config, "allow_hub", False)), adapters_dirs=adapters)

    # -- the roots ----------------------------------------------------------------------------

    def model_roots(self) -> list[tuple[str, Path]]:
        """(kind, dir) of every model root, in lookup order (the hub cache last)."""
        out = [("models-dir", d) for d in self.models_dirs]
        if self.pulled is not None:
            out.append(("pulled", self.pulled))
        if self.bundled is not None:
            out.append(("bundled", self.bundled))
        if self.hub_cache is not None:
            out.append(("hf-cache", self.hub_cache))
        return out

    def adapter_roots(self) -> list[tuple[str, Path]]:
        return [("adapters", d) for d in self.adapters_dirs]

    def describe(self, adapters: bool = False) -> str:
        roots = self.adapter_roots() if adapters else self.model_roots()
        return ", ".join(f"{kind} {d}" for kind, d in roots) or "none"

    # -- models -------------------------------------------------------------------------------

    def find(self, ref: object) -> ModelRef | None:
        """The model ``ref`` names inside the roots, or None when no root has it (no network,
        no download: a hub id counts only if it is in the hub cache). Raises ProtocolError:
        BAD_REQUEST for a malformed reference, FORBIDDEN for one that resolves outside the
        roots, NOT_FOUND for a path inside a root that is not a model."""
        text = _check_ref(ref, "model")
        roots = [(k, d) for k, d in self.model_roots() if k != "hf-cache"]
        if is_path_ref(text):
            return self._path(text, self.model_roots(), is_model_at, "model")
        found = self._name(text, roots, is_model_at, "model")
        if found is not None:
            return found
        if looks_like_hub_id(text) and "/" in text:
            return self._hub_cached(text)
        return None

    def may_fetch(self, ref: object) -> bool:
        """Whether :meth:`resolve` would try to download ``ref`` (a hub id, --allow-hub)."""
        return self.allow_hub and isinstance(ref, str) and looks_like_hub_id(ref) and "/" in ref

    def resolve(self, ref: object) -> ModelRef:
        """:meth:`find`, then (with --allow-hub) a hub download; NOT_FOUND saying where it
        looked. May block on the network: call it in a thread (:meth:`aresolve`)."""
        found = self.find(ref)
        if found is not None:
            return found
        text = str(ref)
        if self.may_fetch(text):
            return self._download(text)
        hub = ""
        if looks_like_hub_id(text) and "/" in text:
            hub = (" It looks like a Hugging Face hub id: it is not in the hub cache, and this "
                   "daemon downloads hub models only when started with --allow-hub.")
        raise ProtocolError(ErrorCode.NOT_FOUND, (
            f"model {text!r} is not on this host: looked under {self.describe()}.{hub} "
            f"Put it in a models dir ({ADD_ROOT_HINT})."))

    async def aresolve(self, ref: object) -> ModelRef:
        """:meth:`resolve` in a thread: a hub lookup or download never blocks the loop."""
        return await asyncio.to_thread(self.resolve, ref)

    async def alocal(self, ref: object) -> ModelRef | None:
        """What a coordinator holds of ``ref`` here, in a thread: :meth:`find`, then (with
        --allow-hub) the download; None when this host lacks it (a member may have it).
        FORBIDDEN for a path outside the roots."""
        found = await asyncio.to_thread(self.find, ref)
        if found is None and self.may_fetch(ref):
            found = await self.aresolve(ref)
        return found

    def check_adapter(self, meta: Any, mode: str) -> None:
        """A GENERATE ``adapter`` in a mode that does not merge adapters: checked like any
        adapter reference (FORBIDDEN outside the adapter roots, NOT_FOUND when unknown), then
        BAD_REQUEST saying so (the adapter is not silently left out)."""
        ref = meta.get("adapter") if hasattr(meta, "get") else None
        if ref is None:
            return
        self.adapter(ref)
        raise ProtocolError(ErrorCode.BAD_REQUEST, (
            f"mode {mode} does not merge adapters: run --mode local with --adapter, or merge "
            f"the adapter into a checkpoint first"))

    # -- adapters -----------------------------------------------------------------------------

    def adapter(self, ref: object) -> ModelRef:
        """The peft adapter folder ``ref`` names under the adapter roots; FORBIDDEN outside
        them, NOT_FOUND when no root has it."""
        text = _check_ref(ref, "adapter")
        roots = self.adapter_roots()
        found: ModelRef | None
        if is_path_ref(text):
            found = self._path(text, roots, is_adapter_at, "adapter")
        else:
            found = self._name(text, roots, is_adapter_at, "adapter")
        if found is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, (
                f"adapter {text!r} is not on this host: looked under "
                f"{self.describe(adapters=True)} (a folder with adapter_config.json)"))
        return found

    # -- the lookups --------------------------------------------------------------------------

    def _path(self, text: str, roots: Sequence[tuple[str, Path]], ok: Any,
              what: str) -> ModelRef:
        real = os.path.realpath(os.path.expanduser(text))
        for kind, root in roots:
            rroot = os.path.realpath(root)
            if not _inside(real, rroot):
                continue
            rel = os.path.relpath(real, rroot)
            name = _hub_name(rel) if kind == "hf-cache" else (None if rel == "." else rel)
            if name is None or not ok(Path(real)):
                raise ProtocolError(ErrorCode.NOT_FOUND, (
                    f"{what} {text!r} lies inside the {kind} root {root} but is not a "
                    f"{what} there" + (" (a folder with config.json, or a .gguf model)"
                                       if what == "model" else " (adapter_config.json)")))
            return ModelRef(name, Path(real), kind)
        raise self._forbidden(text, what, roots)

    def _name(self, text: str, roots: Sequence[tuple[str, Path]], ok: Any,
              what: str) -> ModelRef | None:
        """``text`` under the first root that has it; its real path must lie inside a root
        (a link from one root into another is fine, one out of them all is FORBIDDEN)."""
        escaped = False
        inside = [os.path.realpath(d) for _, d in
                  (self.adapter_roots() if what == "adapter" else self.model_roots())]
        for kind, root in roots:
            cand = root / text
            if not os.path.lexists(cand):
                continue
            real = os.path.realpath(cand)
            if not any(_inside(real, r) for r in inside):
                escaped = True  # a symlink under the root pointing outside the roots
                continue
            if ok(Path(real)):
                return ModelRef(text, Path(real), kind)
        if escaped:
            raise self._forbidden(text, what, roots, symlink=True)
        return None

    def _forbidden(self, text: str, what: str, roots: Sequence[tuple[str, Path]],
                   symlink: bool = False) -> ProtocolError:
        how = ("is a link under a root that points outside the roots" if symlink
               else "is a path outside the roots")
        listed = ", ".join(f"{kind} {d}" for kind, d in roots) or "none"
        return ProtocolError(ErrorCode.FORBIDDEN, (
            f"{what} {text!r} {how}; this daemon reads {what}s only under: {listed}. "
            f"Send a name under a root, or {ADD_ROOT_HINT}"
            + (" (adapters: also <state dir>/adapters)" if what == "adapter" else "") + "."))

    def _hub_cached(self, repo_id: str) -> ModelRef | None:
        """A hub id already in the hub cache (no network)."""
        if self.hub_cache is None:
            return None
        folder = self.hub_cache / ("models--" + repo_id.replace("/", "--"))
        if not folder.is_dir():
            return None
        try:
            from huggingface_hub import snapshot_download

            got = snapshot_download(repo_id, local_files_only=True, allow_patterns=HUB_PATTERNS,
                                    cache_dir=str(self.hub_cache))
        except Exception as exc:  # not (fully) cached
            log.debug("%s is not in the hub cache: %s", repo_id, exc)
            return None
        return self._checked_hub(repo_id, Path(got))

    def _download(self, repo_id: str) -> ModelRef:
        try:
            from huggingface_hub import snapshot_download

            got = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS,
                                    cache_dir=str(self.hub_cache) if self.hub_cache else None)
        except Exception as exc:
            raise ProtocolError(ErrorCode.NOT_FOUND, (
                f"model {repo_id!r} is not under {self.describe()}, and the download from the "
                f"Hugging Face hub failed: {type(exc).__name__}: {exc}")) from None
        return self._checked_hub(repo_id, Path(got))

    def _checked_hub(self, repo_id: str, got: Path) -> ModelRef:
        real = Path(os.path.realpath(got))
        if self.hub_cache is not None and not _inside(str(real), os.path.realpath(self.hub_cache)):
            raise ProtocolError(ErrorCode.FORBIDDEN, f"model {repo_id!r}: the hub cache entry "
                                f"points outside the hub cache {self.hub_cache}")
        if not is_model_at(real):
            raise ProtocolError(ErrorCode.NOT_FOUND, f"model {repo_id!r} in the hub cache "
                                f"({real}) is not a checkpoint (no config.json)")
        return ModelRef(repo_id, real, "hf-cache")


def _check_ref(ref: object, what: str) -> str:
    if not isinstance(ref, str) or not ref.strip():
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{what} must be a non-empty name")
    if len(ref) > MAX_REF or "\x00" in ref:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{what} must be a name of at most "
                            f"{MAX_REF} characters, without NUL")
    return ref


def _hub_name(rel: str) -> str | None:
    """``models--org--name/snapshots/<rev>`` (a hub cache path) -> ``org/name``."""
    parts = rel.split(os.sep)
    if len(parts) == 3 and parts[0].startswith("models--") and parts[1] == "snapshots":
        return parts[0].removeprefix("models--").replace("--", "/", 1)
    return None


def cli_model_ref(ref: str | None) -> str | None:
    """What a CLI sends its daemon for ``--model`` / ``--adapter``: a path that exists here
    becomes absolute and real (the daemon's working directory is not the user's; the daemon
    then accepts it only inside its roots and answers FORBIDDEN, naming them, otherwise); a
    name is sent as it is."""
    if ref is None or not is_path_ref(ref):
        return ref
    p = os.path.expanduser(ref)
    return os.path.realpath(p) if os.path.exists(p) else ref
