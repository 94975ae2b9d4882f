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


# -- float32 packing ------------------------------------------------------------------------

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                  reason="torch built without oneDNN")


@needs_onednn
def test_float32_packs_from_a_size_floor() -> None:
    from p2pllm.engine.layout import PACK_FLOAT32_MIN_HIDDEN, can_pack

    assert can_pack(torch.float32, "cpu", PACK_FLOAT32_MIN_HIDDEN)
    assert not can_pack(torch.float32, "cpu", PACK_FLOAT32_MIN_HIDDEN - 1)
    assert not can_pack(torch.float32)  # no size given: as before
    assert not can_pack(torch.float16, "cpu", 4096)


@needs_onednn
@pytest.mark.parametrize("arch", ["llama", "llama-tied"])
def test_packed_float32_keeps_a_tied_head_on_the_table(tiny: dict[str, Any], arch: str) -> None:
    from p2pllm.engine.loader import weight_bytes
    from tests.engine.test_weight_bytes import held

    path = tiny[arch].path
    plain = load_slice(path, dtype=torch.float32)
    assert not plain.layers["0"].self_attn.q_proj.weight.is_mkldnn  # tiny: under the floor
    packed = load_slice(path, dtype=torch.float32, pack=True)
    assert packed.layers["0"].self_attn.q_proj.weight.is_mkldnn
    assert packed.lm_head is not None and packed.embed_tokens is not None
    tied = packed.config.tie_word_embeddings
    assert (packed.lm_head.weight is packed.embed_tokens.weight) == tied
    assert packed.lm_head.weight.is_mkldnn != tied
    assert weight_bytes(path, torch.float32, pack=True) == held(packed) == held(plain)
    torch.testing.assert_close(_decode_logits(packed, PROMPT, STEPS),
                               _decode_logits(plain, PROMPT, STEPS), rtol=1e-5, atol=1e-5)
