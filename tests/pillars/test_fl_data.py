"""A client's local data: reading .txt/.jsonl, fixed-length blocks, the seeded eval split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from p2pllm.daemon.capabilities import scan_fl_data
from p2pllm.pillars.federated.data import (
    DataError,
    data_files,
    estimate_examples,
    iter_texts,
    load_local_data,
    make_blocks,
    split_blocks,
)


def write(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("first story")
    (root / "sub" / "b.jsonl").write_text(
        "\n".join([
            json.dumps({"text": "second"}),
            "",
            "{broken json",
            json.dumps({"title": "no text"}),
            json.dumps({"text": 5}),
            json.dumps(["not", "a", "map"]),
            json.dumps({"text": "third"}),
        ])
    )
    (root / "c.txt").write_text("   \n")  # blank: skipped
    (root / "notes.md").write_text("not data")


def test_texts_come_from_txt_and_jsonl_in_sorted_order_skipping_bad_lines(tmp_path: Path, caplog) -> None:
    write(tmp_path)
    assert [p.name for p in data_files(tmp_path)] == ["a.txt", "c.txt", "b.jsonl"]
    assert list(iter_texts(tmp_path)) == ["first story", "second", "third"]
    assert "skipped 4 lines" in caplog.text
    assert list(iter_texts(tmp_path / "missing")) == []


def test_blocks_concatenate_with_eos_and_drop_the_remainder() -> None:
    blocks = make_blocks([[1, 2, 3], [4, 5]], block_size=3, eos_id=0)  # 1 2 3 0 4 5 0
    assert blocks.dtype == torch.int64
    assert blocks.tolist() == [[1, 2, 3], [0, 4, 5]]
    assert make_blocks([[1, 2]], block_size=4, eos_id=None).shape == (0, 4)
    with pytest.raises(ValueError, match="block_size"):
        make_blocks([[1]], block_size=1, eos_id=None)


def test_split_is_seeded_disjoint_and_keeps_one_block_each_side() -> None:
    blocks = torch.arange(40).view(20, 2)
    train, held = split_blocks(blocks, 0.25, seed=3)
    again_train, again_held = split_blocks(blocks, 0.25, seed=3)
    assert torch.equal(train, again_train) and torch.equal(held, again_held)
    assert held.shape[0] == 5 and train.shape[0] == 15
    rows = {tuple(r) for r in train.tolist()} | {tuple(r) for r in held.tolist()}
    assert len(rows) == 20  # a partition of the blocks
    other_train, _ = split_blocks(blocks, 0.25, seed=4)
    assert not torch.equal(train, other_train)
    tiny_train, tiny_held = split_blocks(blocks[:2], 0.01, seed=0)
    assert tiny_train.shape[0] == 1 and tiny_held.shape[0] == 1
    with pytest.raises(DataError, match="at least 2 blocks"):
        split_blocks(blocks[:1], 0.5, seed=0)
    with pytest.raises(ValueError, match="eval_fraction"):
        split_blocks(blocks, 0.0, seed=0)


def test_load_local_data_tokenizes_blocks_and_splits(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("abcdefghij" * 4)
    data = load_local_data(
        tmp_path, lambda t: [ord(c) for c in t], block_size=4, eval_fraction=0.2, seed=0, eos_id=None
    )
    assert data.texts == 1 and data.num_examples == 8 and data.eval.shape == (2, 4)
    with pytest.raises(DataError, match=r"no \.txt or \.jsonl"):
        load_local_data(tmp_path / "none", list, block_size=4, eval_fraction=0.2, seed=0, eos_id=None)
    with pytest.raises(DataError, match="need at least 2"):
        load_local_data(tmp_path, lambda t: [1], block_size=4, eval_fraction=0.2, seed=0, eos_id=None)


def test_capabilities_advertise_fl_data_and_an_example_estimate(tmp_path: Path) -> None:
    assert scan_fl_data(None) == {"present": False, "files": 0, "bytes": 0, "examples": 0}
    (tmp_path / "x.txt").write_text("a" * 4096)
    (tmp_path / "y.jsonl").write_text(json.dumps({"text": "b" * 1000}) + "\n")
    caps = scan_fl_data(str(tmp_path))
    assert caps["present"] and caps["files"] == 2
    assert caps["examples"] == estimate_examples(caps["bytes"]) == caps["bytes"] // 4 // 128
