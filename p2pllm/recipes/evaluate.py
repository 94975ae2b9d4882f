"""Quality figures of a trained pair: held-out perplexity, how often the draft agrees with the
target (greedy speculative acceptance), and sample generations. Engine only, no sockets."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from p2pllm.engine.generate import generate
from p2pllm.engine.model import ModelSlice
from p2pllm.engine.sampling import SamplingParams
from p2pllm.pillars.speculative.acceptance import verify_greedy
from p2pllm.pillars.splittrain.data import split_batch

__all__ = ["AcceptanceReport", "greedy_acceptance", "samples", "top1_agreement"]


@dataclass(frozen=True)
class AcceptanceReport:
    gamma: int  # tokens drafted per round
    prompts: int
    rounds: int  # target passes
    drafted: int
    accepted: int
    generated: int
    rejections: int = 0  # rounds that ended at a drafted token the target disagreed with
    outputs: tuple[tuple[int, ...], ...] = ()  # the tokens generated after each prompt

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens (depends on gamma: tokens after a rejection count as
        drafted but were never tried)."""
        return self.accepted / self.drafted if self.drafted else math.nan

    @property
    def alpha(self) -> float:
        """Per-token acceptance probability: accepted / tried, where a round tries its drafted
        tokens up to and including the first rejection (the censored-geometric estimate the
        speculative pillar's adaptive window uses; Leviathan et al.'s alpha)."""
        tried = self.accepted + self.rejections
        return self.accepted / tried if tried else math.nan

    @property
    def tokens_per_round(self) -> float:
        """Tokens emitted per target pass (accepted + the target's own token)."""
        return self.generated / self.rounds if self.rounds else math.nan

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        del d["outputs"]
        d["acceptance_rate"] = round(self.acceptance_rate, 4)
        d["alpha"] = round(self.alpha, 4)
        d["tokens_per_round"] = round(self.tokens_per_round, 4)
        return d


def _argmax_tail(model: ModelSlice, ids: list[int], n: int) -> list[int]:
    """Greedy next token after each of the last ``n`` positions of ``ids``."""
    x = torch.tensor([ids], dtype=torch.int64)
    logits = model(x, torch.arange(len(ids)).unsqueeze(0))[0, -n:]  # (n, V)
    return [int(t) for t in logits.argmax(-1).tolist()]


@torch.inference_mode()
def greedy_acceptance(target: ModelSlice, draft: ModelSlice, prompts: Sequence[Sequence[int]],
                      new_tokens: int, gamma: int = 4) -> AcceptanceReport:
    """Greedy speculative decoding, simulated in one process: per round the draft proposes
    ``gamma`` greedy tokens, the target scores them in one pass, the longest agreeing prefix
    is accepted (:func:`verify_greedy`) plus the target's next token. The output equals the
    target's own greedy continuation; the report counts what was drafted and accepted."""
    limit = min(target.config.max_position_embeddings, draft.config.max_position_embeddings)
    rounds = drafted = accepted = generated = rejections = 0
    outputs: list[tuple[int, ...]] = []
    for prompt in prompts:
        ids = list(prompt)
        end = min(len(ids) + new_tokens, limit)
        while len(ids) < end:
            g = min(gamma, end - len(ids) - 1)
            proposal: list[int] = []
            for _ in range(g):  # 1. draft g tokens greedily
                proposal += _argmax_tail(draft, ids + proposal, 1)
            # 2. one target pass over the proposal: its greedy token after each position
            verdict = _argmax_tail(target, ids + proposal, g + 1)
            n, nxt = verify_greedy(proposal, verdict)
            ids += [*proposal[:n], nxt]
            rounds += 1
            drafted += g
            accepted += n
            generated += n + 1
            rejections += n < g
        outputs.append(tuple(ids[len(prompt):]))
    return AcceptanceReport(gamma, len(prompts), rounds, drafted, accepted, generated,
                            rejections, tuple(outputs))


@torch.inference_mode()
def top1_agreement(target: ModelSlice, draft: ModelSlice, blocks: torch.Tensor,
                   batch_size: int = 8) -> float:
    """Fraction of positions of ``blocks`` (teacher-forced text) where the two models' greedy
    next tokens are equal (the per-token greedy acceptance probability)."""
    same = total = 0
    for i in range(0, blocks.shape[0], batch_size):
        inputs, _ = split_batch(blocks, range(i, min(i + batch_size, blocks.shape[0])))
        b, t = inputs.shape
        pos = torch.arange(t).expand(b, t)
        a = target(inputs, pos).argmax(-1)
        d = draft(inputs, pos).argmax(-1)
        same += int((a == d).sum())
        total += a.numel()
    return same / max(total, 1)


def samples(model: ModelSlice, tokenizer: Any, prompts: Sequence[str], max_tokens: int,
            params: SamplingParams | None = None) -> list[dict[str, Any]]:
    """Generations (the engine's local loop) from each prompt."""
    out = []
    for p in prompts:
        r = generate(model, tokenizer, p, params or SamplingParams(), max_tokens)
        out.append({"prompt": p, "text": r.text, "token_ids": r.token_ids})
    return out
