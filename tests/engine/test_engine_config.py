"""ModelConfig from config.json, and rotary frequencies against transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from p2pllm.engine.config import ModelConfig
from p2pllm.engine.errors import ModelError, UnsupportedModelError
from p2pllm.engine.rope import inv_freq

BASE: dict[str, Any] = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64,
                        "intermediate_size": 128, "num_hidden_layers": 4,
                        "num_attention_heads": 8, "max_position_embeddings": 256}


def test_defaults_and_derived_fields() -> None:
    c = ModelConfig.from_dict(BASE)
    assert (c.num_kv_heads, c.head_dim, c.num_layers) == (8, 8, 4)
    assert c.rope_theta == 10000.0 and c.rope_scaling is None and c.rope_type == "default"
    assert c.eos_token_ids == (2,) and c.bos_token_id == 1  # llama defaults
    assert not c.attention_bias and not c.qk_norm and c.sliding_windows == (None,) * 4


def test_both_rope_layouts_read_the_same() -> None:
    v4 = ModelConfig.from_dict({**BASE, "rope_theta": 5e5, "rope_scaling": {
        "type": "linear", "factor": 2.0}})
    v5 = ModelConfig.from_dict({**BASE, "rope_parameters": {
        "rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}})
    assert v4.rope_theta == v5.rope_theta == 5e5
    assert v4.rope_scaling == v5.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    plain = ModelConfig.from_dict({**BASE, "rope_parameters": {"rope_type": "default",
                                                               "rope_theta": 1e4}})
    assert plain.rope_scaling is None


def test_architecture_flags() -> None:
    qwen2 = ModelConfig.from_dict({**BASE, "model_type": "qwen2", "use_sliding_window": True,
                                   "sliding_window": 16, "max_window_layers": 2})
    assert qwen2.attention_bias and not qwen2.o_bias
    assert qwen2.sliding_windows == (None, None, 16, 16)
    qwen3 = ModelConfig.from_dict({**BASE, "model_type": "qwen3", "attention_bias": True})
    assert qwen3.qk_norm and qwen3.attention_bias and qwen3.o_bias and qwen3.head_dim == 128
    mistral = ModelConfig.from_dict({**BASE, "model_type": "mistral", "sliding_window": None})
    assert mistral.sliding_windows == (None,) * 4
    assert ModelConfig.from_dict({**BASE, "model_type": "mistral"}).sliding_windows == (4096,) * 4


def test_eos_from_generation_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "eos_token_id": [5, 6]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [6, 7]}))
    assert ModelConfig.from_dir(tmp_path).eos_token_ids == (5, 6, 7)


@pytest.mark.parametrize(("change", "message"), [
    ({"model_type": "gpt_neox"}, "supported: llama, mistral, qwen2, qwen3"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 3}, "multiple"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"vocab_size": "big"}, "vocab_size"),
    ({"rope_scaling": {"rope_type": "longrope"}}, "rope type 'longrope'"),
    ({"hidden_size": 60}, "not a multiple"),
])
def test_bad_configs(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelError, match=message):
        ModelConfig.from_dict({**BASE, **change})


def test_unsupported_is_a_model_error() -> None:
    with pytest.raises(UnsupportedModelError):
        ModelConfig.from_dict({**BASE, "model_type": "gpt2"})


@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64,
     "beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5},
])
def test_inverse_frequencies_match_transformers(scaling: dict[str, Any] | None) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    raw = {**BASE, "rope_theta": 50000.0, "rope_scaling": scaling}
    hf_cfg = LlamaConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    if scaling is None:
        ref, att = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_cfg)
    else:
        ref, att = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_cfg, "cpu")
    ours, our_att = inv_freq(ModelConfig.from_dict(raw))
    assert torch.allclose(ours, ref, rtol=1e-6, atol=0)
    assert our_att == pytest.approx(att)
