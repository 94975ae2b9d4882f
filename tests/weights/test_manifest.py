"""Manifests of real model files: the bundled safetensors model, GGUF files written here with
gguf.GGUFWriter, SmolLM2 from the shared checkout; the checks from_wire makes on a peer's."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from p2pllm.engine.errors import CheckpointError
from p2pllm.weights import manifest as manifest_mod
from p2pllm.weights.manifest import (
    CHUNK,
    MAX_FILES,
    MAX_PIECES,
    Manifest,
    build_manifest,
    model_files,
)
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode
from tests.conftest import BUNDLED, SHARED_MODELS, SHARED_SKIP

SMOLLM2 = SHARED_MODELS / "smollm2-135m-instruct"


def smollm2_gguf() -> Path:
    files = sorted(SMOLLM2.glob("*.gguf"))
    if not files:
        pytest.skip(f"{SHARED_SKIP}: {SMOLLM2}/*.gguf is not present")
    return files[0]


def write_test_gguf(path: Path, big: int = CHUNK + 1000) -> dict[str, np.ndarray]:
    """A GGUF file with a tensor over one CHUNK, odd-sized ones (alignment padding after
    them) and a Q8_0 one; returns the tensors by name."""
    rng = np.random.default_rng(1)
    tensors = {
        "token_embd.weight": rng.standard_normal((big // 4,)).astype(np.float32),
        "blk.0.attn_norm.weight": rng.standard_normal((7,)).astype(np.float32),
        "blk.0.attn_q.weight": rng.standard_normal((3, 5)).astype(np.float16),
        "blk.1.attn_norm.weight": rng.standard_normal((9,)).astype(np.float32),
        "output_norm.weight": rng.standard_normal((13,)).astype(np.float32),
    }
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_token_list([f"tok{i}" for i in range(300)])
    w.add_array("test.ints", [1, 2, 3])
    w.add_array("test.nested", [[1, 2], [3]])
    for name, a in tensors.items():
        w.add_tensor(name, a)
    q = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32),
                             gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.1.ffn_up.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    tensors["blk.1.ffn_up.weight"] = q
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def check_pieces_hash(m: Manifest, root: Path) -> None:
    for p in m.pieces:
        f = root / m.files[p.file].name if root.is_dir() else root
        with open(f, "rb") as fh:
            fh.seek(p.offset)
            assert hashlib.sha256(fh.read(p.length)).hexdigest() == p.sha256


# -- local models -------------------------------------------------------------------------------


def test_safetensors_manifest_matches_the_header() -> None:
    m = build_manifest(BUNDLED, "shakespeare")
    assert m.model == "shakespeare" and m.format == "safetensors"
    names = [f.name for f in m.files]
    assert names == sorted(p.name for p in BUNDLED.iterdir() if p.is_file())
    assert all(f.size == (BUNDLED / f.name).stat().st_size for f in m.files)
    st = names.index("model.safetensors")
    raw = (BUNDLED / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    head = [p for p in m.pieces if p.file == st and p.tensor is None]
    assert [(p.offset, p.length) for p in head] == [(0, 8 + n)]
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        lo, hi = meta["data_offsets"]
        ps = [m.pieces[i] for i in m.tensor_pieces(name)]
        assert ps[0].offset == 8 + n + lo and sum(p.length for p in ps) == hi - lo
        assert all(a.offset + a.length == b.offset for a, b in itertools.pairwise(ps))
    # non-tensor files are whole pieces
    cfg = names.index("config.json")
    assert [(p.offset, p.length, p.tensor) for p in m.pieces if p.file == cfg] == \
        [(0, m.files[cfg].size, None)]
    check_pieces_hash(m, BUNDLED)


def test_gguf_manifest_chunks_tensors_and_skips_padding(tmp_path: Path) -> None:
    path = tmp_path / "m" / "model.gguf"
    path.parent.mkdir()
    tensors = write_test_gguf(path)
    m = build_manifest(path.parent, "test/model")
    assert m.format == "gguf" and [f.name for f in m.files] == ["model.gguf"]
    reader = gguf.GGUFReader(str(path))
    head = [p for p in m.pieces if p.tensor is None]
    assert head[0].offset == 0 and sum(p.length for p in head) == reader.data_offset
    for t in reader.tensors:
        ps = [m.pieces[i] for i in m.tensor_pieces(t.name)]
        assert ps[0].offset == t.data_offset and sum(p.length for p in ps) == t.n_bytes
        assert all(p.length <= CHUNK for p in ps)
    assert len(m.tensor_pieces("token_embd.weight")) == 2  # CHUNK + 1000 bytes: two pieces
    assert set(m.tensor_names()) == set(tensors)
    # padding after the odd-sized tensors is in no piece; what is in a piece is the file
    covered = sum(p.length for p in m.pieces)
    assert covered < m.files[0].size
    check_pieces_hash(m, path.parent)
    # a .gguf file itself is a model too
    assert build_manifest(path, "x").pieces == m.pieces


def test_smollm2_gguf_manifest_matches_the_engine_reader() -> None:
    from p2pllm.engine.gguf import GGUFFile  # imports torch: fine in a test

    file = smollm2_gguf()
    m = build_manifest(file, "smollm2")
    with GGUFFile(file) as f:
        infos = f.tensors
    assert set(m.tensor_names()) == set(infos)
    for name, info in infos.items():
        ps = [m.pieces[i] for i in m.tensor_pieces(name)]
        assert ps[0].offset == info.offset and sum(p.length for p in ps) == info.nbytes
    assert m.pieces[0].offset == 0 and m.pieces[0].tensor is None


def test_file_listing_skips_dotfiles_odd_names_and_deep_folders(tmp_path: Path) -> None:
    d = tmp_path / "m"
    (d / "sub" / "deep").mkdir(parents=True)
    for name in ("config.json", ".hidden", "we ird.txt", "sub/a.json", "sub/.x",
                 "sub/deep/b.json"):
        (d / name).write_text("x")
    (d / "empty.bin").write_bytes(b"")
    assert [n for n, _ in model_files(d)] == ["config.json", "empty.bin", "sub/a.json"]
    m = build_manifest(d, "m")
    assert m.format == "other" and [p.file for p in m.pieces] == [0, 2]  # empty: no piece


def test_hashes_are_cached_per_file_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "m"
    shutil.copytree(BUNDLED, d)
    calls: list[Path] = []
    real = manifest_mod._hash_file

    def counting(path: Path, *a: Any) -> list[str]:
        calls.append(path)
        return real(path, *a)

    monkeypatch.setattr(manifest_mod, "_hash_file", counting)
    first = build_manifest(d, "m")
    assert len(calls) == len(first.files)
    assert build_manifest(d, "m") == first and len(calls) == len(first.files)
    cfg = d / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    os.utime(cfg, ns=(1, 1))
    changed = build_manifest(d, "m")
    assert calls[-1] == cfg and len(calls) == len(first.files) + 1
    assert changed.digest != first.digest


def test_a_corrupt_gguf_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    write_test_gguf(path, big=4000)
    data = path.read_bytes()
    path.write_bytes(data[:200])  # truncated inside the metadata
    with pytest.raises(CheckpointError, match="truncated"):
        build_manifest(path, "m")
    path.write_bytes(b"XXXX" + data[4:])
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        build_manifest(path, "m")


# -- wire ---------------------------------------------------------------------------------------


def test_wire_round_trip_and_digest() -> None:
    m = build_manifest(BUNDLED, "shakespeare")
    w = m.to_wire()
    back = Manifest.from_wire(json.loads(json.dumps(w)))  # lists, as msgpack gives them
    assert back == m and back.digest == m.digest and len(m.digest) == 64
    w["pieces"][3][3] = "0" * 64
    assert Manifest.from_wire(w).digest != m.digest


def _wire(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"model": "m", "format": "other", "files": [["a.json", 100]],
                         "pieces": [[0, 0, 50, "a" * 64, None], [0, 50, 50, "b" * 64, "t"]]}
    d.update(over)
    return d


@pytest.mark.parametrize("over, why", [
    ({"model": "../x"}, "model name"),
    ({"model": "/abs"}, "model name"),
    ({"model": ".hidden"}, "model name"),
    ({"model": 5}, "model name"),
    ({"files": [["../a.json", 100]]}, "file name"),
    ({"files": [["/etc/passwd", 100]]}, "file name"),
    ({"files": [["a/b/c.json", 100]]}, "file name"),
    ({"files": [["a.json", 100], ["a.json", 5]]}, "twice"),
    ({"files": [["a.json", 100], ["a.json/x", 5]]}, "both a file and a folder"),
    ({"files": [["a.json", -1]]}, "size"),
    ({"files": [["a.json", True]]}, "size"),
    ({"format": "zip"}, "format"),
    ({"pieces": [[0, 0, 60, "a" * 64, None], [0, 50, 50, "b" * 64, None]]}, "overlaps"),
    ({"pieces": [[0, 50, 50, "a" * 64, None], [0, 0, 50, "b" * 64, None]]}, "overlaps"),
    ({"pieces": [[0, 90, 20, "a" * 64, None]]}, "a 100-byte file"),
    ({"pieces": [[1, 0, 20, "a" * 64, None]]}, "names file #1"),
    ({"pieces": [[0, 0, 0, "a" * 64, None]]}, "length"),
    ({"pieces": [[0, -5, 10, "a" * 64, None]]}, "lies at bytes"),
    ({"pieces": [[0, 0, 10, "A" * 64, None]]}, "sha256"),
    ({"pieces": [[0, 0, 10, "a" * 64, 7]]}, "tensor"),
    ({"pieces": [[0, 0.0, 10, "a" * 64, None]]}, "not an integer"),
    ({"pieces": [[0, 0, 10, "a" * 64]]}, "is not"),
    ({"files": [["big", CHUNK * 2]], "pieces": [[0, 0, CHUNK + 1, "a" * 64, None]]}, "length"),
    ({"files": [["a", 1 << 41], ["b", 1 << 41], ["c", 1]]}, "bytes in all"),
    ({"pieces": [[0, 0, 1, "a" * 64, None]] * (MAX_PIECES + 1)}, "pieces"),
    ({"files": [["a", 1]] * (MAX_FILES + 1)}, "files"),
    ({"files": "a"}, "lists"),
])
def test_from_wire_rejects_hostile_manifests(over: dict[str, Any], why: str) -> None:
    with pytest.raises(ProtocolError, match=why) as e:
        Manifest.from_wire(_wire(**over))
    assert e.value.code == ErrorCode.BAD_REQUEST
    assert Manifest.from_wire(_wire()).pieces[1].tensor == "t"  # the base case is fine


def test_no_torch_at_import() -> None:
    code = ("import sys, p2pllm.weights.manifest, p2pllm.weights.slices; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
