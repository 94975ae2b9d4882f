"""Training the bundled models.

Plain language-model training is the split-training pillar's single-process trainer,
:func:`p2pllm.pillars.splittrain.trainer.train_local` (the reference the distributed trainer
equals). The draft model can also learn from the target (``distill_weight > 0``): then
:func:`distill` trains it, with the same pieces as ``train_local`` (model built and
initialised by ``build_slice``, ``OptimConfig`` schedule, ``batch_rows`` data order, the
engine's differentiable ``ModelSlice.forward``) and a loss that adds KL(target || draft):
a draft that matches the target's next-token distributions agrees with it more often, which
is what the speculative acceptance rate measures.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from p2pllm.engine.config import ModelConfig
from p2pllm.engine.model import ModelSlice
from p2pllm.pillars.splittrain.compute import OptimConfig, build_slice
from p2pllm.pillars.splittrain.data import batch_rows, split_batch
from p2pllm.pillars.splittrain.trainer import evaluate, train_local

__all__ = ["RunSpec", "TrainOutcome", "distill", "distill_loss", "run_training"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    """How one model is trained (the ``train:`` section of a model in the recipe config)."""

    steps: int
    batch_size: int
    lr: float
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    distill_weight: float = 0.0  # 0 = data only (train_local); > 0: distill from the target
    log_every: int = 50
    eval_every: int = 0  # steps between held-out evaluations (0 = only at the end)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError("distill_weight must be in [0, 1]")
        if self.log_every < 1 or self.eval_every < 0:
            raise ValueError("log_every must be >= 1 and eval_every >= 0")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)}")
        return cls(**d)

    def optim(self) -> OptimConfig:
        return OptimConfig(lr=self.lr, betas=(self.beta1, self.beta2),
                           weight_decay=self.weight_decay, grad_clip=self.grad_clip,
                           warmup_steps=self.warmup_steps, decay="cosine", min_lr=self.min_lr)


@dataclass
class TrainOutcome:
    model: ModelSlice
    seconds: float
    tokens: int
    trainer: str
    final_loss: float  # mean training objective over the last log window
    curve: list[dict[str, float]] = field(default_factory=list)


class _Progress:
    """Collects per-step records into a logged, evaluated learning curve."""

    def __init__(self, name: str, spec: RunSpec, tokens_per_step: int,
                 heldout: torch.Tensor | None) -> None:
        self.name, self.spec, self.tokens_per_step = name, spec, tokens_per_step
        self.heldout = heldout
        self.window: list[float] = []
        self.curve: list[dict[str, float]] = []
        self.t0 = time.perf_counter()
        self.model: ModelSlice | None = None

    def __call__(self, rec: dict[str, float]) -> None:
        step = int(rec["step"]) + 1
        self.window.append(float(rec["loss"]))
        last = step == self.spec.steps
        if step % self.spec.log_every and not last:
            return
        elapsed = time.perf_counter() - self.t0
        point = {"step": step, "loss": sum(self.window) / len(self.window),
                 "lr": float(rec["lr"]), "seconds": round(elapsed, 1)}
        self.window = []
        every = self.spec.eval_every
        if self.heldout is not None and self.model is not None and every and (
                step % every == 0 or last):
            point["heldout_loss"] = evaluate(self.model, self.heldout)
        self.curve.append(point)
        eta = elapsed / step * (self.spec.steps - step)
        log.info("%s step %d/%d loss %.4f%s lr %.2e %.0f tok/s elapsed %.0fs eta %.0fs",
                 self.name, step, self.spec.steps, point["loss"],
                 f" heldout {point['heldout_loss']:.4f}" if "heldout_loss" in point else "",
                 point["lr"], step * self.tokens_per_step / elapsed, elapsed, eta)

    @property
    def final_loss(self) -> float:
        return self.curve[-1]["loss"] if self.curve else math.nan


def run_training(name: str, config: ModelConfig, blocks: torch.Tensor, spec: RunSpec, *,
                 teacher: ModelSlice | None = None,
                 heldout: torch.Tensor | None = None) -> TrainOutcome:
    """Train a fresh model of ``config`` on ``blocks`` (N, L+1), one step per ``batch_size``
    rows in order: with ``train_local``, or with :func:`distill` when ``spec.distill_weight``
    is positive (``teacher`` needed)."""
    torch.manual_seed(spec.seed)
    tokens_per_step = spec.batch_size * (blocks.shape[1] - 1)
    progress = _Progress(name, spec, tokens_per_step, heldout)
    t0 = time.perf_counter()
    if spec.distill_weight > 0:
        if teacher is None:
            raise ValueError(f"{name}: distill_weight > 0 needs the teacher model")
        model = build_slice(config, init="random", seed=spec.seed)
        progress.model = model
        distill(model, teacher, blocks, spec, on_step=progress)
        trainer = "p2pllm.recipes.train.distill"
    else:
        model = build_slice(config, init="random", seed=spec.seed)
        progress.model = model
        train_local(model, blocks, steps=spec.steps, batch_size=spec.batch_size,
                    optim=spec.optim(), seed=spec.seed, shuffle=False, on_step=progress)
        trainer = "p2pllm.pillars.splittrain.trainer.train_local"
    model.eval()
    return TrainOutcome(model=model, seconds=time.perf_counter() - t0,
                        tokens=spec.steps * tokens_per_step, trainer=trainer,
                        final_loss=progress.final_loss, curve=progress.curve)


def distill_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
                 weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``((1 - w) * CE(labels) + w * KL(teacher || model), CE)``, both per token (nats)."""
    v = logits.shape[-1]
    flat = logits.reshape(-1, v).float()
    ce = F.cross_entropy(flat, labels.reshape(-1))
    logq = F.log_softmax(flat, dim=-1)
    logp = F.log_softmax(teacher_logits.reshape(-1, v).float(), dim=-1)
    kl = F.kl_div(logq, logp, log_target=True, reduction="batchmean")
    return (1.0 - weight) * ce + weight * kl, ce


def distill(model: ModelSlice, teacher: ModelSlice, blocks: torch.Tensor, spec: RunSpec,
            on_step: Callable[[dict[str, float]], None] | None = None) -> list[float]:
    """Train ``model`` in place on ``blocks`` with :func:`distill_loss`; the per-step losses
    (the blended objective). Data order, schedule and clipping as ``train_local``."""
    if teacher.config.vocab_size != model.config.vocab_size:
        raise ValueError("the teacher and the model must share a vocabulary")
    optim = spec.optim()
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": optim.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=optim.lr, betas=optim.betas, eps=optim.eps)
    teacher.eval()
    model.train()
    losses: list[float] = []
    for s in range(spec.steps):
        t0 = time.perf_counter()
        # 1. the step's batch, and the teacher's view of it
        inputs, labels = split_batch(blocks, batch_rows(blocks.shape[0], spec.batch_size, s,
                                                        spec.seed, shuffle=False))
        b, t = inputs.shape
        positions = torch.arange(t).expand(b, t)
        with torch.inference_mode():
            teacher_logits = teacher(inputs, positions)  # (B, T, V)
        teacher_logits = teacher_logits.clone()
        # 2. forward, blended loss, backward
        logits = model(inputs, positions)  # (B, T, V)
        loss, _ = distill_loss(logits, labels, teacher_logits, spec.distill_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # 3. clip, schedule, step
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip
                                                    or math.inf))
        lr = optim.lr_at(s, spec.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        value = float(loss.detach())
        losses.append(value)
        if on_step is not None:
            on_step({"step": s, "loss": value, "lr": lr, "grad_norm": norm,
                     "seconds": time.perf_counter() - t0})
    model.eval()
    return losses
