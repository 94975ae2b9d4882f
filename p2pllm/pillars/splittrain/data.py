"""Training data: a dataset path -> token blocks, and the deterministic order they are used in.

A dataset is a text file (``.txt``, ``.md``, any other suffix read as UTF-8 text), a JSON-lines
file (``.jsonl``: one ``{"text": ...}`` object a line), a directory of such files (sorted,
recursively), or pre-tokenized ids (``.safetensors`` with an integer tensor ``input_ids``).
Texts are tokenized with the model's tokenizer, each document followed by the EOS token, and
concatenated; the id stream is cut into blocks of ``seq_len + 1`` tokens with stride
``seq_len`` (block b's inputs are its first ``seq_len`` tokens, its labels the last
``seq_len``).

Order: step s uses the ``batch_size`` blocks at positions ``[s*B, (s+1)*B)`` of an endless
stream of epochs, each epoch a permutation of all blocks seeded by ``(seed, epoch)``
(:func:`batch_rows`); micro-batch m of a step is rows ``[m*B/M, (m+1)*B/M)`` of that batch
(:func:`micro_rows`). The single-process reference trainer and the first pipeline stage use
these same functions, so both see the same data in the same order.

On a daemon a dataset is either a name under its ``--data-dir`` (resolved by
:func:`p2pllm.pillars.paths.dataset_path`; the files of a directory must resolve inside the
data dir too: ``root``) or the content a CLI sent (:func:`blocks_from_bytes`, in one of
:data:`DATA_FORMATS`); a path from the wire is never opened.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from p2pllm.pillars.training import DataError

__all__ = [
    "DATA_FORMATS",
    "DataError",
    "DatasetNotFound",
    "batch_rows",
    "blocks_from_bytes",
    "data_format",
    "load_blocks",
    "load_token_ids",
    "make_blocks",
    "micro_rows",
    "read_texts",
    "split_batch",
    "texts_from_bytes",
]

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".text")
CHUNK_CHARS = 1 << 20  # tokenize long documents in pieces of about this size


class DatasetNotFound(DataError):
    """The dataset path does not exist on this host."""


DATA_FORMATS = ("text", "jsonl", "safetensors")


def data_format(path: str | Path) -> str:
    """The format of a dataset file, by its suffix (anything else is UTF-8 text)."""
    suffix = Path(path).suffix
    return "safetensors" if suffix == ".safetensors" else "jsonl" if suffix == ".jsonl" else "text"


def read_texts(path: str | Path, root: str | Path | None = None) -> list[str]:
    """The documents of a text / JSON-lines file or of a directory of them, in sorted order.
    ``root``: every file must resolve inside it (a daemon's data dir), else FORBIDDEN."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetNotFound(f"dataset {p} does not exist")
    files = [p] if p.is_file() else sorted(
        f for f in p.rglob("*") if f.is_file() and (f.suffix in TEXT_SUFFIXES or f.suffix == ".jsonl")
    )
    if root is not None:
        from p2pllm.pillars.paths import confined_files

        confined_files(files, root, p.name)
    if not files:
        raise DataError(f"dataset directory {p} holds no .txt, .md or .jsonl files")
    docs: list[str] = []
    for f in files:
        try:
            raw = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read {f} as UTF-8 text: {e}") from e
        if f.suffix == ".jsonl":
            docs.extend(_jsonl_texts(f, raw))
        elif raw.strip():
            docs.append(raw)
    if not docs:
        raise DataError(f"dataset {p} holds no text")
    return docs


def _jsonl_texts(f: Path, raw: str) -> list[str]:
    out = []
    for i, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DataError(f"{f}:{i}: not JSON: {e}") from e
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise DataError(f'{f}:{i}: expected an object with a "text" string')
        out.append(text)
    return out


def _chunks(text: str) -> list[str]:
    """Split a long document at paragraph (else line) breaks into pieces of ~CHUNK_CHARS."""
    if len(text) <= CHUNK_CHARS:
        return [text]
    out, start = [], 0
    while start < len(text):
        end = min(start + CHUNK_CHARS, len(text))
        if end < len(text):
            cut = text.rfind("\n\n", start, end)
            if cut <= start:
                cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        out.append(text[start:end])
        start = end
    return out


def tokenize_texts(texts: Sequence[str], tokenizer: Any) -> torch.Tensor:
    """Concatenated ids of the documents, each followed by the tokenizer's EOS (if any)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for doc in texts:
        for piece in _chunks(doc):
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
        if isinstance(eos, int):
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def texts_from_bytes(data: bytes, fmt: str, what: str = "the dataset sent") -> list[str]:
    """The documents of a dataset's content in format ``fmt`` ("text" or "jsonl")."""
    try:
        raw = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{what} is not UTF-8 text: {e}") from e
    docs = _jsonl_texts(Path(what), raw) if fmt == "jsonl" else [raw] if raw.strip() else []
    if not docs:
        raise DataError(f"{what} holds no text")
    return docs


def _ids_tensor(ids: torch.Tensor, what: str) -> torch.Tensor:
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise DataError(f"{what}: input_ids must be integers, got {ids.dtype}")
    return ids.reshape(-1).to(torch.int64)


def blocks_from_bytes(data: bytes, fmt: str, seq_len: int, tokenizer: Any | None = None,
                      what: str = "the dataset sent") -> torch.Tensor:
    """Token blocks (N, seq_len + 1) of a dataset's content (what a CLI sent; ``fmt`` one of
    :data:`DATA_FORMATS`), as :func:`load_blocks` makes them from the same file."""
    if fmt == "safetensors":
        from safetensors.torch import load

        try:
            tensors = load(bytes(data))
        except Exception as e:
            raise DataError(f"cannot read {what} as safetensors: {e}") from e
        if "input_ids" not in tensors:
            raise DataError(f"{what} has no tensor named 'input_ids'")
        return make_blocks(_ids_tensor(tensors["input_ids"], what), seq_len)
    if fmt not in DATA_FORMATS:
        raise DataError(f"unknown dataset format {fmt!r}")
    if tokenizer is None:
        raise DataError(f"{what} is text: a tokenizer is needed")
    if isinstance(tokenizer, str | Path):
        from p2pllm.engine.loader import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    return make_blocks(tokenize_texts(texts_from_bytes(data, fmt, what), tokenizer), seq_len)


def load_token_ids(path: str | Path, tokenizer: Any | None = None,
                   root: str | Path | None = None) -> torch.Tensor:
    """All token ids of a dataset, 1-D int64. ``tokenizer``: a tokenizer object, or a
    checkpoint directory to load one from; not needed for pre-tokenized ``.safetensors``.
    ``root``: the files of a directory must resolve inside it (see :func:`read_texts`)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetNotFound(f"dataset {p} does not exist")
    if p.is_file() and p.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as st:
                if "input_ids" not in st.keys():
                    raise DataError(f"{p} has no tensor named 'input_ids'")
                ids = st.get_tensor("input_ids")
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"cannot read {p}: {e}") from e
        return _ids_tensor(ids, str(p))
    if tokenizer is None:
        raise DataError(f"dataset {p} is text: a tokenizer is needed")
    texts = read_texts(p, root)  # the files are checked before anything else is loaded
    if isinstance(tokenizer, str | Path):
        from p2pllm.engine.loader import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    return tokenize_texts(texts, tokenizer)


def make_blocks(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Blocks of ``seq_len + 1`` ids with stride ``seq_len``: (N, seq_len + 1)."""
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    ids = ids.reshape(-1)
    n = (ids.numel() - 1) // seq_len
    if n < 1:
        raise DataError(f"the dataset has {ids.numel()} tokens: too few for one block of "
                        f"{seq_len + 1}")
    return ids.unfold(0, seq_len + 1, seq_len)[:n].contiguous()


def load_blocks(path: str | Path, seq_len: int, tokenizer: Any | None = None,
                root: str | Path | None = None) -> torch.Tensor:
    """A dataset as token blocks (N, seq_len + 1), int64."""
    return make_blocks(load_token_ids(path, tokenizer, root), seq_len)


def batch_rows(num_blocks: int, batch_size: int, step: int, seed: int,
               shuffle: bool = True) -> list[int]:
    """Indices of the blocks that make up step ``step``'s batch (see the module doc)."""
    if num_blocks < 1 or batch_size < 1 or step < 0:
        raise DataError(f"bad batch request: {num_blocks} blocks, batch {batch_size}, step {step}")
    rows: list[int] = []
    pos = step * batch_size
    while len(rows) < batch_size:
        epoch, offset = divmod(pos, num_blocks)
        order = _epoch_order(num_blocks, seed, epoch, shuffle)
        take = min(batch_size - len(rows), num_blocks - offset)
        rows.extend(order[offset:offset + take])
        pos += take
    return rows


def _epoch_order(num_blocks: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    order = list(range(num_blocks))
    if shuffle:
        random.Random(f"p2pllm-splittrain:{seed}:{epoch}").shuffle(order)
    return order


def micro_rows(rows: Sequence[int], micro_batches: int, mb: int) -> list[int]:
    """Rows of micro-batch ``mb`` (``micro_batches`` must divide the batch)."""
    if micro_batches < 1 or len(rows) % micro_batches or not 0 <= mb < micro_batches:
        raise DataError(f"cannot cut a batch of {len(rows)} into {micro_batches} equal "
                        f"micro-batches (asked for #{mb})")
    size = len(rows) // micro_batches
    return list(rows[mb * size:(mb + 1) * size])


def split_batch(blocks: torch.Tensor, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (B, T), labels (B, T)) of the given blocks."""
    b = blocks[list(rows)]
    return b[:, :-1].contiguous(), b[:, 1:].contiguous()
