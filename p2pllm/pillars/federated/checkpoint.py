"""The coordinator's checkpoint: global adapter, FedAvgM velocity, round number and metrics.

One safetensors file, replaced atomically after every round: tensors ``global/<name>`` and
``velocity/<name>``, and the run's state as JSON in the file's metadata (key ``p2pllm_fl``).
A crash leaves either the previous round's file or this round's, never a mix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

FORMAT = "p2pllm-fl-checkpoint-v1"
FILENAME = "checkpoint.safetensors"
_GLOBAL, _VELOCITY = "global/", "velocity/"


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be used."""


@dataclass(frozen=True)
class Checkpoint:
    round: int  # rounds finished
    config: dict[str, Any]  # the RunConfig (to_meta) the run was started with
    rounds: list[dict[str, Any]]  # one metrics record per finished round
    global_adapter: dict[str, Tensor]
    velocity: dict[str, Tensor] | None = None
    initial_eval_loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {_GLOBAL + k: v.detach().cpu().contiguous() for k, v in ckpt.global_adapter.items()}
    for k, v in (ckpt.velocity or {}).items():
        tensors[_VELOCITY + k] = v.detach().cpu().contiguous()
    state = {
        "format": FORMAT,
        "round": ckpt.round,
        "config": ckpt.config,
        "rounds": ckpt.rounds,
        "initial_eval_loss": ckpt.initial_eval_loss,
        "has_velocity": ckpt.velocity is not None,
        "extra": ckpt.extra,
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"p2pllm_fl": json.dumps(state)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> Checkpoint | None:
    """The checkpoint at ``path``, or None if there is none. CheckpointError if unreadable."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta: Mapping[str, str] = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        state = json.loads(meta["p2pllm_fl"])
    except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read FL checkpoint {path}: {exc}") from exc
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file (format {state.get('format')!r})")
    glob = {k[len(_GLOBAL):]: v for k, v in tensors.items() if k.startswith(_GLOBAL)}
    vel = {k[len(_VELOCITY):]: v for k, v in tensors.items() if k.startswith(_VELOCITY)}
    if not glob:
        raise CheckpointError(f"{path} holds no global adapter")
    return Checkpoint(
        round=int(state["round"]),
        config=dict(state["config"]),
        rounds=list(state["rounds"]),
        global_adapter=glob,
        velocity=vel if state.get("has_velocity") else None,
        initial_eval_loss=state.get("initial_eval_loss"),
        extra=dict(state.get("extra") or {}),
    )
