"""Writing a split-training checkpoint: the stages' tensors assembled into one Hugging Face
checkpoint (or a peft adapter with LoRA), written beside the destination and renamed into
place, so a reader never sees half a checkpoint. The destination is
``<state_dir>/checkpoints/<name>`` (:func:`p2pllm.pillars.paths.output_path`); an existing
one is replaced only if this daemon made it (:func:`p2pllm.pillars.paths.write_dir`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from p2pllm.engine.config import ModelConfig
from p2pllm.engine.errors import ModelError
from p2pllm.engine.model import ModelSlice
from p2pllm.pillars.paths import write_dir
from p2pllm.pillars.splittrain.compute import save_adapter
from p2pllm.pillars.splittrain.messages import RunSpec
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode

__all__ = ["CHECKPOINTS", "check_save_dir", "write_checkpoint"]

CHECKPOINTS = "checkpoints"  # <state_dir>/checkpoints/<name>


def write_checkpoint(dest: Path, tensors: dict[str, torch.Tensor], config_raw: dict[str, Any],
                      files: Mapping[str, bytes], spec: RunSpec, job_id: str) -> None:
    """Write the assembled checkpoint beside ``dest`` and rename it into place."""

    def fill(tmp: Path) -> None:
        if spec.lora is not None:
            save_adapter(tensors, spec.lora, tmp, base_model=spec.model)
        else:
            _write_full(tmp, tensors, config_raw)
        for name, data in files.items():
            if "/" in name or "\\" in name or name.startswith("."):
                continue
            (tmp / name).write_bytes(data)

    write_dir(dest, fill, {"kind": CHECKPOINTS, "name": dest.name, "job": job_id})


def _write_full(out: Path, tensors: dict[str, torch.Tensor], config_raw: dict[str, Any]) -> None:
    from p2pllm.engine.loader import save_hf_checkpoint

    config = ModelConfig.from_dict(dict(config_raw))
    with torch.device("meta"):
        model = ModelSlice(config)
    state = {}
    for key, t in tensors.items():
        name = key.removeprefix("model.") if key.startswith("model.") else key
        state[name] = t
    missing, _ = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still = [n for n, p in model.named_parameters() if p.is_meta]
    if still:
        raise ModelError(f"the stages did not send every tensor: missing {still[:5]}")
    save_hf_checkpoint([model], config, out)


def check_save_dir(path: str) -> None:
    """A local ``train local --save`` directory (the user's own process) must be new, empty, or
    a checkpoint this trainer may replace."""
    p = Path(path).expanduser()
    if not p.exists():
        return
    if not p.is_dir():
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"--save {p} exists and is not a directory")
    if any(p.iterdir()) and not ((p / "config.json").is_file()
                                 or (p / "adapter_config.json").is_file()):
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f"--save {p} is a non-empty directory that is not a checkpoint; "
                            f"choose a new or empty directory")
