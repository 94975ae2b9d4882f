"""The single-process trainer and the per-stage compute it shares with the pipeline.

- train_local equals a plain Hugging Face transformers training loop (same init, data, AdamW);
- slices trained stage by stage (tied gradients swapped as the stages do over the wire) equal
  the whole model trained at once;
- initialisation depends on parameter names only, so a slice starts as the whole model does;
- checkpoints and adapters written by the trainer load back in the engine (and in peft).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from p2pllm.engine.config import ModelConfig
from p2pllm.engine.loader import load_slice
from p2pllm.pillars.splittrain.compute import (
    LoraSpec,
    OptimConfig,
    StageModel,
    build_slice,
    clip_scale,
    lora_from_meta,
    lora_spec,
    lora_state_dict,
)
from p2pllm.pillars.splittrain.data import batch_rows, load_blocks, micro_rows, split_batch
from p2pllm.pillars.splittrain.trainer import evaluate, save_trained, train_local
from tests.conftest import real_model

RTOL, ATOL = 1e-5, 4e-5  # torch.distributed.pipelining's tolerance for fp32

STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play in the park with "
    "her dog. One day, Lily saw a big red ball under a tree. She ran to the ball and picked it "
    "up. \"This is a nice ball,\" she said. Her mom smiled and said, \"You can keep it.\" Lily "
    "was very happy. She played with the ball all day. When the sun went down, she went home "
    "and told her dad about the ball. Her dad gave her a big hug. "
) * 4


def make_tiny_llama(path: Path, *, layers: int = 3, tie: bool = True, vocab: int = 96,
                    seed: int = 0) -> Path:
    """A random tiny Llama checkpoint (transformers' own init) saved to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=tie,
                      bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def random_blocks(n: int, seq_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, seq_len + 1), generator=g)


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def test_train_local_equals_a_plain_transformers_loop(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    model_dir = make_tiny_llama(tmp_path / "m")
    blocks = random_blocks(12, 8, 96)
    optim = OptimConfig(lr=2e-3, weight_decay=0.1, betas=(0.9, 0.95))
    # Prepare / Execute: ours with 2 micro-batches, transformers with the full batch.
    run = train_local(model_dir, blocks, steps=4, batch_size=4, micro_batches=2, optim=optim,
                      seed=3)
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf.train()
    decay = [p for p in hf.parameters() if p.dim() > 1]
    no_decay = [p for p in hf.parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=2e-3,
                            betas=(0.9, 0.95))
    ref_losses = []
    for s in range(4):
        x, y = split_batch(blocks, batch_rows(12, 4, s, 3))
        logits = hf(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 96), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref_losses.append(loss.item())
    # Assert: same losses, same weights.
    assert run.losses == pytest.approx(ref_losses, rel=RTOL, abs=ATOL)
    ours = run.model.hf_state_dict()
    theirs = hf.state_dict()
    for k, v in ours.items():
        assert_close(v, theirs[k], k)
    assert [r["step"] for r in run.steps] == [0, 1, 2, 3]
    assert all(r["grad_norm"] > 0 for r in run.steps)


def _stage_by_stage(model_dir: Path, ranges: list[tuple[int, int]], blocks: torch.Tensor,
                    steps: int, batch: int, micro: int, optim: OptimConfig,
                    lora: LoraSpec | None, seed: int) -> tuple[list[float], list[StageModel]]:
    """What the pipeline computes, in one process: slices, micro-batches, tied swap, step."""
    stages = [StageModel(build_slice(model_dir, r, seed=seed, lora=lora), optim) for r in ranges]
    losses = []
    for s in range(steps):
        x, y = split_batch(blocks, batch_rows(blocks.shape[0], batch, s, seed))
        denom = y.numel()
        loss = 0.0
        for m in range(micro):
            rows = micro_rows(range(batch), micro, m)
            h: torch.Tensor = x[rows]
            for st in stages:
                h = st.forward(m, h, y[rows], denom)
            loss += float(h)
            g = None
            for st in reversed(stages):
                g = st.backward(m, g)
        first, last = stages[0], stages[-1]
        if first.tied is not None:
            assert last.tied is not None
            e, hd = first.tied_grad(), last.tied_grad()
            first.set_tied_grad(e + hd)
            last.set_tied_grad(hd + e)
        total = sum(st.grad_sq(exclude_tied=st is last) for st in stages)
        for st in stages:
            st.step(optim.lr_at(s, steps), clip_scale(total, optim.grad_clip))
        losses.append(loss)
    return losses, stages


@pytest.mark.parametrize("lora", [None, lora_spec(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))])
def test_slices_trained_stage_by_stage_equal_the_whole_model(tmp_path: Path, lora: LoraSpec | None) -> None:
    model_dir = make_tiny_llama(tmp_path / "m")
    blocks = random_blocks(10, 8, 96, seed=1)
    optim = OptimConfig(lr=3e-3, weight_decay=0.05, grad_clip=0.5, warmup_steps=1,
                        decay="cosine", min_lr=1e-4)
    ref = train_local(model_dir, blocks, steps=3, batch_size=4, micro_batches=2, optim=optim,
                      lora=lora, seed=5)
    losses, stages = _stage_by_stage(model_dir, [(0, 1), (1, 2), (2, 3)], blocks, 3, 4, 2,
                                     optim, lora, 5)
    assert losses == pytest.approx(ref.losses, rel=RTOL, abs=ATOL)
    if lora is None:
        assert stages[0].tied is not None and stages[-1].tied is not None
        want = ref.model.hf_state_dict()
        for st in stages:
            for k, v in st.model.hf_state_dict().items():
                assert_close(v, want[k], k)
        # Clipping was active (grad norm above 0.5): the run would differ without it.
        assert max(r["grad_norm"] for r in ref.steps) > 0.5
    else:
        want = lora_state_dict(ref.model)
        got = {k: v for st in stages for k, v in lora_state_dict(st.model).items()}
        assert set(got) == set(want) and len(want) == 3 * 3 * 2
        for k, v in got.items():
            assert_close(v, want[k], k)
        assert any(v.abs().sum() > 0 for k, v in got.items() if "lora_B" in k)  # B trained


def test_init_depends_on_names_only_so_a_slice_starts_like_the_whole(tmp_path: Path) -> None:
    cfg = ModelConfig.from_dir(make_tiny_llama(tmp_path / "m", layers=4, tie=False))
    whole = build_slice(cfg, init="random", seed=11, lora=lora_spec(r=2, alpha=4))
    part = build_slice(cfg, (1, 4), init="random", seed=11, lora=lora_spec(r=2, alpha=4))
    other = build_slice(cfg, (1, 4), init="random", seed=12)
    w = dict(whole.named_parameters())
    for name, p in part.named_parameters():
        assert torch.equal(p, w[name]), name
    assert not torch.equal(other.lm_head.weight, part.lm_head.weight)  # type: ignore[union-attr]
    # Sensible from-scratch statistics: N(0, 0.02) weights, unit norms.
    emb = whole.embed_tokens.weight  # type: ignore[union-attr]
    assert abs(float(emb.std()) - 0.02) < 0.005
    assert torch.equal(whole.norm.weight, torch.ones(32))  # type: ignore[union-attr]
    # Only LoRA tensors train when LoRA is on.
    assert {n for n, p in part.named_parameters() if p.requires_grad} == {
        n for n in w if ".lora_" in n and n.startswith("layers.") and int(n.split(".")[1]) >= 1}


def test_lr_schedule_and_clipping() -> None:
    o = OptimConfig(lr=1.0, warmup_steps=2, decay="cosine", min_lr=0.1)
    lrs = [o.lr_at(s, 6) for s in range(6)]
    assert lrs[:2] == [0.5, 1.0]
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:]))
    lin = OptimConfig(lr=1.0, decay="linear", min_lr=0.0)
    assert [lin.lr_at(s, 3) for s in range(3)] == [1.0, 0.5, 0.0]
    assert OptimConfig(lr=0.3).lr_at(100, 5) == 0.3
    assert clip_scale(16.0, None) == 1.0
    assert clip_scale(16.0, 2.0) == pytest.approx(0.5, rel=1e-6)
    assert clip_scale(1.0, 2.0) == 1.0
    assert OptimConfig.from_meta(o.to_meta()) == o
    for bad in ({"lr": -1}, {"decay": "step"}, {"betas": [0.9]}, {"grad_clip": 0},
                {"warmup_steps": 1.5}, {"min_lr": 5}, {"nope": 1}):
        with pytest.raises(ValueError):
            OptimConfig.from_meta(bad)
    for bad_lora in ({"r": 0}, {"targets": ["embed_tokens"]}, {"alpha": 0}):
        with pytest.raises(ValueError):
            lora_from_meta(bad_lora)


def test_saved_checkpoint_and_adapter_load_back(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model_dir = make_tiny_llama(tmp_path / "m")
    blocks = random_blocks(8, 8, 96, seed=2)
    x = blocks[:2, :-1]
    pos = torch.arange(8).expand(2, 8)
    full = train_local(model_dir, blocks, steps=2, batch_size=4, optim=OptimConfig(lr=1e-2))
    out = save_trained(full.model, tmp_path / "full", tokenizer_src=model_dir)
    with torch.no_grad():
        assert_close(load_slice(out)(x, pos), full.model(x, pos), "reloaded checkpoint")
    spec = lora_spec(r=4, alpha=8)
    ad = train_local(model_dir, blocks, steps=2, batch_size=4, optim=OptimConfig(lr=1e-2),
                     lora=spec)
    adir = save_trained(ad.model, tmp_path / "adapter", lora=spec, base_model=str(model_dir))
    with torch.no_grad():
        want = ad.model(x, pos)
        assert_close(load_slice(model_dir, adapter=adir)(x, pos), want, "engine + adapter")
        hf = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(model_dir), adir)
        assert_close(hf(input_ids=x).logits, want, "peft + adapter")
        assert not torch.allclose(load_slice(model_dir)(x, pos), want)  # the adapter matters


def test_loss_decreases_on_real_text_and_evaluate_matches(tmp_path: Path) -> None:
    model = real_model("tinystories-656k")
    (tmp_path / "story.txt").write_text(STORY)
    blocks = load_blocks(tmp_path / "story.txt", 32, model)
    run = train_local(model, blocks, steps=6, batch_size=4, optim=OptimConfig(lr=3e-3))
    assert run.losses[-1] < run.losses[0] - 0.3, run.losses
    assert all(math.isfinite(v) for v in run.losses)
    before = evaluate(load_slice(model), blocks)
    after = evaluate(run.model, blocks)
    assert after < before
    one = evaluate(run.model, blocks[:4], batch_size=4)
    with torch.no_grad():
        x, y = split_batch(blocks, range(4))
        logits = run.model(x, torch.arange(32).expand(4, 32))
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    assert one == pytest.approx(float(ce), rel=1e-5)
