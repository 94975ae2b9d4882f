"""Make draft models for a target: its first layers, or fresh random Llamas sharing a vocabulary.

A draft must share the target's tokenizer (token ids mean the same thing on both sides). Two
cheap ways to get one without training:

- :func:`truncate` keeps the target's first ``layers`` decoder layers, its embedding, final
  norm and head (an "early exit" model), optionally in another dtype;
- :func:`random_llama` builds a random Llama of any size over a given vocabulary (tests and
  benchmarks).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

__all__ = ["TOKENIZER_FILES", "copy_tokenizer", "random_llama", "truncate"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json")


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copyfile(f, Path(dst) / name)


def truncate(target: str | Path, out: str | Path, layers: int,
             dtype: torch.dtype | None = None) -> Path:
    """Write the target's first ``layers`` layers (+ embedding, final norm, head) as a model."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(target), Path(out)
    config = json.loads((src / "config.json").read_text())
    total = int(config["num_hidden_layers"])
    if not 1 <= layers <= total:
        raise ValueError(f"layers must be in [1, {total}], got {layers}")
    keep: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                parts = name.split(".")
                if len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= layers:
                    continue
                t = st.get_tensor(name)
                keep[name] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
    dst.mkdir(parents=True, exist_ok=True)
    save_file(keep, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config["num_hidden_layers"] = layers
    for key in ("layer_types", "max_window_layers"):
        if isinstance(config.get(key), list):
            config[key] = config[key][:layers]
    if dtype is not None:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = src / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, dst / "generation_config.json")
    copy_tokenizer(src, dst)
    return dst


def random_llama(out: str | Path, *, vocab_size: int, hidden_size: int = 64, layers: int = 2,
                 heads: int = 4, kv_heads: int = 2, intermediate_size: int | None = None,
                 max_positions: int = 2048, init_std: float = 0.02, seed: int = 0,
                 tie_embeddings: bool = False, tokenizer_from: str | Path | None = None,
                 eos_token_id: int | None = 2, **extra: Any) -> Path:
    """A randomly initialised Llama checkpoint (transformers' own init, seeded; built under
    the process-wide model-build lock, :func:`p2pllm.engine.loader.model_build`)."""
    from p2pllm.engine.loader import model_build

    with model_build():
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads,
            intermediate_size=intermediate_size or 2 * hidden_size,
            max_position_embeddings=max_positions, initializer_range=init_std,
            tie_word_embeddings=tie_embeddings, bos_token_id=1, eos_token_id=eos_token_id,
            **extra)
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            model = LlamaForCausalLM(config)
        finally:
            torch.random.set_rng_state(state)
    dst = Path(out)
    model.save_pretrained(dst)
    if tokenizer_from is not None:
        copy_tokenizer(tokenizer_from, dst)
    return dst
