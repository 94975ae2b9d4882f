"""Fixtures for the engine tests: tiny random checkpoints of each architecture, saved the way
Hugging Face saves them, with their transformers models as the oracle."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import SHARED_MODELS, SHARED_SKIP

_COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _configs() -> dict[str, Any]:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    return {
        # GQA, Llama-3 rope scaling
        "llama": LlamaConfig(**_COMMON, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        # tied embeddings, biases everywhere, head_dim != hidden / heads
        "llama-tied": LlamaConfig(**_COMMON, tie_word_embeddings=True, attention_bias=True,
                                  mlp_bias=True, head_dim=12),
        # sliding-window attention shorter than the test sequences
        "mistral": MistralConfig(**_COMMON, sliding_window=6),
        # q/k/v bias
        "qwen2": Qwen2Config(**_COMMON, tie_word_embeddings=True),
        # q/k norm, head_dim larger than hidden / heads
        "qwen3": Qwen3Config(**_COMMON, head_dim=24),
    }


ARCHS = ("llama", "llama-tied", "mistral", "qwen2", "qwen3")  # keep in step with the tests


@dataclass
class Tiny:
    name: str
    path: Path
    hf: Any  # the transformers model, float32, eval mode


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that a wrong rotation, mask or norm shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.15 * noise)


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tiny]:
    """name -> Tiny for every architecture in ARCHS."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    out: dict[str, Tiny] = {}
    for i, (name, cfg) in enumerate(_configs().items()):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(cfg)
        _randomise(model, i)
        model.eval()
        path = root / name
        model.save_pretrained(path)
        out[name] = Tiny(name, path, model)
    return out


@pytest.fixture
def shared_model() -> Any:
    def get(name: str) -> Path:
        path = (SHARED_MODELS / name).resolve()
        if not (path / "config.json").is_file():
            pytest.skip(f"{SHARED_SKIP}: real model {name} not found at {path} "
                        f"(../shared/models next to the repository, or $P2PLLM_SHARED/models)")
        return path

    return get


def native_built() -> bool:
    """Whether the native kernels (p2pllm.engine.native) are built here (or can be)."""
    from p2pllm.engine import native

    return native.kernels() is not None


NEEDS_CXX = "needs a C++ compiler"  # the skip reason when the native kernels did not build


def native_missing() -> str:
    """Why the native kernels are not here: the skip reason of a test that needs them."""
    import os

    from p2pllm.engine import native

    if os.environ.get("P2PLLM_NATIVE") == "0":
        return "the native kernels are turned off (P2PLLM_NATIVE=0)"
    return f"{NEEDS_CXX}: {native._state.get('error', 'the native kernels did not build')}"


@pytest.fixture
def torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's own kernels, as under P2PLLM_NATIVE=0 (native.kernels() reads the variable on
    every call, so its cached module is simply not used): new QuantWeights take the torch
    layout, few-row dense linears go through oneDNN / F.linear, can_pack decides as before."""
    monkeypatch.setenv("P2PLLM_NATIVE", "0")


@pytest.fixture(params=["native", "torch"])
def layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test once per QuantWeight layout: "native" (skips with NEEDS_CXX when the
    kernels do not build; CI=true turns that skip into a failure) and "torch"."""
    if request.param == "torch":
        monkeypatch.setenv("P2PLLM_NATIVE", "0")
    elif not native_built():
        pytest.skip(native_missing())
    return str(request.param)
