"""Models the speculative roles of one daemon share: loaded once, reference-counted.

Several jobs on one node (several drafter sessions, or a drafter and a verifier of the same
checkpoint) use one copy of the weights. Forward passes on a shared model are serialised by
its lock: they run in worker threads, and torch already spreads one pass over the node's
threads.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from p2pllm.daemon.modelrefs import ModelRoots
from p2pllm.engine.config import ModelConfig
from p2pllm.engine.errors import ModelError
from p2pllm.engine.loader import load_slice, weight_bytes
from p2pllm.engine.model import ModelSlice
from p2pllm.wire.tensors import COMPUTE_DTYPES, torch_dtype

__all__ = ["LoadedModel", "ModelCache", "find_local_model", "model_bytes"]

log = logging.getLogger(__name__)


def find_local_model(name: str, config: Any) -> Path | None:
    """The checkpoint directory ``name`` stands for on this host, or None: inside the roots of
    ``config`` (a DaemonConfig, or one models dir; :class:`~p2pllm.daemon.modelrefs.ModelRoots`:
    never the network). FORBIDDEN for a path outside them."""
    found = ModelRoots.of(config).find(name)
    return found.path if found is not None else None


def model_bytes(path: Path, dtype: str = "float32", quant: str | None = None,
                device: str = "cpu") -> int:
    """Bytes of weights a load of ``path`` as ``dtype`` / ``quant`` holds (the engine's one
    estimate, :func:`p2pllm.engine.loader.weight_bytes`; GGUF models included)."""
    return weight_bytes(path, torch_dtype(dtype), quant, device=device)


@dataclass(eq=False)
class LoadedModel:
    """One loaded model and the lock its forward passes take."""

    key: tuple[str, str, str, str]  # (path, dtype, device, quant)
    model: ModelSlice
    config: ModelConfig
    nbytes: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    refs: int = 0

    @property
    def path(self) -> str:
        return self.key[0]


class ModelCache:
    """Reference-counted loaded models, keyed by (resolved path, dtype, device, quant)."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str, str, str], LoadedModel] = {}
        self._loading: dict[tuple[str, str, str, str], asyncio.Future[LoadedModel]] = {}

    async def acquire(self, path: Path, dtype: str = "float32", device: str = "cpu",
                      quant: str = "none") -> LoadedModel:
        """Load (or share) a whole model; pair every acquire with one release.

        ``path``: a resolved checkpoint directory (as :func:`find_local_model` returns).
        """
        if dtype not in COMPUTE_DTYPES:
            raise ModelError(f"dtype {dtype!r} is not supported; choose one of "
                             f"{sorted(COMPUTE_DTYPES)}")
        key = (str(path), dtype, device, quant)
        while True:
            loaded = self._models.get(key)
            if loaded is not None:
                loaded.refs += 1
                return loaded
            pending = self._loading.get(key)
            if pending is None:
                break
            await asyncio.shield(pending)  # someone else is loading it: share theirs
        fut: asyncio.Future[LoadedModel] = asyncio.get_running_loop().create_future()
        self._loading[key] = fut
        try:
            model = await asyncio.to_thread(load_slice, path, dtype=torch_dtype(dtype), device=device,
                                            quant=quant)
            loaded = LoadedModel(key, model, model.config, _param_bytes(model), refs=1)
            self._models[key] = loaded
            fut.set_result(loaded)
            log.info("loaded %s (%s, %s, %.1f MB)", path, dtype, device, loaded.nbytes / 1e6)
            return loaded
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        finally:
            self._loading.pop(key, None)

    def release(self, loaded: LoadedModel) -> None:
        loaded.refs -= 1
        if loaded.refs <= 0 and self._models.get(loaded.key) is loaded:
            del self._models[loaded.key]
            log.info("unloaded %s", loaded.path)

    def loaded(self) -> Mapping[tuple[str, str, str, str], LoadedModel]:
        return dict(self._models)


def _param_bytes(model: ModelSlice) -> int:
    """Bytes the loaded model's weights take: its parameters, and its quantized linears'
    codes and scales (not parameters)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    qweights = {id(q): q for m in model.modules() if (q := getattr(m, "qweight", None)) is not None}
    return total + sum(q.nbytes() for q in qweights.values())


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def describe(loaded: LoadedModel) -> dict[str, Any]:
    c = loaded.config
    return {"path": loaded.path, "layers": c.num_layers, "vocab": c.vocab_size,
            "dtype": loaded.key[1], "device": loaded.key[2], "quant": loaded.key[3]}


# The daemon process's shared models (roles of every job on this node use it).
MODELS = ModelCache()
