"""pillars/paths.py: dataset names confined to the data dir, output names to the state dir, and
directories replaced only when the daemon made them; splittrain data from content = from the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from p2pllm.pillars.paths import (
    MARKER,
    dataset_path,
    file_chunks,
    output_name,
    output_path,
    write_dir,
)
from p2pllm.pillars.splittrain.data import blocks_from_bytes, data_format, load_blocks, read_texts
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode
from tests.conftest import BUNDLED


def code(fn) -> ErrorCode:
    with pytest.raises(ProtocolError) as ei:
        fn()
    return ErrorCode(ei.value.code)


def test_dataset_names_resolve_only_inside_the_data_dir(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir(), out.mkdir()
    (out / "secret.txt").write_text("x")
    (data / "ok.txt").write_text("fine")
    (data / "sub").mkdir()
    (data / "sub" / "a.txt").write_text("a")
    (data / "link.txt").symlink_to(out / "secret.txt")
    (data / "dirlink").symlink_to(out)
    assert dataset_path(str(data), "ok.txt") == data / "ok.txt"
    assert dataset_path(str(data), "sub/a.txt") == data / "sub" / "a.txt"
    for name in ("/etc/hostname", "../out/secret.txt", "sub/../../out/secret.txt", "link.txt",
                 "dirlink/secret.txt", "~/x", "a\x00b"):
        assert code(lambda n=name: dataset_path(str(data), n)) == ErrorCode.FORBIDDEN, name
    assert code(lambda: dataset_path(str(data), "missing.txt")) == ErrorCode.NOT_FOUND
    assert code(lambda: dataset_path(None, "ok.txt")) == ErrorCode.NOT_FOUND  # no --data-dir
    # a directory dataset: every file must resolve inside the root
    (data / "sub" / "b.txt").symlink_to(out / "secret.txt")
    assert code(lambda: read_texts(data / "sub", root=data)) == ErrorCode.FORBIDDEN
    assert read_texts(data / "sub") == ["a", "x"]  # the CLI's own reading is not confined


def test_output_names_and_replacing_only_what_the_daemon_made(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for bad in ("/tmp/x", "..", ".", "a/b", "a/../../b", ".hidden", "a..b", "", "x" * 101, 3):
        assert code(lambda b=bad: output_name(b)) == ErrorCode.FORBIDDEN, bad
    dest = output_path(str(state), "checkpoints", "run-1.a_b")
    assert dest == state / "checkpoints" / "run-1.a_b" and dest.parent.is_dir()
    write_dir(dest, lambda t: (t / "config.json").write_text("{}"), {"job": "j1"})
    assert json.loads((dest / MARKER).read_text()) == {"job": "j1"}
    write_dir(dest, lambda t: (t / "model.bin").write_bytes(b"new"), {"job": "j2"})  # ours: replaced
    assert sorted(p.name for p in dest.iterdir()) == [MARKER, "model.bin"]
    assert [p.name for p in dest.parent.iterdir()] == ["run-1.a_b"]  # no temp or old dirs left
    # a directory the daemon did not make is neither named nor replaced
    theirs = state / "checkpoints" / "handmade"
    theirs.mkdir()
    (theirs / "config.json").write_text("{}")
    assert code(lambda: output_path(str(state), "checkpoints", "handmade")) == ErrorCode.FORBIDDEN
    assert code(lambda: write_dir(theirs, lambda t: None, {})) == ErrorCode.FORBIDDEN
    assert [p.name for p in theirs.iterdir()] == ["config.json"]
    assert output_path(str(state), "checkpoints", "handmade", require_ours=False) == theirs
    (state / "checkpoints" / "out").symlink_to(tmp_path)
    assert code(lambda: output_path(str(state), "checkpoints", "out", require_ours=False)) == ErrorCode.FORBIDDEN


def test_file_chunks_cut_files_in_order_and_leave_out_hidden_ones(tmp_path: Path) -> None:
    (tmp_path / "b.bin").write_bytes(bytes(range(256)) * 5)
    (tmp_path / "a.json").write_text("")
    (tmp_path / MARKER).write_text("{}")
    pieces = list(file_chunks(tmp_path, chunk=500))
    assert [(m["name"], m["offset"], m["size"], len(d)) for m, d in pieces] == [
        ("a.json", 0, 0, 0), ("b.bin", 0, 1280, 500), ("b.bin", 500, 1280, 500), ("b.bin", 1000, 1280, 280)]
    assert b"".join(d for m, d in pieces if m["name"] == "b.bin") == (tmp_path / "b.bin").read_bytes()


def test_blocks_from_content_equal_blocks_from_the_file(tmp_path: Path) -> None:
    ids = tmp_path / "ids.safetensors"
    save_file({"input_ids": torch.arange(3, 200)}, str(ids))
    assert data_format(ids) == "safetensors"
    assert torch.equal(blocks_from_bytes(ids.read_bytes(), "safetensors", 8), load_blocks(ids, 8))
    text = tmp_path / "story.md"
    text.write_text("Once upon a time there was a tiny model.\n\nIt learned to count. " * 8)
    jl = tmp_path / "docs.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"Document {i}: a line of text."}) for i in range(20)))
    for f, fmt in ((text, "text"), (jl, "jsonl")):
        assert data_format(f) == fmt
        got = blocks_from_bytes(f.read_bytes(), fmt, 8, BUNDLED)
        assert torch.equal(got, load_blocks(f, 8, BUNDLED)), fmt
