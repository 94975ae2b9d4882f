"""What this host can do: device, memory, a measured compute score, models, FL data."""

from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

log = logging.getLogger(__name__)


def device_kind() -> str:
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def memory_bytes() -> tuple[int, int]:
    """(total, available) system memory in bytes; CUDA device memory when on CUDA."""
    if device_kind() == "cuda":
        free, total = torch.cuda.mem_get_info()
        return int(total), int(free)
    try:
        info: dict[str, int] = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
        return info["MemTotal"], info.get("MemAvailable", info["MemFree"])
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(pages), int(pages // 2)


def compute_score(seconds: float = 0.2, threads: int = 0) -> float:
    """GFLOP/s of a float32 matmul, measured for about `seconds` (0 = skip, score 0)."""
    if seconds <= 0:
        return 0.0
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        dev = "cuda" if device_kind() == "cuda" else "cpu"
        n = 256
        a = torch.randn(n, n, device=dev)
        b = torch.randn(n, n, device=dev)
        a @ b  # warm up
        iters = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            iters += 1
        if dev == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        return round(2 * n**3 * iters / dt / 1e9, 2)
    finally:
        torch.set_num_threads(old)


def scan_models(config_or_dir: Any) -> list[dict[str, Any]]:
    """Models found in the models dir(s), the pulled-models dir and the bundled ones, as plain
    dicts for HELLO. Given a DaemonConfig: its roots (modelrefs.ModelRoots), a folder that is
    a link out of its root left out (requests could not use it). The "path" is for the
    operator's status view: another node sends the name, never opens this path."""
    try:
        from p2pllm.engine.loader import list_models
    except ImportError:  # pragma: no cover - engine not importable
        return []
    from p2pllm.daemon.modelrefs import ModelRoots, config_models_dirs

    config = config_or_dir
    if config is None or isinstance(config, str | Path):  # one models dir
        config = SimpleNamespace(models_dir=str(config) if config else None)
    dirs = config_models_dirs(config)
    roots = ModelRoots.of(config)
    try:
        found = list_models(list(dirs))
    except Exception as exc:  # a broken dir must not stop the daemon
        log.warning("cannot scan models dirs %s: %s", dirs, exc)
        return []
    out = []
    for m in found:
        try:
            ok = roots.find(m.name) is not None
        except Exception as exc:  # a link out of its root: FORBIDDEN for requests
            log.warning("models: %s is not offered: %s", m.name, exc)
            ok = False
        if ok:
            out.append({
                "name": m.name,
                "path": str(m.path),
                "model_type": m.model_type,
                "num_layers": m.num_layers,
                "param_bytes": m.param_bytes,
                "format": m.format,
                "disk_bytes": _disk_bytes(m.path),  # what fetching it whole moves (issue 16)
            })
    return out


def _disk_bytes(path: Path) -> int:
    from p2pllm.daemon.cluster import model_disk_bytes

    return model_disk_bytes(path)


def scan_fl_data(data_dir: str | None) -> dict[str, Any]:
    """Whether this host has federated-learning data, and how much (files, bytes, examples).

    ``examples`` is an estimate (bytes / ~4 per token / 128-token blocks) made without reading
    the files; an fl-client reports the exact count once it has tokenized them.
    """
    if not data_dir or not Path(data_dir).is_dir():
        return {"present": False, "files": 0, "bytes": 0, "examples": 0}
    files = [
        p for p in Path(data_dir).rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl")
    ]
    nbytes = sum(p.stat().st_size for p in files)
    try:
        from p2pllm.pillars.federated.data import estimate_examples

        examples = estimate_examples(nbytes)
    except ImportError:  # pragma: no cover - pillar not importable
        examples = 0
    return {"present": bool(files), "files": len(files), "bytes": nbytes, "examples": examples}


def measure(config: Any) -> dict[str, Any]:
    """The capability map sent in HELLO."""
    total, free = memory_bytes()
    budget = config.memory_budget or free
    return {
        "device": device_kind(),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpus": os.cpu_count() or 1,
        "threads": config.threads or torch.get_num_threads(),
        "mem_total": total,
        "mem_free": free,
        "mem_budget": budget,
        "mem_used_by_roles": 0,
        "compute_score": compute_score(config.compute_bench_seconds, config.threads),
        "models": scan_models(config),
        "fl_data": scan_fl_data(config.data_dir),
        "accepts": sorted(config.roles),
        "roles_held": [],
        # serves its models' pieces to peers and fetches the pieces a role needs (section 13):
        # planners place roles for a model on a node without it only when both ends say so
        "weights": True,
    }
