"""cli/files.py: the files a coordinator streams back, written by the CLI itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pllm.cli.files import FileSink, OutputError, check_target, run_name_from


def piece(name: str, offset: int, size: int) -> dict:
    return {"event": "file", "name": name, "offset": offset, "size": size}


def test_pieces_make_the_directory_and_it_lands_at_the_end(tmp_path: Path) -> None:
    target = check_target(tmp_path / "out", overwrite=False)
    sink = FileSink(target, overwrite=False)
    sink.add(piece("model.safetensors", 0, 6), b"abc")
    sink.add(piece("model.safetensors", 3, 6), b"def")
    sink.add(piece("config.json", 0, 2), b"{}")
    assert not target.exists()  # nothing in place before the end
    assert sink.finish() == target
    assert (target / "model.safetensors").read_bytes() == b"abcdef"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(("meta", "data"), [
    (piece("../x", 0, 1), b"x"), (piece("a/b", 0, 1), b"x"), (piece(".hidden", 0, 1), b"x"),
    (piece("a", 1, 2), b"x"),  # a gap
    (piece("a", 0, 1), b"xy"),  # past its size
    ({"event": "file", "name": "a", "offset": -1, "size": 1}, b""),
])
def test_bad_pieces_are_refused_and_nothing_is_written(tmp_path: Path, meta: dict, data: bytes) -> None:
    sink = FileSink(tmp_path / "out", overwrite=False)
    with pytest.raises(OutputError):
        sink.add(meta, data)
    sink.discard()
    assert list(tmp_path.iterdir()) == []


def test_a_non_empty_directory_is_replaced_only_with_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(OutputError, match="--overwrite"):
        check_target(out, overwrite=False)
    sink = FileSink(check_target(out, overwrite=True), overwrite=True)
    sink.add(piece("a", 0, 1), b"x")
    sink.finish()
    assert [p.name for p in out.iterdir()] == ["a"]
    short = FileSink(tmp_path / "new", overwrite=False)
    short.add(piece("a", 0, 4), b"x")
    with pytest.raises(OutputError, match="incomplete"):
        short.finish()
    assert not (tmp_path / "new").exists()
    assert run_name_from("/tmp/my out/") == "my_out" and run_name_from("..") == "run"
