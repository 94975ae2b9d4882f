"""The local generation loop: stopping, limits, sampling, streaming, result fields."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from p2pllm.engine.errors import ModelError, SequenceTooLongError
from p2pllm.engine.generate import JSON_FIELDS, TextStream, generate_ids
from p2pllm.engine.loader import load_slice
from p2pllm.engine.sampling import SamplingParams, distribution


@pytest.fixture(scope="module")
def model(tiny: dict[str, Any]) -> Any:
    return load_slice(tiny["llama"].path)  # max_position_embeddings 64, eos 2


def _greedy_reference(model: Any, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([ids]), torch.arange(len(ids))[None])
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_equals_full_recompute(model: Any) -> None:
    prompt = [5, 9, 17, 33]
    r = generate_ids(model, prompt, max_tokens=12, stop_ids=[])
    assert r.token_ids == _greedy_reference(model, prompt, 12)
    assert r.generated_tokens == 12 and r.prompt_tokens == 4 and r.stop_reason == "max_tokens"
    assert r.seconds >= r.time_to_first_token_s > 0 and r.tokens_per_s > 0


def test_stops_at_eos_and_includes_it(model: Any) -> None:
    prompt = [5, 9, 17, 33]
    ref = _greedy_reference(model, prompt, 12)
    stop = ref[4]
    first = ref.index(stop)
    seen: list[int] = []
    r = generate_ids(model, prompt, max_tokens=12, stop_ids=[stop], on_token=seen.append)
    assert r.token_ids == ref[:first + 1] == seen
    assert r.stop_reason == "eos"


def test_length_limit_and_too_long(model: Any, tiny: dict[str, Any]) -> None:
    prompt = list(range(3, 63))  # 60 of 64 positions
    r = generate_ids(model, prompt, max_tokens=50, stop_ids=[])
    assert r.generated_tokens == 5 and r.stop_reason == "length"
    with pytest.raises(SequenceTooLongError, match="at most 64"):
        generate_ids(model, list(range(3, 68)), max_tokens=1)
    with pytest.raises(ModelError, match="empty"):
        generate_ids(model, [], max_tokens=1)
    with pytest.raises(ModelError, match="whole model"):
        generate_ids(load_slice(tiny["llama"].path, layers=(0, 2)), [5], max_tokens=1)


def test_sampling_is_seeded(model: Any) -> None:
    params = SamplingParams(temperature=1.0, top_k=30, seed=11)
    a = generate_ids(model, [5, 6, 7], params, max_tokens=20, stop_ids=[])
    b = generate_ids(model, [5, 6, 7], params, max_tokens=20, stop_ids=[])
    c = generate_ids(model, [5, 6, 7], SamplingParams(temperature=1.0, top_k=30, seed=12),
                     max_tokens=20, stop_ids=[])
    assert a.token_ids == b.token_ids != c.token_ids


def test_repetition_penalty_sees_the_history(model: Any) -> None:
    """With a huge penalty, greedy never repeats a token of the prompt or of its output."""
    prompt = [5, 9, 17, 33]
    params = SamplingParams(repetition_penalty=1e6)
    r = generate_ids(model, prompt, params, max_tokens=20, stop_ids=[])
    seen = set(prompt)
    for t in r.token_ids:
        assert t not in seen
        seen.add(t)
    plain = generate_ids(model, prompt, max_tokens=20, stop_ids=[])
    assert len(set(plain.token_ids) | set(prompt)) < len(prompt) + 20  # it would repeat
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), torch.arange(4)[None])[0, -1]
    assert distribution(logits, params, prompt).argmax().item() == r.token_ids[0]


def test_json_fields(model: Any) -> None:
    d = generate_ids(model, [5, 6], max_tokens=3, stop_ids=[]).to_json()
    assert tuple(d) == JSON_FIELDS
    assert d["mode"] == "local" and len(d["token_ids"]) == 3


class _CharTokenizer:
    """One token per UTF-8 byte, like a byte-level tokenizer mid-character."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_holds_back_partial_characters() -> None:
    tok = _CharTokenizer()
    stream = TextStream(tok, list(b"Hi "))
    pieces = [stream.push(b) for b in "é ok".encode()]
    assert pieces[0] == ""  # first byte of é alone is not a character yet
    assert "".join(pieces) == "é ok"
