"""Read a peft LoRA adapter directory and merge it into weights as they load."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from p2pllm.engine.config import ModelConfig
from p2pllm.engine.errors import CheckpointError, ModelError, UnsupportedModelError

__all__ = ["LoraDelta", "load_lora"]

_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoraDelta:
    """``W += scale * B @ A`` for one linear layer; A (r, in), B (out, r)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    def merge(self, weight: torch.Tensor) -> torch.Tensor:
        """The merged weight, computed in float32 and returned in ``weight``'s dtype."""
        if (self.b.shape[0], self.a.shape[1]) != tuple(weight.shape):
            raise ModelError(f"adapter shape {(self.b.shape[0], self.a.shape[1])} does not "
                             f"match the weight {tuple(weight.shape)}")
        merged = weight.float() + self.scale * (self.b.float() @ self.a.float())
        return merged.to(weight.dtype)


def load_lora(adapter_dir: str | Path, config: ModelConfig) -> dict[str, LoraDelta]:
    """LoRA deltas keyed by Hugging Face module name (``model.layers.0.self_attn.q_proj``,
    ``lm_head``), from a directory written by peft's ``save_pretrained``."""
    d = Path(adapter_dir).expanduser()
    cfg_file = d / "adapter_config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{d} is not a peft adapter directory (no adapter_config.json)")
    try:
        cfg: dict[str, Any] = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {cfg_file}: {e}") from e
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UnsupportedModelError(f"adapter type {cfg.get('peft_type')!r} is not supported "
                                    f"(only LoRA)")
    if cfg.get("use_dora") or cfg.get("fan_in_fan_out") or cfg.get("lora_bias"):
        raise UnsupportedModelError("DoRA, fan_in_fan_out and lora_bias adapters are not "
                                    "supported")
    tensors = _read_tensors(d)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise UnsupportedModelError(f"adapter tensor {key!r} is not supported (only LoRA "
                                        f"A/B matrices of linear layers)")
        pairs.setdefault(_hf_module(m["module"]), {})[m["ab"]] = t
    alpha = float(cfg.get("lora_alpha", 8))
    alpha_pattern: dict[str, float] = cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora", False))
    out: dict[str, LoraDelta] = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"adapter module {module!r} lacks its lora_A or lora_B")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"adapter module {module!r}: bad shapes {tuple(a.shape)}, "
                                  f"{tuple(b.shape)}")
        rank = a.shape[0]
        mod_alpha = _pattern(alpha_pattern, module, alpha)
        scale = mod_alpha / (math.sqrt(rank) if rslora else rank)
        out[module] = LoraDelta(a, b, scale)
    if not out:
        raise ModelError(f"adapter {d} holds no LoRA weights")
    return out


def _read_tensors(d: Path) -> dict[str, torch.Tensor]:
    st_file, bin_file = d / "adapter_model.safetensors", d / "adapter_model.bin"
    try:
        if st_file.is_file():
            from safetensors.torch import load_file

            return load_file(str(st_file))
        if bin_file.is_file():
            loaded = torch.load(bin_file, map_location="cpu", weights_only=True)
            return dict(loaded)
    except Exception as e:
        raise CheckpointError(f"cannot read the adapter weights in {d}: {e}") from e
    raise CheckpointError(f"{d} has no adapter_model.safetensors")


def _hf_module(name: str) -> str:
    """peft module path -> Hugging Face module name."""
    name = name.removeprefix("base_model.model.")
    if name.startswith(("layers.", "embed_tokens", "norm")):
        name = "model." + name  # an adapter trained on an engine ModelSlice
    return name


def _pattern(patterns: dict[str, float], module: str, default: float) -> float:
    """peft's rank/alpha pattern lookup: a key matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return float(value)
    return default
