"""The block KV cache: growth on demand, caps and their typed errors, rows added and removed
without touching other rows, rollback freeing blocks, block accounting, and logits through
the cache (contiguous, fragmented, batched, sliced) equal to a no-cache full forward."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

import p2pllm.engine.model as model_mod
from p2pllm.engine import native
from p2pllm.engine.errors import KVCacheFullError, ModelError, SequenceTooLongError
from p2pllm.engine.kv_cache import KVCache
from p2pllm.engine.loader import load_slice
from tests.engine.conftest import native_missing

TOL = 1e-4
ARCHS = ("llama", "llama-tied", "mistral", "qwen2", "qwen3")  # GQA, head_dim 12/24, window 6


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 96, (1, n), generator=torch.Generator().manual_seed(seed))


def _pos(start: int, n: int) -> torch.Tensor:
    return torch.arange(start, start + n).unsqueeze(0)


def _cache(**kw: Any) -> KVCache:
    args: dict[str, Any] = dict(num_layers=2, num_kv_heads=2, head_dim=4, max_len=40,
                                max_total_tokens=64, block_size=4)
    return KVCache(**(args | kw))


def _feed(cache: KVCache, row: int, n: int, value: float) -> None:
    """Write n positions of ``value`` into ``row`` the way a forward does."""
    plan = cache.plan([row], n)
    k = torch.full((1, n, 2, 4), value)
    for layer in range(cache.start, cache.start + cache.num_layers):
        cache.update(layer, k, k + 0.5, plan, None)
    cache.commit(plan)


@pytest.fixture
def nan_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks come up full of NaN: a read of a slot no forward wrote would poison the logits."""
    alloc = KVCache._alloc_chunk

    def poisoned(self: KVCache, c: int) -> None:
        alloc(self, c)
        chunk = self._chunks[c]
        assert chunk is not None
        chunk.fill_(float("nan"))

    monkeypatch.setattr(KVCache, "_alloc_chunk", poisoned)


def test_blocks_and_storage_grow_only_as_positions_arrive() -> None:
    c = _cache()
    row = c.add_row()
    assert c.nbytes == 0 and c.blocks_used == 0 and c.chunks_allocated == 0
    _feed(c, row, 1, 1.0)
    assert c.blocks_used == 1 and c.chunks_allocated == 1
    chunk = c._chunks[0]
    assert chunk is not None
    ptr = chunk.data_ptr()
    for n in range(2, 41):
        _feed(c, row, 1, float(n))
        assert c.blocks_used == -(-n // 4) and c.length(row) == n
    assert c._chunks[0] is chunk and chunk.data_ptr() == ptr  # decode never reallocated
    assert c.block_table(row) == list(range(10))  # alone: one run, the zero-copy path
    k, v = c.read(row, 1)
    assert k.shape == (2, 40, 4) and torch.equal(k[0, :, 0], torch.arange(1.0, 41.0))
    assert torch.equal(v, k + 0.5)


def test_caps_raise_typed_errors_and_leave_the_cache_as_it_was() -> None:
    c = _cache(max_len=10, max_total_tokens=16)  # 4 blocks in all
    a, b = c.add_row(), c.add_row()
    _feed(c, a, 7, 1.0)
    with pytest.raises(SequenceTooLongError, match="KV cache"):
        c.plan([a], 4)  # 11 > the per-session cap 10
    _feed(c, b, 8, 2.0)  # blocks: a 2, b 2 -> the pool is full
    assert c.blocks_free == 0
    with pytest.raises(KVCacheFullError) as err:
        c.plan([a, b], 1)  # a would need no block, b one more
    assert isinstance(err.value, ModelError) and (err.value.needed, err.value.free) == (1, 0)
    assert c.lengths == [7, 8] and c.blocks_used == 4
    _feed(c, a, 1, 3.0)  # within a's last block: still fine
    c.rollback(b, 4)  # b gives a block back
    _feed(c, b, 4, 4.0)
    assert c.lengths == [8, 8] and c.blocks_free == 0


def test_rows_come_and_go_without_touching_other_rows() -> None:
    c = _cache(max_len=16, max_total_tokens=64)  # one chunk of 4 rows' worth
    rows = [c.add_row() for _ in range(3)]
    for i, r in enumerate(rows):
        _feed(c, r, 6, float(i + 1))
    tables = {r: c.block_table(r) for r in rows}
    before = {r: c.read(r, 0) for r in rows}
    chunk = c._chunks[0]
    assert chunk is not None
    ptr = chunk.data_ptr()
    c.remove_row(rows[1])
    assert not c.has_row(rows[1]) and c.batch == 2
    new = c.add_row()
    assert new == rows[1]  # the lowest free id is reused
    _feed(c, new, 11, 9.0)
    _feed(c, rows[0], 5, 7.0)  # the others grow on
    _feed(c, rows[2], 5, 8.0)
    for r in (rows[0], rows[2]):
        assert c.block_table(r)[:2] == tables[r]  # no block of a live row moved
        k, v = c.read(r, 0)
        assert torch.equal(k[:, :6], before[r][0]) and torch.equal(v[:, :6], before[r][1])
    assert c._chunks[0] is chunk and chunk.data_ptr() == ptr  # nothing was reallocated
    assert c.lengths == [11, 11, 11]


def test_rollback_frees_tail_blocks_for_other_rows() -> None:
    c = _cache(max_len=32, max_total_tokens=32)  # 8 blocks
    a, b = c.add_row(), c.add_row()
    _feed(c, a, 30, 1.0)
    assert c.blocks_used == 8
    with pytest.raises(KVCacheFullError):
        c.plan([b], 1)
    c.rollback(a, 9)
    assert c.length(a) == 9 and c.blocks_used == 3 and len(c.block_table(a)) == 3
    _feed(c, b, 20, 2.0)  # the freed blocks serve b
    assert c.blocks_used == 8
    k, _ = c.read(a, 0)
    assert torch.equal(k, torch.ones(2, 9, 4))
    with pytest.raises(ValueError):
        c.rollback(a, 10)
    c.reset(a)
    assert c.length(a) == 0 and c.blocks_used == 5 and c.has_row(a)


def test_block_accounting_and_chunks_freed_when_empty() -> None:
    c = _cache(max_len=8, max_total_tokens=40, chunk_tokens=8)  # 10 blocks, chunks of 2
    assert (c.num_blocks, c.chunk_blocks, c.block_size) == (10, 2, 4)
    assert c.position_bytes() == 2 * 2 * 2 * 4 * 4 and c.block_bytes == 4 * c.position_bytes()
    rows = [c.add_row() for _ in range(5)]
    for r in rows:
        _feed(c, r, 5, float(r))
        assert c.blocks_used + c.blocks_free == c.num_blocks
    assert c.blocks_used == 10 and c.bytes_in_use == 10 * c.block_bytes
    assert c.chunks_allocated == 5 and c.nbytes == 5 * 2 * c.block_bytes
    for r in rows:
        c.remove_row(r)
    assert c.blocks_used == 0 and c.chunks_allocated == 0 and c.nbytes == 0 and c.batch == 0
    with pytest.raises(IndexError):
        c.plan([0], 1)
    with pytest.raises(ModelError):
        c.read(c.add_row(), 5)  # not one of this cache's layers
    with pytest.raises(ValueError):
        KVCache(num_layers=1, num_kv_heads=1, head_dim=2, max_len=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decode_equals_a_full_forward(tiny: dict[str, Any], arch: str,
                                             nan_storage: None) -> None:
    """Prefill, then one token at a time across block boundaries (blocks of 4): the logits of
    every position equal a forward over the whole sequence without a cache."""
    model = load_slice(tiny[arch].path)
    ids = _ids(21, seed=5)
    with torch.inference_mode():
        ref = model(ids, _pos(0, 21))
        cache = model.new_cache(1, 24, block_size=4)
        outs = [model(ids[:, :7], _pos(0, 7), cache)]
        outs += [model(ids[:, i:i + 1], _pos(i, 1), cache) for i in range(7, 21)]
    assert (torch.cat(outs, 1) - ref).abs().max() < TOL
    assert cache.blocks_used == 6 and cache.lengths == [21]


@pytest.mark.parametrize("paged", [False, True], ids=["gather", "native-paged"])
@pytest.mark.parametrize("arch", ["mistral", "qwen3"])
def test_fragmented_and_batched_rows_equal_a_full_forward(tiny: dict[str, Any], arch: str,
                                                          paged: bool, nan_storage: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows that outgrow their chunk (chunks of 4 blocks of 2) and so span several, decoded
    alone, in a chunked prefill step, and as batches of rows at different lengths in a
    shuffled order, give each row's no-cache logits: batched steps gathered for SDPA, and
    attended in place by the native paged kernel (model.NATIVE_PAGED)."""
    if paged and native.kernels() is None:
        pytest.skip(native_missing())
    monkeypatch.setattr(model_mod, "NATIVE_PAGED", paged)
    calls: list[int] = []
    attend = KVCache.attend_paged
    monkeypatch.setattr(KVCache, "attend_paged",
                        lambda self, *a: calls.append(1) or attend(self, *a))
    model = load_slice(tiny[arch].path)
    seqs = [_ids(n, seed=30 + n)[0] for n in (19, 16, 13)]
    with torch.inference_mode():
        refs = [model(s[None], _pos(0, len(s)))[0] for s in seqs]
        cache = model.new_cache(3, 20, max_total_tokens=60, block_size=2, chunk_tokens=8)
        got: list[list[torch.Tensor]] = [[], [], []]

        def step(rows: list[int], t: int = 1) -> None:
            lens = [cache.length(r) for r in rows]
            x = torch.stack([seqs[r][n:n + t] for r, n in zip(rows, lens, strict=True)])
            pos = torch.stack([torch.arange(n, n + t) for n in lens])
            out = model(x, pos, cache, slots=torch.tensor(rows))
            for j, r in enumerate(rows):
                got[r].append(out[j])

        for r in range(3):
            step([r], 3)  # prefill
        for _ in range(3, 10):
            for r in range(3):
                step([r])  # alone, one token
        for r in range(3):  # 10 positions = 5 blocks: more than one chunk holds
            assert len({b // cache.chunk_blocks for b in cache.block_table(r)}) >= 2
        step([0], 4)  # a chunked-prefill step of a fragmented row
        while order := [r for r in (2, 0, 1) if cache.length(r) < len(seqs[r])]:
            step(order)  # batched: 14/10/10 positions, then ...
    for r, ref in enumerate(refs):
        mine = torch.cat(got[r])
        assert mine.shape == ref.shape and (mine - ref).abs().max() < TOL, r
    assert cache.lengths == [19, 16, 13]
    assert cache.blocks_used == 10 + 8 + 7
    assert bool(calls) == paged  # the batched steps took the path under test


def test_layer_slices_each_hold_only_their_layers(tiny: dict[str, Any]) -> None:
    path = tiny["llama"].path
    whole = load_slice(path)
    parts = [load_slice(path, layers=r) for r in itertools.pairwise((0, 1, 3))]
    ids = _ids(12, seed=8)
    with torch.inference_mode():
        ref = whole(ids, _pos(0, 12))
        caches = [p.new_cache(1, 12, block_size=4) for p in parts]
        outs = []
        for i in range(12):
            x = ids[:, i:i + 1]
            for p, c in zip(parts, caches, strict=True):
                x = p(x, _pos(i, 1), c)
            outs.append(x)
        with pytest.raises(ModelError):
            caches[1].read(0, 0)  # layer 0 lives in the first slice's cache
    assert (torch.cat(outs, 1) - ref).abs().max() < TOL
    assert [c.num_layers for c in caches] == [1, 2] and caches[1].start == 1
    assert caches[1].position_bytes() == 2 * caches[0].position_bytes()


def test_a_step_over_the_pool_is_refused_before_anything_changes(tiny: dict[str, Any]) -> None:
    model = load_slice(tiny["qwen2"].path)
    with torch.inference_mode():
        cache = model.new_cache(2, 16, max_total_tokens=16, block_size=4)
        a = model(_ids(10, 1), _pos(0, 10), cache, slots=torch.tensor([0]))
        with pytest.raises(KVCacheFullError):
            model(_ids(8, 2), _pos(0, 8), cache, slots=torch.tensor([1]))
        assert cache.lengths == [10, 0] and cache.blocks_used == 3
        b = model(_ids(4, 2), _pos(0, 4), cache, slots=torch.tensor([1]))
    assert (a - model(_ids(10, 1), _pos(0, 10))).abs().max() < TOL
    assert cache.lengths == [10, 4] and b.shape == (1, 4, 96)
