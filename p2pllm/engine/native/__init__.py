"""Native decode kernels (``kernels.cpp``), compiled on first use with the host's C++
compiler through :func:`torch.utils.cpp_extension.load` and cached per source and CPU.

``P2PLLM_NATIVE=0`` turns them off (the engine then runs torch's own kernels);
``P2PLLM_NATIVE=1`` makes a failed build an error instead of a logged fallback.
``P2PLLM_KERNEL_DIR`` moves the build cache (default ``~/.cache/p2pllm/kernels``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["MAX_ROWS", "NativeBuildError", "built", "kernels"]

log = logging.getLogger(__name__)
MAX_ROWS = 16  # the kernels' largest M (kernels.cpp kMaxRows)
_SOURCE = Path(__file__).with_name("kernels.cpp")
_lock = threading.Lock()
_STALE_LOCK_S = 900  # a build takes ~1 min (a few on a loaded machine)
_state: dict[str, Any] = {}


class NativeBuildError(RuntimeError):
    """The native kernels could not be built (and P2PLLM_NATIVE=1 asked for them)."""


def _cpu_tag() -> str:
    """What the build depends on besides the source: machine, CPU flags, torch version,
    the Python ABI (two Pythons sharing the cache would otherwise rebuild over each other's
    module, ninja seeing another include path each time) and the compiler flags."""
    import torch

    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return (f"{platform.machine()}|{flags}|{torch.__version__}|{sys.implementation.cache_tag}"
            f"|{' '.join(_cflags())}")


def _cflags() -> list[str]:
    flags = ["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off", "-Wno-maybe-uninitialized"]
    if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
        flags.append("-march=native" if platform.machine() in ("x86_64", "AMD64")
                     else "-mcpu=native")
    return flags


def _ninja_on_path() -> None:
    """torch's cpp_extension runs ``ninja`` from PATH. The ``ninja`` wheel (an install
    requirement) puts it beside the interpreter, which is not on PATH when a virtualenv's
    ``p2pllmd`` runs without the venv activated (by its path, from a service): add it."""
    if shutil.which("ninja"):
        return
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja  # type: ignore[import-not-found]

        dirs.insert(0, str(ninja.BIN_DIR))
    except Exception:  # not installed, or a wheel without BIN_DIR
        pass
    for d in dirs:
        if shutil.which("ninja", path=d):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return


def _build() -> Any:
    from torch.utils import cpp_extension

    _ninja_on_path()

    src = _SOURCE.read_bytes()
    digest = hashlib.sha256(src + _cpu_tag().encode()).hexdigest()[:16]
    root = Path(os.environ.get("P2PLLM_KERNEL_DIR") or Path.home() / ".cache/p2pllm/kernels")
    build = root / digest
    build.mkdir(parents=True, exist_ok=True)
    lock = build / "lock"  # torch's FileBaton: a build killed midway leaves it behind,
    try:  # and every later load would wait on it forever
        if time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
            lock.unlink(missing_ok=True)
            log.warning("removed a stale native build lock %s", lock)
    except OSError:
        pass
    return cpp_extension.load(name=f"p2pllm_kernels_{digest}", sources=[str(_SOURCE)],
                              extra_cflags=_cflags(), extra_ldflags=["-fopenmp"],
                              build_directory=str(build), verbose=False)


def kernels() -> Any | None:
    """The compiled module (``linear_dense``, ``linear_int8``, ``linear_int4``), or None when
    turned off or not buildable here (logged once)."""
    mode = os.environ.get("P2PLLM_NATIVE", "")
    if mode == "0":
        return None
    mod = _state.get("mod")
    if mod is not None or "error" in _state:
        if mod is None and mode == "1":
            raise NativeBuildError(_state["error"])
        return mod
    with _lock:
        if "mod" not in _state and "error" not in _state:
            try:
                _state["mod"] = _build()
            except Exception as e:  # no compiler, no headers, a compile error
                _state["error"] = f"native kernels not built ({type(e).__name__}: {e})"
                log.warning("%s; using torch's kernels", _state["error"])
    if _state.get("mod") is None and mode == "1":
        raise NativeBuildError(_state["error"])
    return _state.get("mod")


def built() -> Any | None:
    """The module if this process has built or loaded it, whatever P2PLLM_NATIVE says now:
    weights already in the native layout keep their kernels."""
    return _state.get("mod")
