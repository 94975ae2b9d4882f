"""Split training: the single-process trainer (the reference, and a library API).

The distributed job lives beside it, one module per purpose: :mod:`.planner` (where the
stages go), :mod:`.coordinator` (TRAIN_RUN on the JobRunner), :mod:`.driver` (the steps) and
:mod:`.checkpoint` (writing what the stages hold); their public names are re-exported here.

Single process::

    from p2pllm.pillars.splittrain.trainer import train_local, save_trained
    from p2pllm.pillars.splittrain.compute import OptimConfig
    from p2pllm.pillars.splittrain.data import load_blocks

    blocks = load_blocks("corpus.txt", seq_len=128, tokenizer="path/to/checkpoint")
    run = train_local(ModelConfig(...) or "path/to/checkpoint", blocks, steps=1000,
                      batch_size=32, optim=OptimConfig(lr=3e-3, warmup_steps=100,
                      decay="cosine", grad_clip=1.0, weight_decay=0.1), init="random", seed=0)
    save_trained(run.model, "out/", tokenizer_src="path/with/tokenizer")

Distributed: :func:`~.coordinator.coordinate` runs a job over ``train-stage`` roles (see
``stage.py`` and protocol.md section 11); each step's losses and final parameters equal
``train_local`` with the same model, data, micro-batches and optimizer.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from p2pllm.engine.config import ModelConfig
from p2pllm.engine.errors import ModelError
from p2pllm.engine.model import ModelSlice
from p2pllm.pillars.splittrain.compute import (
    IGNORE_INDEX,
    LoraSpec,
    OptimConfig,
    StageModel,
    build_slice,
    clip_scale,
    save_adapter,
)
from p2pllm.pillars.splittrain.data import batch_rows, split_batch
from p2pllm.pillars.splittrain.messages import RunSpec

log = logging.getLogger(__name__)

__all__ = [
    "BYTES_PER_PARAM_FULL",
    "BYTES_PER_PARAM_LORA",
    "STEP_TIMEOUT",
    "LocalRun",
    "RunSpec",
    "Stage",
    "StageFailed",
    "check_save_dir",
    "coordinate",
    "evaluate",
    "plan",
    "save_trained",
    "train_local",
]


# -- single process ----------------------------------------------------------------------------


@dataclass
class LocalRun:
    """What :func:`train_local` returns: per-step losses and the trained model."""

    losses: list[float]
    model: ModelSlice
    steps: list[dict[str, float]] = field(default_factory=list)  # step, loss, lr, grad_norm, seconds
    seconds: float = 0.0
    lora: LoraSpec | None = None


def train_local(
    model: ModelSlice | ModelConfig | str | Path,
    blocks: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    micro_batches: int = 1,
    optim: OptimConfig | None = None,
    lora: LoraSpec | None = None,
    seed: int = 0,
    shuffle: bool = True,
    init: str = "checkpoint",
    models_dir: str | Path | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> LocalRun:
    """Train a model in this process and return its per-step losses.

    ``model``: a :class:`ModelSlice` holding the whole model (trained in place; its
    ``requires_grad`` flags are kept), or a checkpoint path / name (loaded in float32), or a
    :class:`ModelConfig` (with ``init="random"``: trained from scratch). ``blocks``: token
    blocks (N, T+1) from :mod:`~p2pllm.pillars.splittrain.data`; step s trains on
    ``batch_rows(N, batch_size, s, seed, shuffle)``, cut into ``micro_batches`` whose gradients
    accumulate (the loss is the mean token cross-entropy of the whole batch). ``on_step`` is
    called after each step with ``{"step", "loss", "lr", "grad_norm", "seconds"}``.
    """
    optim = optim or OptimConfig()
    if steps < 0 or batch_size < 1 or micro_batches < 1 or batch_size % micro_batches:
        raise ValueError(f"steps >= 0, batch_size >= 1 divisible by micro_batches "
                         f"({steps}, {batch_size}, {micro_batches})")
    if blocks.dim() != 2 or blocks.shape[1] < 2 or blocks.shape[0] < 1:
        raise ValueError(f"blocks must be (N, T+1) token ids, got {tuple(blocks.shape)}")
    if isinstance(model, ModelSlice):
        if not (model.has_embed and model.has_head and model.start == 0
                and model.end == model.config.num_layers):
            raise ModelError("train_local needs the whole model (embedding, every layer, head)")
        if lora is not None:
            from p2pllm.pillars.splittrain.compute import apply_lora

            apply_lora(model, lora, seed)
        model.train()
        slice_ = model
    else:
        slice_ = build_slice(model, init=init, seed=seed, lora=lora, models_dir=models_dir)
    stage = StageModel(slice_, optim)
    run = LocalRun(losses=[], model=slice_, lora=lora)
    t_start = time.perf_counter()
    for s in range(steps):
        t0 = time.perf_counter()
        rows = batch_rows(blocks.shape[0], batch_size, s, seed, shuffle)
        inputs, labels = split_batch(blocks, rows)
        denom = int((labels != IGNORE_INDEX).sum())
        loss = 0.0
        size = batch_size // micro_batches
        for m in range(micro_batches):
            sl = slice(m * size, (m + 1) * size)
            loss += float(stage.forward(m, inputs[sl], labels[sl], denom))
            stage.backward(m)
        total_sq = stage.grad_sq()
        lr = optim.lr_at(s, steps)
        stage.step(lr, clip_scale(total_sq, optim.grad_clip))
        rec = {"step": s, "loss": loss, "lr": lr, "grad_norm": math.sqrt(total_sq),
               "seconds": time.perf_counter() - t0}
        run.losses.append(loss)
        run.steps.append(rec)
        if on_step is not None:
            on_step(rec)
    run.seconds = time.perf_counter() - t_start
    return run


@torch.no_grad()
def evaluate(model: ModelSlice, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """Mean token cross-entropy of ``model`` over every block (no gradient, any order)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, blocks.shape[0], batch_size):
            inputs, labels = split_batch(blocks, range(i, min(i + batch_size, blocks.shape[0])))
            b, t = inputs.shape
            logits = model(inputs, torch.arange(t).expand(b, t))
            total += float(torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)


def save_trained(model: ModelSlice, out_dir: str | Path, *, lora: LoraSpec | None = None,
                 tokenizer_src: str | Path | None = None, base_model: str = "",
                 dtype: torch.dtype | None = None) -> Path:
    """Write a trained whole model as a Hugging Face checkpoint (config, safetensors and the
    tokenizer files of ``tokenizer_src``), or with ``lora`` its adapter as a peft directory."""
    if lora is not None:
        from p2pllm.pillars.splittrain.compute import lora_state_dict

        return save_adapter(lora_state_dict(model), lora, out_dir, base_model)
    from p2pllm.engine.loader import save_hf_checkpoint

    return save_hf_checkpoint([model], model.config, out_dir, tokenizer_src=tokenizer_src,
                              dtype=dtype)


# The distributed trainer's public names, where they were before the split into modules.
from p2pllm.pillars.splittrain.checkpoint import check_save_dir  # noqa: E402
from p2pllm.pillars.splittrain.coordinator import coordinate  # noqa: E402
from p2pllm.pillars.splittrain.driver import STEP_TIMEOUT, StageFailed  # noqa: E402
from p2pllm.pillars.splittrain.planner import (  # noqa: E402
    BYTES_PER_PARAM_FULL,
    BYTES_PER_PARAM_LORA,
    Stage,
    plan,
)
