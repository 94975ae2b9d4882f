"""Token streams and the token blocks a causal LM trains and is evaluated on.

Each work is encoded on its own and followed by EOS; the works are concatenated into one
stream. A block of a window of length L at offset o is ``[BOS] + s[o : o+L]`` (L + 1 ids):
its inputs ``[BOS] + s[o : o+L-1]`` start with BOS, as a prompt does at inference (the
tokenizer prepends it), and its labels are the L stream tokens ``s[o : o+L]``. This is the
block layout of :mod:`p2pllm.pillars.splittrain.data` (inputs ``b[:-1]``, labels ``b[1:]``),
so the split-training trainer consumes these blocks as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TokenStream", "encode_works", "eval_blocks", "random_blocks", "window_blocks"]


@dataclass(frozen=True)
class TokenStream:
    ids: torch.Tensor  # (N,) int64
    bos: int

    def __len__(self) -> int:
        return int(self.ids.numel())


def encode_works(tokenizer: Any, texts: Sequence[str]) -> TokenStream:
    """One stream: each text's ids (without BOS) followed by EOS."""
    bos, eos = int(tokenizer.bos_token_id), int(tokenizer.eos_token_id)
    parts: list[torch.Tensor] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        parts.append(torch.tensor([*ids, eos], dtype=torch.int64))
    return TokenStream(torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64), bos)


def window_blocks(stream: TokenStream, offsets: torch.Tensor, length: int) -> torch.Tensor:
    """Blocks (len(offsets), length + 1): BOS, then ``length`` stream tokens from each offset."""
    idx = offsets.to(torch.int64)[:, None] + torch.arange(length)[None, :]  # (N, L)
    out = torch.empty(len(offsets), length + 1, dtype=torch.int64)
    out[:, 0] = stream.bos
    out[:, 1:] = stream.ids[idx]
    return out


def random_blocks(stream: TokenStream, count: int, length: int, seed: int) -> torch.Tensor:
    """``count`` blocks at uniformly random offsets (a fresh torch.Generator seeded ``seed``):
    over several epochs' worth of windows, every token is seen at varying positions."""
    if len(stream) < length:
        raise ValueError(f"the training stream has {len(stream)} tokens, fewer than one "
                         f"window of {length}")
    g = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, len(stream) - length + 1, (count,), generator=g)
    return window_blocks(stream, offsets, length)


def eval_blocks(stream: TokenStream, length: int, max_tokens: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows covering the stream (a tail shorter than a window
    is dropped), at most ``max_tokens`` labels in all: every token is predicted once."""
    n = len(stream) // length
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // length))
    if n == 0:
        raise ValueError(f"the stream has {len(stream)} tokens, fewer than one window of "
                         f"{length}")
    return window_blocks(stream, torch.arange(n) * length, length)
