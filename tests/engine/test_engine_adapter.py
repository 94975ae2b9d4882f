"""LoRA adapters merged at load equal peft's merged model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from p2pllm.engine.errors import ModelError
from p2pllm.engine.loader import load_slice


def _adapter(tiny: Any, out: Path, **lora: Any) -> Any:
    """Save a random (non-zero B) peft LoRA adapter for a copy of the tiny model; return the
    peft model merged, as the oracle."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(tiny.hf), LoraConfig(init_lora_weights=False, **lora))
    peft_model.save_pretrained(out)
    return peft_model.merge_and_unload().eval()


def _ids() -> torch.Tensor:
    return torch.randint(3, 96, (1, 11), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("arch", "lora"), [
    ("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    ("qwen2", {"r": 8, "lora_alpha": 4, "use_rslora": True,
               "target_modules": ["k_proj", "o_proj", "gate_proj", "up_proj"],
               "alpha_pattern": {"o_proj": 32}}),
])
def test_merged_adapter_equals_peft(tiny: dict[str, Any], tmp_path: Path, arch: str,
                                    lora: dict[str, Any]) -> None:
    merged = _adapter(tiny[arch], tmp_path / "adapter", **lora)
    ids, pos = _ids(), torch.arange(11)[None]
    with torch.inference_mode():
        ref = merged(ids).logits
        base = tiny[arch].hf(ids).logits
        ours = load_slice(tiny[arch].path, adapter=tmp_path / "adapter")(ids, pos)
        a = load_slice(tiny[arch].path, layers=(0, 1), adapter=tmp_path / "adapter")
        b = load_slice(tiny[arch].path, layers=(1, 3), adapter=tmp_path / "adapter")
        chained = b(a(ids, pos), pos)
    assert (ref - base).abs().max() > 1e-2  # the adapter matters
    assert (ours - ref).abs().max() < 1e-4
    assert (chained - ref).abs().max() < 1e-4


def test_bad_adapters(tiny: dict[str, Any], tmp_path: Path) -> None:
    path = tiny["llama"].path
    with pytest.raises(ModelError, match=r"adapter_config\.json"):
        load_slice(path, adapter=tmp_path)
    _adapter(tiny["llama"], tmp_path / "dora", r=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ModelError, match="DoRA"):
        load_slice(path, adapter=tmp_path / "dora")
    _adapter(tiny["llama"], tmp_path / "ok", r=2, target_modules=["q_proj"])
    (tmp_path / "ok" / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(ModelError, match="adapter weights"):
        load_slice(path, adapter=tmp_path / "ok")
    _adapter(tiny["llama"], tmp_path / "emb", r=2, target_modules=["embed_tokens"])
    with pytest.raises(ModelError, match="not supported"):
        load_slice(path, adapter=tmp_path / "emb")
    cfg = json.loads((tmp_path / "emb" / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (tmp_path / "emb" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="IA3"):
        load_slice(path, adapter=tmp_path / "emb")
