"""Local LoRA training on one client: load the global adapter, train, evaluate. No I/O.

Blocking code, run by the fl-client role in a worker thread. One lock serialises rounds on a
model; a ``cancel`` event stops a round between optimizer steps (the coordinator gave up).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from p2pllm.pillars.federated import lora as lora_mod
from p2pllm.pillars.federated.data import LocalData, load_local_data
from p2pllm.pillars.federated.messages import ClientParams, RoundConfig

log = logging.getLogger(__name__)

EVAL_BATCH = 16
MAX_GRAD_NORM = 1.0


class Cancelled(Exception):
    """The round was cancelled between two steps."""


@dataclass(frozen=True)
class RoundResult:
    tensors: dict[str, Tensor]  # the client's adapter after local training (CPU)
    num_examples: int  # training blocks: the weight of this update
    train_loss: float  # mean loss over this round's local steps
    eval_loss: float  # loss of the trained adapter on the local eval blocks
    steps: int
    seconds: float


def round_seed(seed: int, rnd: int) -> int:
    """Seed of one round's batch order and dropout masks."""
    return (seed * 1_000_003 + rnd) % (2**63 - 1)


class LocalTrainer:
    """A peft-wrapped base model and one client's tokenized blocks."""

    def __init__(self, model: Any, data: LocalData, device: str) -> None:
        self.model = model  # (B, T) ids -> logits; LoRA parameters are the only trainable ones
        self.data = data
        self.device = device
        self.template = lora_mod.adapter_tensors_meta(model)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model_path: str | Path, params: ClientParams, data_dir: str | Path, device: str) -> LocalTrainer:
        from p2pllm.engine.loader import load_tokenizer

        tokenizer = load_tokenizer(model_path)
        data = load_local_data(
            data_dir,
            lambda text: tokenizer(text, add_special_tokens=True)["input_ids"],
            block_size=params.block_size,
            eval_fraction=params.eval_fraction,
            seed=params.seed,
            eos_id=tokenizer.eos_token_id,
        )
        base = lora_mod.load_base_model(model_path, device=device, quantize=params.quantize)
        model = lora_mod.wrap(base, params.lora, params.seed, str(model_path))
        model.eval()
        return cls(model, data, device)

    @property
    def num_examples(self) -> int:
        return self.data.num_examples

    def memory_bytes(self) -> int:
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        buffers = sum(b.numel() * b.element_size() for b in self.model.buffers())
        return int(params + buffers + self.data.train.numel() * 8 + self.data.eval.numel() * 8)

    # -- one round -------------------------------------------------------------------------

    def train_round(
        self, tensors: Mapping[str, Tensor], cfg: RoundConfig, cancel: threading.Event | None = None
    ) -> RoundResult:
        """Load the global adapter, take the round's local steps with a fresh AdamW, evaluate."""
        with self._lock:
            t0 = time.perf_counter()
            lora_mod.set_adapter_tensors(self.model, tensors)
            train = self.data.train  # (N, T)
            n, bsz = train.shape[0], min(cfg.batch_size, train.shape[0])
            steps = cfg.steps_for(n)
            seed = round_seed(cfg.seed, cfg.round)
            gen = torch.Generator().manual_seed(seed)
            params = [p for p in self.model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
            losses: list[float] = []
            with torch.random.fork_rng(devices=[]):  # dropout masks from the round's seed
                torch.manual_seed(seed)
                self.model.train()
                try:
                    order, pos = torch.randperm(n, generator=gen), 0
                    for _ in range(steps):
                        if cancel is not None and cancel.is_set():
                            raise Cancelled(f"round {cfg.round} cancelled after {len(losses)} steps")
                        if pos + bsz > n:  # next epoch
                            order, pos = torch.randperm(n, generator=gen), 0
                        x = train[order[pos : pos + bsz]].to(self.device)  # (B, T)
                        pos += bsz
                        loss = self.model(input_ids=x, labels=x).loss
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                        losses.append(float(loss.detach()))
                finally:
                    self.model.eval()
            eval_loss = self._eval_loss()
            return RoundResult(
                tensors=lora_mod.adapter_tensors(self.model),
                num_examples=n,
                train_loss=sum(losses) / len(losses),
                eval_loss=eval_loss,
                steps=steps,
                seconds=time.perf_counter() - t0,
            )

    def evaluate(self, tensors: Mapping[str, Tensor]) -> float:
        """Mean token loss of ``tensors`` (an adapter) on the local eval blocks."""
        with self._lock:
            lora_mod.set_adapter_tensors(self.model, tensors)
            return self._eval_loss()

    def _eval_loss(self) -> float:
        held = self.data.eval  # (M, T); every block has the same T, so the mean of batch
        total, count = 0.0, 0  # means weighted by batch size is the mean token loss
        with torch.no_grad():
            for i in range(0, held.shape[0], EVAL_BATCH):
                x = held[i : i + EVAL_BATCH].to(self.device)
                loss = float(self.model(input_ids=x, labels=x).loss)
                total += loss * x.shape[0]
                count += x.shape[0]
        out = total / count
        if not math.isfinite(out):
            log.warning("eval loss is not finite (%s)", out)
        return out
