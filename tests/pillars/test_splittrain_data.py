"""Dataset -> token blocks, and the deterministic batch order both trainers use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from p2pllm.pillars.splittrain.data import (
    DataError,
    DatasetNotFound,
    batch_rows,
    load_blocks,
    load_token_ids,
    make_blocks,
    micro_rows,
    read_texts,
    split_batch,
)
from tests.conftest import real_model


def test_blocks_overlap_by_one_token_so_labels_are_the_next_tokens() -> None:
    ids = torch.arange(11)
    blocks = make_blocks(ids, 4)  # (11-1)//4 = 2 blocks of 5
    assert blocks.tolist() == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]]
    x, y = split_batch(blocks, [1, 0])
    assert x.tolist() == [[4, 5, 6, 7], [0, 1, 2, 3]]
    assert y.tolist() == [[5, 6, 7, 8], [1, 2, 3, 4]]
    with pytest.raises(DataError, match="too few"):
        make_blocks(torch.arange(4), 4)


def test_batch_order_is_a_seeded_permutation_per_epoch_and_repeats_exactly() -> None:
    n, b = 10, 4
    stream = [r for s in range(5) for r in batch_rows(n, b, s, seed=7)]  # 20 = two epochs
    assert sorted(stream[:10]) == list(range(10))
    assert sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # a new permutation each epoch
    assert batch_rows(n, b, 3, seed=7) == stream[12:16]  # steps are addressable on their own
    assert batch_rows(n, b, 3, seed=7) == batch_rows(n, b, 3, seed=7)
    assert batch_rows(n, b, 0, seed=8) != batch_rows(n, b, 0, seed=7)
    assert batch_rows(n, b, 1, seed=0, shuffle=False) == [4, 5, 6, 7]
    # A batch larger than the dataset wraps into the next epoch.
    assert sorted(batch_rows(3, 5, 0, seed=1)[:3]) == [0, 1, 2]


def test_micro_batches_cut_a_batch_in_order() -> None:
    rows = [9, 8, 7, 6, 5, 4]
    assert [micro_rows(rows, 3, m) for m in range(3)] == [[9, 8], [7, 6], [5, 4]]
    with pytest.raises(DataError, match="equal"):
        micro_rows(rows, 4, 0)


def test_text_jsonl_and_directories(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("second")
    (tmp_path / "d" / "a.md").write_text("first")
    (tmp_path / "d" / "c.jsonl").write_text(json.dumps({"text": "third"}) + "\n\n"
                                            + json.dumps({"text": "fourth"}) + "\n")
    (tmp_path / "d" / "ignored.bin").write_bytes(b"\x00\x01")
    assert read_texts(tmp_path / "d") == ["first", "second", "third", "fourth"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(DataError, match="text"):
        read_texts(bad)
    with pytest.raises(DatasetNotFound):
        read_texts(tmp_path / "missing.txt")
    with pytest.raises(DatasetNotFound):
        load_blocks(tmp_path / "missing.txt", 8)


def test_pretokenized_safetensors(tmp_path: Path) -> None:
    f = tmp_path / "ids.safetensors"
    save_file({"input_ids": torch.arange(20, dtype=torch.int32).reshape(2, 10)}, str(f))
    ids = load_token_ids(f)
    assert ids.dtype == torch.int64 and ids.tolist() == list(range(20))
    save_file({"other": torch.zeros(3)}, str(tmp_path / "no.safetensors"))
    with pytest.raises(DataError, match="input_ids"):
        load_token_ids(tmp_path / "no.safetensors")
    save_file({"input_ids": torch.zeros(3)}, str(tmp_path / "float.safetensors"))
    with pytest.raises(DataError, match="integers"):
        load_token_ids(tmp_path / "float.safetensors")


def test_text_is_tokenized_per_document_with_eos(tmp_path: Path) -> None:
    model = real_model("tinystories-656k")
    from p2pllm.engine.loader import load_tokenizer

    tok = load_tokenizer(model)
    (tmp_path / "a.txt").write_text("Once upon a time")
    (tmp_path / "b.txt").write_text("there was a cat.")
    ids = load_token_ids(tmp_path, model).tolist()
    a = tok("Once upon a time", add_special_tokens=False)["input_ids"]
    b = tok("there was a cat.", add_special_tokens=False)["input_ids"]
    assert ids == [*a, tok.eos_token_id, *b, tok.eos_token_id]
