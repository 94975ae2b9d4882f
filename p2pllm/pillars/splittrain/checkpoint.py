"""Writing a split-training checkpoint: the stages' tensors assembled into one Hugging Face
checkpoint (or a peft adapter with LoRA), written beside the destination and renamed into
place, so a reader never sees half a checkpoint."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from p2pllm.engine.config import ModelConfig
from p2pllm.engine.errors import ModelError
from p2pllm.engine.model import ModelSlice
from p2pllm.pillars.splittrain.compute import save_adapter
from p2pllm.pillars.splittrain.messages import RunSpec
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode

__all__ = ["check_save_dir", "write_checkpoint"]


def write_checkpoint(dest: Path, tensors: dict[str, torch.Tensor], config_raw: dict[str, Any],
                      files: Mapping[str, bytes], spec: RunSpec, job_id: str) -> None:
    """Write the assembled checkpoint beside ``dest`` and rename it into place."""
    dest = dest.expanduser()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{job_id}-{uuid.uuid4().hex[:6]}")
    try:
        if spec.lora is not None:
            save_adapter(tensors, spec.lora, tmp, base_model=spec.model)
        else:
            _write_full(tmp, tensors, config_raw)
        for name, data in files.items():
            if "/" in name or name.startswith("."):
                continue
            (tmp / name).write_bytes(data)
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def _replace_dir(tmp: Path, dest: Path) -> None:
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:6]}")
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dest)


def check_save_dir(path: str) -> None:
    """A --save directory must be new, empty, or a checkpoint this trainer may replace."""
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
