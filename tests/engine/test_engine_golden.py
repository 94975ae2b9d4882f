"""The two real models in ../shared/models reproduce their README's reference greedy ids."""

from __future__ import annotations

from typing import Any

import pytest

from p2pllm.engine.generate import generate, generate_ids
from p2pllm.engine.loader import load_slice, load_tokenizer
from p2pllm.engine.sampling import SamplingParams

REFERENCE = {
    "tinystories-656k": (
        [1, 80, 147, 201, 282, 57],
        [313, 598, 303, 1049, 1468, 267, 628, 333, 94, 1210, 263, 251, 604, 94, 1030, 94, 1030,
         94, 436, 220, 1053, 615, 303, 328, 552, 319, 1269, 163, 1945, 897, 645, 1188, 108, 319,
         135, 448, 563, 1799, 1380, 1067],
        "Once upon a time, a little girl named Lily lived in a small house with her mom, dad, and "
        "her dog, Spot, Spot, loved to play all day. One day, Lily saw a small bird on the "
        "ground. She picked it up and tried to reach the bird and see what it was.\nLily had an "
        "idea",
    ),
    "stories-260k": (
        [1, 403, 407, 261, 378],
        [432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410,
         408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394, 261, 370,
         432, 352, 266, 268, 388, 426],
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
        "park. One day, she saw a big, red ball.",
    ),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_greedy_ids(shared_model: Any, name: str) -> None:
    path = shared_model(name)
    prompt_ids, ids, text = REFERENCE[name]
    model = load_slice(path)
    tokenizer = load_tokenizer(path)
    assert tokenizer("Once upon a time")["input_ids"] == prompt_ids
    streamed: list[str] = []
    result = generate(model, tokenizer, "Once upon a time", SamplingParams(), 40,
                      on_text=streamed.append)
    assert result.token_ids == ids
    assert "Once upon a time" + result.text == text
    assert "".join(streamed) == result.text
    assert (result.prompt_tokens, result.generated_tokens, result.stop_reason) == (
        len(prompt_ids), 40, "max_tokens")


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_ids_through_slices(shared_model: Any, name: str) -> None:
    """Every split point of the real model gives the reference ids (greedy, step by step)."""
    import torch

    path = shared_model(name)
    prompt_ids, ids, _ = REFERENCE[name]
    whole = load_slice(path)
    n = whole.config.num_layers
    for cut in range(1, n):
        parts = [load_slice(path, layers=(0, cut)), load_slice(path, layers=(cut, n))]
        caches = [p.new_cache(1, 64) for p in parts]
        out: list[int] = []
        tokens = list(prompt_ids)
        with torch.inference_mode():
            x = torch.tensor([tokens])
            pos = torch.arange(len(tokens))[None]
            for _ in range(len(ids)):
                h = x
                for p, c in zip(parts, caches, strict=True):
                    h = p(h, pos, c, last_only=True)
                out.append(int(h[0, -1].argmax()))
                x = torch.tensor([[out[-1]]])
                pos = torch.tensor([[len(tokens) + len(out) - 1]])
        assert out == ids, f"split at layer {cut}"
    assert generate_ids(whole, prompt_ids, max_tokens=40).token_ids == ids
