"""KV memory that grows with the tokens held (issue 12, resource policy): the verifier's and a
shard's caches allocate small storage chunks as positions arrive (no buffer of the model's
full context up front), each taken from a KVBudget; past the budget a step is refused with a
typed error before anything changes, a refused session leaves no row, block or byte behind,
and the outputs are those of the model run locally."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from p2pllm.engine.errors import KVBudgetError
from p2pllm.engine.generate import generate_ids
from p2pllm.engine.kv_cache import GROW_CHUNK_BYTES, KVBudget, KVCache, grow_chunk_tokens
from p2pllm.engine.loader import load_slice
from p2pllm.engine.sampling import SamplingParams
from p2pllm.pillars.speculative.drafts import random_llama
from p2pllm.pillars.speculative.messages import OpenRequest, VerifyReply, VerifyWindow
from p2pllm.pillars.speculative.models import MODELS
from p2pllm.pillars.speculative.verifier import VerifierEngine
from p2pllm.pillars.split.compute import Sampler, ShardEngine, Step
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode
from tests.conftest import wait_for

torch.set_num_threads(1)

PROMPT = tuple(range(3, 36))  # 33 tokens: the verifier holds 32 positions
POSITION = 2 * 2 * 2 * 8 * 4  # bytes of one position: 2 layers x K,V x 2 kv heads x 8 x fp32


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("grow") / "target"
    return random_llama(path, vocab_size=256, hidden_size=32, layers=2, max_positions=2048,
                        seed=0)


def test_chunk_size_and_budget_accounting() -> None:
    assert grow_chunk_tokens(POSITION, 2048, 16, chunk_bytes=64 * POSITION) == 64
    assert grow_chunk_tokens(POSITION, 40, 16, chunk_bytes=64 * POSITION) == 48  # <= a row
    assert grow_chunk_tokens(1 << 30, 2048, 16) == 16  # at least one block
    c = KVCache(num_layers=2, num_kv_heads=2, head_dim=8, max_len=2048, max_total_tokens=4096,
                block_size=16, chunk_tokens=64)
    assert c.position_bytes() == POSITION
    c.budget = budget = KVBudget(limit=3 * 64 * POSITION)  # three chunks
    row = c.add_row()
    held = []
    for n in range(1, 193):
        plan = c.plan([row], 1)
        k = torch.full((1, 1, 2, 8), float(n))
        for layer in range(2):
            c.update(layer, k, k, plan, None)
        c.commit(plan)
        held.append(c.nbytes)
        assert budget.used == c.nbytes == c.chunks_allocated * 64 * POSITION
    assert held[0] == 64 * POSITION and held[63] == 64 * POSITION and held[64] == 128 * POSITION
    assert held[-1] == 3 * 64 * POSITION  # 192 positions: 3 chunks of 64
    before = (c.lengths, c.blocks_used, c.nbytes)
    with pytest.raises(KVBudgetError) as err:  # a 193rd position needs a 4th chunk
        c.plan([row], 1)
    assert err.value.limit == 3 * 64 * POSITION and err.value.free == 0
    assert (c.lengths, c.blocks_used, c.nbytes) == before  # nothing changed
    c.remove_row(row)
    assert c.nbytes == 0 and budget.used == 0


async def test_verifier_kv_grows_with_tokens_and_outputs_stay(target: Path) -> None:
    ref = generate_ids(load_slice(target), PROMPT, max_tokens=120, stop_ids=[]).token_ids
    loaded = await MODELS.acquire(target)
    engine = VerifierEngine(loaded, max_sessions=4, chunk_bytes=64 * POSITION)
    engine.start()
    try:
        a = await engine.open("j", OpenRequest(PROMPT, 120, SamplingParams(), 0), 60)
        cache = engine.cache
        assert cache is not None and cache.chunk_blocks * cache.block_size == 64
        full_context = 2048 * cache.position_bytes()
        assert cache.nbytes == 64 * POSITION < full_context  # no full-context buffer
        held, pos, got = [cache.nbytes], len(PROMPT), []
        while len(got) < 118:
            window = tuple(ref[len(got):len(got) + 6])
            r = await engine.verify("j", VerifyWindow(a.session, pos, window))
            assert (r.accepted, r.next) == (len(window), ref[len(got) + len(window)])
            got += [*window, r.next]
            pos += len(window) + 1
            held.append(cache.nbytes)
        assert got == list(ref[:len(got)])  # the target's own greedy tokens
        assert held == sorted(held) and held[-1] == -(-(pos - 1) // 64) * 64 * POSITION
        assert held[-1] > held[0] and engine.kv_budget.used == cache.nbytes
        engine.close("j", a.session)
        await wait_for(lambda: engine.cache is None, timeout=10, what="the cache to be dropped")
        assert engine.kv_budget.used == 0
    finally:
        await engine.aclose()
        MODELS.release(loaded)


async def test_verifier_default_chunks_hold_far_less_than_a_full_context(tmp_path: Path) -> None:
    """A target whose full context (8192 positions x 8 KiB = 64 MiB) is over a chunk: one
    session of 33 tokens holds one 16 MiB chunk (the old cache took the full context)."""
    path = random_llama(tmp_path / "wide", vocab_size=256, hidden_size=256, heads=4, kv_heads=4,
                        layers=4, max_positions=8192, seed=1)
    loaded = await MODELS.acquire(path)
    engine = VerifierEngine(loaded, max_sessions=4)
    engine.start()
    try:
        await engine.open("j", OpenRequest(PROMPT, 8, SamplingParams(), 0), 60)
        cache = engine.cache
        assert cache is not None and cache.position_bytes() == 8192
        assert cache.nbytes == GROW_CHUNK_BYTES == cache.chunks_allocated * GROW_CHUNK_BYTES
        assert cache.nbytes * 4 == 8192 * cache.position_bytes()
    finally:
        await engine.aclose()
        MODELS.release(loaded)


async def test_verifier_over_the_kv_budget_refuses_and_leaves_nothing(target: Path) -> None:
    ref = generate_ids(load_slice(target), PROMPT, max_tokens=8, stop_ids=[]).token_ids
    loaded = await MODELS.acquire(target)
    engine = VerifierEngine(loaded, max_sessions=4, chunk_bytes=64 * POSITION)
    engine.start()
    try:
        engine.kv_budget.limit = 2 * 64 * POSITION  # two chunks of 64 positions
        a = await engine.open("j", OpenRequest(PROMPT, 8, SamplingParams(), 0), 60)
        long_prompt = tuple(range(3, 3 + 150))  # 149 positions: three chunks
        with pytest.raises(ProtocolError) as err:
            await engine.open("j", OpenRequest(long_prompt, 8, SamplingParams(), 0), 60)
        assert err.value.code == ErrorCode.OVER_LIMIT
        assert "over the cap 32768 (config key memory_budget)" in err.value.message
        await wait_for(lambda: len(engine.sessions) == 1 and engine.cache is not None
                       and engine.cache.batch == 1, timeout=10, what="the refused row freed")
        assert engine.cache is not None and engine.cache.nbytes == 64 * POSITION
        assert engine.kv_budget.used == 64 * POSITION
        r = await engine.verify("j", VerifyWindow(a.session, len(PROMPT), tuple(ref[:4])))
        assert (r.accepted, r.next) == (4, ref[4])  # the other session goes on
    finally:
        await engine.aclose()
        MODELS.release(loaded)


def test_shard_kv_grows_and_equals_one_chunk(target: Path) -> None:
    prompt = list(range(3, 40))

    def run(engine: ShardEngine) -> tuple[list[int], list[int]]:
        row = engine.take_row()
        assert row is not None
        sampler = Sampler(SamplingParams(), len(prompt), 100, stop_ids=())
        x, pos, out, held = torch.tensor(prompt), 0, [], []
        while True:
            (logits,) = engine.run([Step(row, pos, engine.check_input({"ids": x}, pos, 200),
                                         True)])
            held.append(engine.cache.nbytes)
            token, reason = sampler.next(logits)
            out.append(token)
            if reason:
                break
            pos, x = sampler.next_pos, torch.tensor([token])
        engine.give_row(row)
        assert engine.cache.nbytes == 0 and engine.kv_budget.used == 0
        return out, held

    small, held = run(ShardEngine(load_slice(target), rows=2, max_len=200,
                                  chunk_bytes=32 * POSITION))
    whole, _ = run(ShardEngine(load_slice(target), rows=2, max_len=200))
    ref = generate_ids(load_slice(target), prompt, max_tokens=100, stop_ids=[]).token_ids
    assert small == whole == list(ref)
    assert held[0] == 64 * POSITION and held[-1] == 5 * 32 * POSITION  # 136 positions
    assert held == sorted(held)


def test_a_shard_batch_the_budget_refuses_runs_the_rows_that_fit(target: Path) -> None:
    """batch_decode: one row needs a new chunk the budget refuses; the other row's step still
    runs (alone) and samples the model's own token, the refused one gets the typed error."""
    from p2pllm.engine.errors import KVCacheFullError
    from p2pllm.pillars.split.shard import ShardRole, _Session, _Work

    engine = ShardEngine(load_slice(target), rows=2, max_len=200, chunk_bytes=32 * POSITION)
    role = ShardRole.__new__(ShardRole)  # only what _compute uses: the engine
    role.engine = engine
    a_prompt, b_prompt = list(range(3, 23)), list(range(40, 72))  # 20 and 32 positions
    sessions = []
    for prompt in (a_prompt, b_prompt):
        row = engine.take_row()
        assert row is not None
        s = _Session(f"s{row}", row, 200, Sampler(SamplingParams(), len(prompt), 10, ()))
        (logits,) = engine.run([Step(row, 0, torch.tensor(prompt), True)])
        tok, _ = s.sampler.next(logits)  # type: ignore[union-attr]
        sessions.append((s, tok))
    assert engine.cache.chunks_allocated == 2  # each row fills its chunk of 32 positions
    engine.kv_budget.limit = engine.kv_budget.used  # no room for a third chunk
    (a, a_tok), (b, b_tok) = sessions
    batch = [_Work(a, Step(a.row, 20, torch.tensor([a_tok]), True)),
             _Work(b, Step(b.row, 32, torch.tensor([b_tok]), True))]
    out = ShardRole._compute(role, batch)
    ref = generate_ids(load_slice(target), a_prompt, max_tokens=2, stop_ids=[]).token_ids
    assert [a_tok, out[0][0]] == list(ref)  # type: ignore[index]
    assert isinstance(out[1], KVBudgetError) and isinstance(out[1], KVCacheFullError)
    assert engine.cache.lengths == [21, 32] and engine.cache.chunks_allocated == 2


async def test_verifier_batch_past_the_budget_refuses_only_the_window_that_grows(
        target: Path) -> None:
    ref_a = generate_ids(load_slice(target), PROMPT[:17], max_tokens=8, stop_ids=[]).token_ids
    ref_b = generate_ids(load_slice(target), PROMPT, max_tokens=40, stop_ids=[]).token_ids
    loaded = await MODELS.acquire(target)
    engine = VerifierEngine(loaded, max_sessions=4, chunk_bytes=32 * POSITION)
    engine.start()
    try:
        a = await engine.open("j", OpenRequest(PROMPT[:17], 8, SamplingParams(), 0), 60)
        b = await engine.open("j", OpenRequest(PROMPT, 40, SamplingParams(), 0), 60)
        cache = engine.cache
        assert cache is not None and cache.chunks_allocated == 2  # 16 and 32 positions
        engine.kv_budget.limit = engine.kv_budget.used  # no third chunk
        # both windows in one batch: a's stays in its chunk, b's needs a new one
        ra, rb = await asyncio.gather(
            engine.verify("j", VerifyWindow(a.session, 17, tuple(ref_a[:4]))),
            engine.verify("j", VerifyWindow(b.session, 33, tuple(ref_b[:4]))),
            return_exceptions=True)
        assert isinstance(ra, VerifyReply) and (ra.accepted, ra.next) == (4, ref_a[4])
        assert isinstance(rb, ProtocolError) and rb.code == ErrorCode.OVER_LIMIT
        engine.kv_budget.limit = None  # room again: b's session goes on from where it was
        r = await engine.verify("j", VerifyWindow(b.session, 33, tuple(ref_b[:4])))
        assert (r.accepted, r.next) == (4, ref_b[4])
    finally:
        await engine.aclose()
        MODELS.release(loaded)
