"""The decode layers of p2pllm.engine.decode against the general no-grad layer they replace.

* The lean torch layer (switch ``model.DECODE_LAYER``, with the native layer off) computes
  the same bits: float32, bfloat16 and int8/int4 weights, with a sliding window shorter
  than the sequence, and it really ran (counted) on the architectures it takes.
* The native layer (``model.NATIVE_LAYER``, one C++ call a layer for up to 16 tokens of one
  cache row) computes the same values up to float32 rounding (different summation order),
  the same greedy tokens, and gives a token the same bits whether it runs alone or in a
  window of several (what speculative verification needs to reproduce local greedy).
* Layers neither takes (biases, q/k norms, a layer whose fused weight is gone) run the
  general path within the same step."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import p2pllm.engine.model as model_mod
from p2pllm.engine import native
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
    monkeypatch.setattr(model_mod, "NATIVE_LAYER", False)
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
    monkeypatch.setattr(model_mod, "NATIVE_LAYER", False)
    monkeypatch.setattr(model_mod, "DECODE_LAYER", False)
    plain = _decode_logits(model, PROMPT, STEPS)
    model.layers["1"].self_attn.fused_qkv = None  # q/k/v through their own modules
    counted = _Count(model_mod.decode_layer)
    monkeypatch.setattr(model_mod, "decode_layer", counted)
    monkeypatch.setattr(model_mod, "DECODE_LAYER", True)
    assert torch.equal(_decode_logits(model, PROMPT, STEPS), plain)
    assert counted.calls == STEPS * (model.config.num_layers - 1)


# -- the native layer -------------------------------------------------------------------------

needs_native = pytest.mark.skipif(native.kernels() is None, reason="needs a C++ compiler")
# float32 rounding of a different summation order; bfloat16 stores the hidden state rounded
TOL = {torch.float32: 1e-4, torch.bfloat16: 0.1}
FORCED = [3, 14, 15, 9, 2, 6, 5, 35, 8, 9]


@needs_native
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("load", [(torch.float32, "none"), (torch.bfloat16, "none"),
                                  (torch.float32, "int8"), (torch.float32, "int4")])
def test_native_layer_equals_general_path(tiny: dict[str, Any], arch: str,
                                          load: tuple[torch.dtype, str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    dtype, quant = load
    model = load_slice(tiny[arch].path, dtype=dtype, quant=quant)
    monkeypatch.setattr(model_mod, "DECODE_LAYER", False)
    plain = _decode_logits(model, PROMPT, STEPS, forced=FORCED)  # the same inputs both ways
    counted = _Count(model_mod.native_layer)
    monkeypatch.setattr(model_mod, "native_layer", counted)
    monkeypatch.setattr(model_mod, "DECODE_LAYER", True)
    fast = _decode_logits(model, PROMPT, STEPS, forced=FORCED)
    scale = plain.abs().max().item()
    assert (fast - plain).abs().max().item() <= TOL[dtype] * scale
    if dtype == torch.float32:
        assert torch.equal(fast.argmax(-1), plain.argmax(-1))
    assert counted.calls == ((STEPS + 1) * model.config.num_layers if arch in TAKEN else 0)  # the 8-token prompt too


def _steps(model: Any, prompt: list[int], new: list[int], window: int) -> torch.Tensor:
    """Logits of ``new`` fed after ``prompt`` in windows of ``window`` tokens."""
    cache = model.new_cache(batch=1, max_len=64)
    with torch.no_grad():
        model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache, last_only=True)
        out, pos = [], len(prompt)
        for i in range(0, len(new), window):
            part = new[i:i + window]
            out.append(model(torch.tensor([part]), torch.arange(pos, pos + len(part))[None],
                             cache)[0])
            pos += len(part)
    return torch.cat(out)


@needs_native
@pytest.mark.parametrize("arch", ["llama", "mistral"])  # mistral: a window of 6 < the length
@pytest.mark.parametrize("load", [(torch.float32, "none"), (torch.bfloat16, "none"),
                                  (torch.float32, "int4")])
def test_native_layer_gives_a_token_the_same_bits_alone_or_in_a_window(
        tiny: dict[str, Any], arch: str, load: tuple[torch.dtype, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    dtype, quant = load
    model = load_slice(tiny[arch].path, dtype=dtype, quant=quant)
    counted = _Count(model_mod.native_layer)
    monkeypatch.setattr(model_mod, "native_layer", counted)
    new = [7, 1, 30, 12, 4, 4, 19, 23, 6, 2, 44, 13]
    one = _steps(model, PROMPT, new, 1)
    assert counted.calls == (1 + len(new)) * model.config.num_layers  # the prompt too
    for window in (3, 5, 12):
        assert torch.equal(_steps(model, PROMPT, new, window), one)
    # and the windows did not leave the general path's answer
    monkeypatch.setattr(model_mod, "NATIVE_LAYER", False)
    monkeypatch.setattr(model_mod, "NATIVE_DENSE", False)
    plain = _steps(model, PROMPT, new, 1)
    assert (one.float() - plain.float()).abs().max() <= TOL[dtype] * plain.abs().max()


@needs_native
def test_the_native_layer_leaves_a_layer_it_cannot_take_to_the_general_path(
        tiny: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_slice(tiny["mistral"].path, dtype=torch.float32, quant="int8")
    plain = _decode_logits(model, PROMPT, STEPS, forced=FORCED)
    model.layers["1"].self_attn.fused_qkv = None
    counted = _Count(model_mod.native_layer)
    monkeypatch.setattr(model_mod, "native_layer", counted)
    got = _decode_logits(model, PROMPT, STEPS, forced=FORCED)
    assert counted.calls == (STEPS + 1) * (model.config.num_layers - 1)
    assert (got - plain).abs().max() <= 1e-4 * plain.abs().max()


# -- float32 packing ------------------------------------------------------------------------

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                  reason="torch built without oneDNN")


@needs_onednn
def test_float32_packs_from_a_size_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    from p2pllm.engine.layout import PACK_FLOAT32_MIN_HIDDEN, can_pack

    monkeypatch.setattr(model_mod, "NATIVE_DENSE", False)  # the native kernels take no packing

    assert can_pack(torch.float32, "cpu", PACK_FLOAT32_MIN_HIDDEN)
    assert not can_pack(torch.float32, "cpu", PACK_FLOAT32_MIN_HIDDEN - 1)
    assert not can_pack(torch.float32)  # no size given: as before
    assert not can_pack(torch.float16, "cpu", 4096)
    if native.kernels() is not None:
        monkeypatch.setattr(model_mod, "NATIVE_DENSE", True)
        assert not can_pack(torch.float32, "cpu", PACK_FLOAT32_MIN_HIDDEN)
        assert not can_pack(torch.bfloat16, "cpu", PACK_FLOAT32_MIN_HIDDEN)


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
