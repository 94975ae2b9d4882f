"""The fetch cache on real models: an entry holding only a slice's pieces loads with the
engine's loader and computes what the original files compute, while its files take about the
pieces' bytes on disk; the journal (resume after a crash, wipe on another digest), checks on
bytes and names, eviction."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from p2pllm.engine.config import ModelConfig
from p2pllm.engine.loader import load_slice
from p2pllm.weights.manifest import Manifest, build_manifest
from p2pllm.weights.slices import Need, pieces_for
from p2pllm.weights.store import JOURNAL, CacheFull, CorruptPiece, FetchCache
from p2pllm.wire.frame import ProtocolError
from tests.conftest import BUNDLED
from tests.weights.test_manifest import smollm2_gguf

BLOCK_SLACK = 8192  # a piece's first and last file-system block may be partly used


def source_bytes(src: Path, m: Manifest, i: int) -> bytes:
    p = m.pieces[i]
    with open(src / m.files[p.file].name if src.is_dir() else src, "rb") as fh:
        fh.seek(p.offset)
        return fh.read(p.length)


def fill(cache: FetchCache, src: Path, m: Manifest, ids: list[int]):  # type: ignore[no-untyped-def]
    e = cache.entry(m)
    for i in ids:
        e.write(i, source_bytes(src, m, i))
    e.record(ids)
    return e


def _gguf_of_bundled(tmp_path: Path) -> Path:
    """The bundled model written as a GGUF file (F32), by the engine tests' writer."""
    from safetensors.torch import load_file

    from tests.engine.test_gguf import write_gguf

    cfg = json.loads((BUNDLED / "config.json").read_text())
    state = load_file(str(BUNDLED / "model.safetensors"))
    return write_gguf(tmp_path / "shakespeare-gguf" / "model.gguf", state, cfg)


def _tied_with_both(tmp_path: Path) -> Path:
    """The bundled model (tied) saved with lm_head.weight stored too, a copy of the embedding."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "tied-both"
    shutil.copytree(BUNDLED, out)
    state = load_file(str(BUNDLED / "model.safetensors"))
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(out / "model.safetensors"))
    return out


def _shards(n: int) -> list[tuple[int, int]]:
    return [(0, 1), (1, n - 1), (n - 1, n)]


@pytest.mark.parametrize("kind", ["safetensors", "gguf", "tied-both"])
def test_cached_slices_load_and_compute_like_the_original(tmp_path: Path, kind: str) -> None:
    src = {"safetensors": lambda: BUNDLED, "gguf": lambda: _gguf_of_bundled(tmp_path).parent,
           "tied-both": lambda: _tied_with_both(tmp_path)}[kind]()
    m = build_manifest(src, "shakespeare")
    n = ModelConfig.from_dir(src).num_layers
    ids, pos = torch.tensor([[5, 17, 300, 2, 1000, 44, 9]]), torch.arange(7)[None]
    with torch.inference_mode():
        whole = load_slice(src)(ids, pos)
        x_local = x_cached = ids
        for k, (a, b) in enumerate(_shards(n)):
            need = Need.for_layers(a, b, n)
            cache = FetchCache(tmp_path / f"cache{k}")  # one node per shard
            e = fill(cache, src, m, pieces_for(m, need))
            x_local = load_slice(src, layers=(a, b))(x_local, pos)
            x_cached = load_slice(e.path, layers=(a, b), embed=need.embed,
                                  head=need.head)(x_cached, pos)
            assert torch.equal(x_local, x_cached)
            # the sparse files take the pieces' bytes, not the model's
            held = m.nbytes(pieces_for(m, need))
            assert held <= e.disk_bytes() <= held + BLOCK_SLACK * len(pieces_for(m, need))
            assert e.disk_bytes() < 0.75 * m.file_bytes
            assert not e.complete()
    assert torch.equal(x_local, whole) and torch.equal(x_cached, whole)


def test_smollm2_middle_slice_from_the_cache(tmp_path: Path) -> None:
    file = smollm2_gguf()
    m = build_manifest(file, "smollm2")
    need = Need((10, 20), False, False)
    e = fill(FetchCache(tmp_path / "c"), file, m, pieces_for(m, need))
    assert e.disk_bytes() < 0.5 * m.file_bytes
    h = torch.randn(1, 5, ModelConfig.from_dir(file).hidden_size, generator=torch.Generator()
                    .manual_seed(0))
    pos = torch.arange(5)[None]
    with torch.inference_mode():
        ref = load_slice(file, layers=(10, 20), embed=False, head=False)(h, pos)
        ours = load_slice(e.path, layers=(10, 20), embed=False, head=False)(h, pos)
    assert torch.equal(ref, ours)


def test_journal_survives_a_crash_and_lists_only_recorded_pieces(tmp_path: Path) -> None:
    m = build_manifest(BUNDLED, "shakespeare")
    cache = FetchCache(tmp_path / "c")
    e = cache.entry(m)
    assert e.path == tmp_path / "c" / "shakespeare" and e.have() == set()
    assert all((e.path / f.name).stat().st_size == f.size for f in m.files)
    assert e.disk_bytes() < 8192 * len(m.files)  # holes
    for i in range(6):
        e.write(i, source_bytes(BUNDLED, m, i))
    e.record([0, 1, 2])
    assert not (e.path / (JOURNAL + ".tmp")).exists()
    # the process dies with 3..5 written but not recorded: a new cache sees 0..2 only
    again = FetchCache(tmp_path / "c").entry(m)
    assert again.have() == {0, 1, 2} and again.missing(range(6)) == [3, 4, 5]
    assert FetchCache(tmp_path / "c").find("shakespeare").have() == {0, 1, 2}  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="not written"):
        again.record([3])
    # the rest, then complete
    rest = again.missing(range(len(m.pieces)))
    for i in rest:
        again.write(i, source_bytes(BUNDLED, m, i))
    again.record(rest)
    assert again.complete() and again.have_bytes() == m.total_bytes
    for f in m.files:  # a complete entry holds the model byte for byte
        assert (again.path / f.name).read_bytes() == (BUNDLED / f.name).read_bytes()


def test_unsynced_pieces_are_verified_when_the_entry_reopens(tmp_path: Path) -> None:
    m = build_manifest(BUNDLED, "shakespeare")
    e = fill(FetchCache(tmp_path / "c", sync_interval=3600), BUNDLED, m, list(range(6)))
    journal = json.loads((e.path / JOURNAL).read_text())
    assert journal["have"] == journal["unsynced"] == list(range(6))  # no fsync yet
    # a power loss took piece 2's bytes (it reads as zeros again): only it is dropped
    p = m.pieces[2]
    with open(e.path / m.files[p.file].name, "r+b") as fh:
        fh.seek(p.offset)
        fh.write(bytes(p.length))
    again = FetchCache(tmp_path / "c").entry(m)
    assert again.have() == {0, 1, 3, 4, 5}
    assert json.loads((again.path / JOURNAL).read_text())["unsynced"] == []
    # sync_interval 0: every record is fsynced; sync() makes all durable
    e0 = fill(FetchCache(tmp_path / "d", sync_interval=0), BUNDLED, m, [0, 1])
    assert json.loads((e0.path / JOURNAL).read_text())["unsynced"] == []
    e1 = fill(FetchCache(tmp_path / "e", sync_interval=3600), BUNDLED, m, [0, 1])
    e1.sync()
    assert json.loads((e1.path / JOURNAL).read_text())["unsynced"] == []


def test_another_digest_or_a_bad_journal_wipes_the_entry(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(BUNDLED, src)
    m = build_manifest(src, "shakespeare")
    cache = FetchCache(tmp_path / "c")
    e = fill(cache, src, m, list(range(10)))
    stale = e.path / "model.safetensors"
    cfg = src / "config.json"
    cfg.write_text(cfg.read_text() + "\n")
    os.utime(cfg, ns=(2, 2))
    changed = build_manifest(src, "shakespeare")
    assert changed.digest != m.digest
    e2 = FetchCache(tmp_path / "c").entry(changed)
    assert e2.have() == set() and e2.disk_bytes() < 8192 * len(m.files)
    assert stale.stat().st_blocks * 512 < 8192
    # an unreadable journal: wiped too
    fill(FetchCache(tmp_path / "c"), src, changed, [0])
    (e2.path / JOURNAL).write_text("{not json")
    assert FetchCache(tmp_path / "c").find("shakespeare") is None
    assert FetchCache(tmp_path / "c").entry(changed).have() == set()
    # a held piece's file cut short: wiped
    fill(FetchCache(tmp_path / "c"), src, changed, [0])
    os.truncate(e2.path / changed.files[changed.pieces[0].file].name, 3)
    assert FetchCache(tmp_path / "c").entry(changed).have() == set()


def test_bad_bytes_are_refused(tmp_path: Path) -> None:
    m = build_manifest(BUNDLED, "shakespeare")
    e = FetchCache(tmp_path / "c").entry(m)
    good = bytearray(source_bytes(BUNDLED, m, 3))
    good[len(good) // 2] ^= 1
    with pytest.raises(CorruptPiece, match="sha256"):
        e.write(3, good)
    with pytest.raises(CorruptPiece, match="came as"):
        e.write(3, bytes(good[:-1]))
    with pytest.raises(ValueError, match="not written"):
        e.record([3])
    good[len(good) // 2] ^= 1
    e.write(m.pieces[3], memoryview(good))  # a memoryview, no copy
    e.record([3])
    assert e.have() == {3}


def test_names_are_checked_again(tmp_path: Path) -> None:
    cache = FetchCache(tmp_path / "c")
    for bad in ("../x", "/abs", "a/../../b", ".hidden"):
        with pytest.raises(ProtocolError):
            cache.find(bad)
    m = build_manifest(BUNDLED, "org/shakespeare")
    e = cache.entry(m)
    assert e.path == tmp_path / "c" / "org+shakespeare" and cache.names() == ["org/shakespeare"]
    assert cache.find("org/shakespeare") is e and cache.find("other") is None
    victim = tmp_path / "elsewhere"
    victim.mkdir()
    (tmp_path / "c" / "link").symlink_to(victim)
    with pytest.raises(Exception, match="symlink"):
        cache.entry(build_manifest(BUNDLED, "link"))
    assert list(victim.iterdir()) == []


def test_make_room_evicts_least_recently_used(tmp_path: Path) -> None:
    ms = [build_manifest(BUNDLED, name) for name in ("a", "b", "c")]
    cache = FetchCache(tmp_path / "c", max_bytes=10 << 20)
    for k, m in enumerate(ms):
        e = fill(cache, BUNDLED, m, list(range(len(m.pieces))))
        os.utime(e.path / JOURNAL, (1000 + k, 1000 + k))
    cache.max_bytes = 3 * ms[0].file_bytes + (1 << 20)
    cache.make_room(ms[0].file_bytes, keep="a")  # "a" is the oldest but kept: "b" goes
    assert cache.names() == ["a", "c"]
    with pytest.raises(CacheFull, match="cap"):
        cache.make_room(10 * ms[0].file_bytes, keep="a")
    assert cache.names() == ["a"]
    assert FetchCache(tmp_path / "c").make_room(1 << 40) is None  # no cap


def test_an_entry_deleted_on_disk_is_not_trusted_from_memory(tmp_path: Path) -> None:
    """An operator deletes a cache folder while the daemon runs: the open entry must not be
    handed out as holding its pieces (a role would load an empty folder)."""
    m = build_manifest(BUNDLED, "shakespeare")
    cache = FetchCache(tmp_path / "c")
    e = fill(cache, BUNDLED, m, [0, 1, 2])
    assert cache.find("shakespeare") is e and cache.entry(m) is e
    shutil.rmtree(e.path)
    assert cache.find("shakespeare") is None  # no journal on disk: nothing cached
    again = cache.entry(m)
    assert again is not e and e.closed and again.have() == set()
    assert all((again.path / f.name).stat().st_size == f.size for f in m.files)
    fill(cache, BUNDLED, m, [0])
    (again.path / m.files[m.pieces[0].file].name).unlink()  # one file gone
    assert cache.entry(m).have() == set()


def test_a_closed_entry_s_sync_leaves_its_folder_alone(tmp_path: Path) -> None:
    """A sync still pending after a fetch (the daemon runs it in the background) must not
    write its journal into a folder wiped and re-made for another manifest meanwhile."""
    m = build_manifest(BUNDLED, "shakespeare")
    cache = FetchCache(tmp_path / "c", sync_interval=3600)
    old = fill(cache, BUNDLED, m, [0, 1])
    assert cache.remove("shakespeare") and old.closed
    new = fill(cache, BUNDLED, m, [3])
    old.sync()  # a no-op: the entry was closed
    journal = json.loads((new.path / JOURNAL).read_text())
    assert journal["have"] == journal["unsynced"] == [3]
    new.sync()
    assert json.loads((new.path / JOURNAL).read_text())["unsynced"] == []
