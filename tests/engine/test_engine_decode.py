"""The lean decode layer (p2pllm.engine.decode) computes the same bits as the general no-grad
layer it replaces (switch ``model.DECODE_LAYER``): float32, bfloat16 (oneDNN-packed where
the CPU packs) and int8/int4 weights, with a sliding window shorter than the sequence, and
it really ran (counted) on the architectures it takes; layers it does not take (biases,
q/k norms, a layer whose fused weight is gone) run the general path within the same step."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import p2pllm.engine.model as model_mod
from p2pllm.engine.loader import load_slice
from tests.engine.conftest import ARCHS
from tests.engine.test_engine_fastpaths import _Count, _decode_logits

PROMPT = [5, 9, 3, 17, 40, 2, 11, 8]
STEPS = 10  # past the mistral fixture's window of 6
TAKEN = {"llama", "mistral"}  # no biases, no q/k norms: every layer qualifies


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("load", [(torch.float32, "none"), (torch.bfloat16, "none"),
                                  (torch.float32, "int8"), (torch.float32, "int4")])
def test_decode_layer_equals_general_path(tiny: dict[str, Any], arch: str,
                                          load: tuple[torch.dtype, str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    dtype, quant = load
    model = load_slice(tiny[arch].path, dtype=dtype, quant=quant)
    monkeypatch.setattr(model_mod, "DECODE_LAYER", False)
    plain = _decode_logits(model, PROMPT, STEPS)
    counted = _Count(model_mod.decode_layer)
    monkeypatch.setattr(model_mod, "decode_layer", counted)
    monkeypatch.setattr(model_mod, "DECODE_LAYER", True)
    lean = _decode_logits(model, PROMPT, STEPS)
    assert torch.equal(lean, plain)
    layers = model.config.num_layers
    assert counted.calls == (STEPS * layers if arch in TAKEN else 0)


def test_a_layer_it_cannot_take_runs_the_general_path(tiny: dict[str, Any],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_slice(tiny["mistral"].path, dtype=torch.float32, quant="int4")
    monkeypatch.setattr(model_mod, "DECODE_LAYER", False)
    plain = _decode_logits(model, PROMPT, STEPS)
    model.layers["1"].self_attn.fused_qkv = None  # q/k/v through their own modules
    counted = _Count(model_mod.decode_layer)
    monkeypatch.setattr(model_mod, "decode_layer", counted)
    monkeypatch.setattr(model_mod, "DECODE_LAYER", True)
    assert torch.equal(_decode_logits(model, PROMPT, STEPS), plain)
    assert counted.calls == STEPS * (model.config.num_layers - 1)
