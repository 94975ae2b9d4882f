"""The no-grad forward's fast paths against the plain ones they replace (each path is a switch
in :mod:`p2pllm.engine.model`): float32 dense linears through oneDNN, and one bfloat16 query
attending in float32. Same logits within a stated tolerance, same greedy ids, and the fast
path really ran (counted), on the tiny architectures and on SmolLM2 from ../shared.

These are torch's paths. Where the native kernels are built, up to 16 tokens of one cache
row go through the native layer first (``NATIVE_LAYER``) and other few-row linears through
the native kernel (``NATIVE_DENSE``), so each test here turns both off (_torch_paths);
test_engine_decode.py and test_native.py test those, and the SmolLM2 test also checks that
the native default gives the same greedy ids."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import p2pllm.engine.model as model_mod
from p2pllm.engine.generate import generate_ids
from p2pllm.engine.loader import load_slice
from p2pllm.engine.model import ModelSlice
from tests.conftest import SHARED_MODELS, SHARED_SKIP
from tests.engine.conftest import ARCHS

SMOLLM2 = SHARED_MODELS / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                  reason="torch built without oneDNN")


def _decode_logits(model: ModelSlice, prompt: list[int], steps: int,
                   forced: list[int] | None = None) -> torch.Tensor:
    """Logits of the prompt's last token and of ``steps`` decode steps, (steps+1, V); each
    step feeds the greedy token, or ``forced[i]`` (teacher forcing) when given."""
    out = []
    with torch.inference_mode():
        cache = model.new_cache(1, len(prompt) + steps)
        logits = model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache,
                       last_only=True)[0, -1]
        for i in range(steps + 1):
            out.append(logits.float())
            if i == steps:
                break
            pos = len(prompt) + i
            tok = int(logits.argmax()) if forced is None else forced[i]
            logits = model(torch.tensor([[tok]]), torch.tensor([[pos]]), cache,
                           last_only=True)[0, -1]
    return torch.stack(out)


@pytest.fixture(autouse=True)
def _torch_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_mod, "NATIVE_LAYER", False)
    monkeypatch.setattr(model_mod, "NATIVE_DENSE", False)


class _Count:
    def __init__(self, fn: Any) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *a: Any, **kw: Any) -> Any:
        self.calls += 1
        return self.fn(*a, **kw)


@needs_onednn
@pytest.mark.parametrize("arch", ARCHS)
def test_float32_onednn_linears_equal_f_linear(tiny: dict[str, Any], arch: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_slice(tiny[arch].path, dtype=torch.float32)
    assert not model.layers["0"].self_attn.q_proj.weight.is_mkldnn  # plain weights, no copy
    prompt = [5, 9, 3, 17, 40, 2, 11, 8]
    monkeypatch.setattr(model_mod, "ONEDNN_FLOAT32", False)
    plain = _decode_logits(model, prompt, 8)
    counted = _Count(model_mod._onednn)
    monkeypatch.setattr(model_mod, "_onednn", counted)
    monkeypatch.setattr(model_mod, "ONEDNN_FLOAT32", True)
    monkeypatch.setattr(model_mod, "ONEDNN_MIN_NUMEL", 0)  # the tiny weights too
    fast = _decode_logits(model, prompt, 8)
    # every linear of every step: 9 forwards x (fused qkv, o, fused gate/up, down) x 3 + head
    assert counted.calls >= 9 * (4 * 3 + 1)
    # summation order only: float32 rounding of sums over 64..112 terms
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast.argmax(-1), plain.argmax(-1))


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_decode_attention_in_float32(tiny: dict[str, Any], arch: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The float32 attention of one bfloat16 query is at least as close to the float32
    model as bfloat16 SDPA was (both accumulate in float32; bf16 SDPA also rounds the
    probabilities to bfloat16), and picks the same greedy ids."""
    model = load_slice(tiny[arch].path, dtype=torch.bfloat16)
    ref_model = load_slice(tiny[arch].path, dtype=torch.float32)
    prompt = [5, 9, 3, 17, 40, 2, 11, 8, 30, 31, 60, 7]
    ref = _decode_logits(ref_model, prompt, 10)
    forced = ref.argmax(-1).tolist()  # teacher-forced: both bf16 runs see the same tokens
    monkeypatch.setattr(model_mod, "BF16_DECODE_ATTENTION_FP32", False)
    old = _decode_logits(model, prompt, 10, forced)
    seen: list[torch.dtype] = []
    real_sdpa = F.scaled_dot_product_attention

    def sdpa(q: torch.Tensor, *a: Any, **kw: Any) -> torch.Tensor:
        seen.append(q.dtype)
        return real_sdpa(q, *a, **kw)

    monkeypatch.setattr(model_mod, "BF16_DECODE_ATTENTION_FP32", True)
    monkeypatch.setattr(model_mod.F, "scaled_dot_product_attention", sdpa)
    new = _decode_logits(model, prompt, 10, forced)
    monkeypatch.undo()
    layers = model.config.num_layers
    window_decode = arch == "mistral"  # steps past the window take the masked bf16 path
    assert seen.count(torch.float32) >= (1 if window_decode else 10 * layers)
    err_old, err_new = (old - ref).abs().max().item(), (new - ref).abs().max().item()
    assert err_new <= 1.25 * err_old + 1e-2, (err_new, err_old)
    torch.testing.assert_close(new, old, rtol=0.05, atol=0.1)  # bf16 rounding apart


@pytest.mark.skipif(not SMOLLM2.is_file(), reason=f"{SHARED_SKIP}: {SMOLLM2} is not present")
def test_smollm2_fast_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """float32: the same greedy ids through oneDNN, F.linear and the native kernels (the
    default where they are built). bfloat16 (greedy ids of two
    bf16 roundings part at near-ties, so teacher-forced on the float32 ids): the float32
    attention agrees with the float32 model's top-1 at least as often as bf16 SDPA did, less
    two positions (of 24), and is no farther from its logits."""
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018]
    f32 = load_slice(SMOLLM2, dtype=torch.float32)
    counted = _Count(model_mod._onednn)
    monkeypatch.setattr(model_mod, "_onednn", counted)
    ids = generate_ids(f32, prompt, max_tokens=24, stop_ids=[]).token_ids
    if torch.backends.mkldnn.is_available():  # qkv, o, gate/up, down of 30 layers, the head
        assert counted.calls == 24 * (4 * 30 + 1)  # the prompt and 23 decode steps
    ref = _decode_logits(f32, prompt, 23, forced=ids)
    assert ref.argmax(-1).tolist() == ids
    monkeypatch.setattr(model_mod, "ONEDNN_FLOAT32", False)
    assert generate_ids(f32, prompt, max_tokens=24, stop_ids=[]).token_ids == ids
    monkeypatch.setattr(model_mod, "NATIVE_LAYER", True)  # the default (where built)
    monkeypatch.setattr(model_mod, "NATIVE_DENSE", True)
    assert generate_ids(f32, prompt, max_tokens=24, stop_ids=[]).token_ids == ids
    monkeypatch.setattr(model_mod, "NATIVE_LAYER", False)
    monkeypatch.setattr(model_mod, "NATIVE_DENSE", False)
    bf16 = load_slice(SMOLLM2, dtype=torch.bfloat16)
    monkeypatch.setattr(model_mod, "BF16_DECODE_ATTENTION_FP32", False)
    old = _decode_logits(bf16, prompt, 23, forced=ids)
    monkeypatch.setattr(model_mod, "BF16_DECODE_ATTENTION_FP32", True)
    new = _decode_logits(bf16, prompt, 23, forced=ids)
    top1_old = int((old.argmax(-1) == ref.argmax(-1)).sum())
    top1_new = int((new.argmax(-1) == ref.argmax(-1)).sum())
    assert top1_new >= top1_old - 2 and top1_new >= 19, (top1_new, top1_old)
    err_old, err_new = (old - ref).abs().max().item(), (new - ref).abs().max().item()
    assert err_new <= 1.25 * err_old, (err_new, err_old)


def test_greedy_sample_is_the_distributions_one_hot() -> None:
    from p2pllm.engine.sampling import SamplingParams, distribution, sample

    g = torch.Generator().manual_seed(1)
    hist = [3, 7, 7, 12]
    for penalty in (1.0, 1.3):
        p = SamplingParams(repetition_penalty=penalty)
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randint(-4, 5, (500,), generator=g) * 0.5).to(dtype)  # ties
            x[7] = 2.0  # penalised when seen: the argmax moves
            token, probs = sample(x, p, None, hist)
            want = distribution(x, p, hist)
            assert torch.equal(probs, want) and token == int(want.argmax())
            assert sample(x[None], p, None, [hist])[0] == token
    with pytest.raises(ValueError):
        sample(torch.zeros(2, 3, 4), SamplingParams())
