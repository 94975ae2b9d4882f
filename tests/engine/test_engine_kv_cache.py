"""KV cache through the model: rollback and rows rolled back or reset independently (blocks,
caps, growth and accounting: test_kv_cache.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from p2pllm.engine.loader import load_slice


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 96, (1, n), generator=torch.Generator().manual_seed(seed))


def _pos(start: int, n: int) -> torch.Tensor:
    return torch.arange(start, start + n).unsqueeze(0)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_rollback_equals_never_having_decoded(tiny: dict[str, Any], arch: str) -> None:
    model = load_slice(tiny[arch].path)
    prompt, rejected, accepted = _ids(8, 0), _ids(5, 1), _ids(4, 2)
    with torch.inference_mode():
        # reference: prompt, then the accepted tokens one by one
        ref_cache = model.new_cache(1, 20)
        model(prompt, _pos(0, 8), ref_cache)
        model(rejected[:, :2], _pos(8, 2), ref_cache)  # two draft tokens that are kept
        ref = [model(accepted[:, i:i + 1], _pos(10 + i, 1), ref_cache) for i in range(4)]
        # decode 5 tokens (a window at once and one more), roll back 3, decode again
        cache = model.new_cache(1, 20)
        model(prompt, _pos(0, 8), cache)
        model(rejected[:, :4], _pos(8, 4), cache)
        model(rejected[:, 4:], _pos(12, 1), cache)
        assert cache.lengths == [13]
        cache.rollback(0, 10)
        got = [model(accepted[:, i:i + 1], _pos(10 + i, 1), cache) for i in range(4)]
    for a, b in zip(got, ref, strict=True):  # equal up to matmul blocking (window vs steps)
        assert (a - b).abs().max() < 1e-5


def test_rows_roll_back_and_reset_independently(tiny: dict[str, Any]) -> None:
    model = load_slice(tiny["qwen2"].path)
    a, b = _ids(6, 3), _ids(6, 4)
    with torch.inference_mode():
        solo = model.new_cache(1, 10)
        want = model(b, _pos(0, 6), solo)
        cache = model.new_cache(2, 10)
        model(torch.cat([a, a]), torch.arange(6).expand(2, 6), cache)
        cache.reset(1)
        assert cache.lengths == [6, 0]
        got = model(b, _pos(0, 6), cache, slots=torch.tensor([1]))
        cache.rollback(0, 2)
        assert cache.lengths == [2, 6]
        again = model(a[:, 2:], _pos(2, 4), cache, slots=torch.tensor([0]))
        plain = model.new_cache(1, 10)
        ref = model(a, _pos(0, 6), plain)[:, 2:]
    assert torch.equal(got, want)
    assert (again - ref).abs().max() < 1e-5
