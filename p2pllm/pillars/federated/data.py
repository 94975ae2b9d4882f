"""A client's local training data: text files in --data-dir, cut into fixed-length blocks.

The data never leaves the host: only the number of blocks (examples) and losses are reported.
Files: ``*.txt`` (one text per file) and ``*.jsonl`` (one JSON object per line with a ``"text"``
string; other lines are skipped and counted). Files are read in sorted path order, so blocks
and the train/eval split are the same on every run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

# Shared with split training (pillars/training.py); re-exported here.
from p2pllm.pillars.training import DataError as DataError

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".jsonl")
BYTES_PER_TOKEN = 4.0  # a rough average for BPE tokenizers on English text, for estimates only
DEFAULT_BLOCK_SIZE = 128


def data_files(data_dir: str | Path) -> list[Path]:
    """The .txt and .jsonl files under ``data_dir`` (recursive), sorted."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES)


def iter_texts(data_dir: str | Path) -> Iterator[str]:
    """Every non-empty text in the data dir, file by file in sorted order."""
    for path in data_files(data_dir):
        if path.suffix == ".txt":
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text
            continue
        skipped = 0
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    skipped += 1
                    continue
                value = rec.get("text") if isinstance(rec, dict) else None
                if isinstance(value, str) and value.strip():
                    yield value
                else:
                    skipped += 1
        if skipped:
            log.warning("%s: skipped %d lines without a \"text\" string", path, skipped)


def estimate_examples(total_bytes: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """A cheap estimate of the number of blocks ``total_bytes`` of text make (no tokenizing)."""
    return int(total_bytes / BYTES_PER_TOKEN) // max(1, block_size)


def make_blocks(token_lists: Iterable[Sequence[int]], block_size: int, eos_id: int | None) -> Tensor:
    """Concatenate the token lists (EOS between texts) and cut into (N, block_size) int64 blocks.

    The remainder shorter than a block is dropped.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    eos = torch.tensor([eos_id], dtype=torch.int64) if eos_id is not None else None
    parts: list[Tensor] = []
    for ids in token_lists:
        parts.append(torch.as_tensor(list(ids), dtype=torch.int64))
        if eos is not None:
            parts.append(eos)
    stream = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
    n = stream.numel() // block_size
    return stream[: n * block_size].reshape(n, block_size).clone()


def split_blocks(blocks: Tensor, eval_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train, eval): a seeded shuffle, then the first ``ceil``-ish fraction held out for eval.

    At least one block goes to each side when there are two or more blocks.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    n = blocks.shape[0]
    if n < 2:
        raise DataError(f"need at least 2 blocks of data (one to train, one to evaluate), have {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_eval = min(n - 1, max(1, round(n * eval_fraction)))
    return blocks[order[n_eval:]], blocks[order[:n_eval]]


@dataclass(frozen=True)
class LocalData:
    """Tokenized blocks of one client: ``train`` (N, T) and ``eval`` (M, T), int64."""

    train: Tensor
    eval: Tensor
    texts: int

    @property
    def num_examples(self) -> int:
        return int(self.train.shape[0])


def load_local_data(
    data_dir: str | Path,
    encode: Callable[[str], Sequence[int]],
    *,
    block_size: int,
    eval_fraction: float,
    seed: int,
    eos_id: int | None,
) -> LocalData:
    """Read, tokenize, block and split the data dir. Raises DataError when it is unusable."""
    count = 0

    def encoded() -> Iterator[Sequence[int]]:
        nonlocal count
        for text in iter_texts(data_dir):
            count += 1
            yield encode(text)

    blocks = make_blocks(encoded(), block_size, eos_id)
    if count == 0:
        raise DataError(f"no .txt or .jsonl text under {data_dir}")
    if blocks.shape[0] < 2:
        raise DataError(
            f"{data_dir}: {count} texts give {blocks.shape[0]} blocks of {block_size} tokens; "
            f"need at least 2 (add text or lower the block size)"
        )
    train, held = split_blocks(blocks, eval_fraction, seed)
    return LocalData(train=train, eval=held, texts=count)
