"""The verifier on the engine's block KV cache: a full pool refuses (REFUSED, not a bad
request), the refused step leaves the other sessions intact, and closing a session gives its
blocks back without moving the live ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from p2pllm.engine.generate import generate_ids
from p2pllm.engine.kv_cache import KVCache
from p2pllm.engine.loader import load_slice
from p2pllm.engine.sampling import SamplingParams
from p2pllm.pillars.speculative.drafts import random_llama
from p2pllm.pillars.speculative.messages import OpenRequest, VerifyWindow
from p2pllm.pillars.speculative.models import MODELS
from p2pllm.pillars.speculative.verifier import VerifierEngine
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode
from tests.conftest import wait_for

torch.set_num_threads(1)

PROMPT = tuple(range(3, 36))  # 33 tokens: the verifier holds 32 positions = 2 blocks of 16


async def test_a_full_kv_pool_refuses_and_closing_frees_blocks(tmp_path: Path) -> None:
    path = tmp_path / "target"
    random_llama(path, vocab_size=256, hidden_size=32, layers=2, max_positions=128, seed=0)
    ref = generate_ids(load_slice(path), PROMPT, max_tokens=24, stop_ids=[]).token_ids
    loaded = await MODELS.acquire(path)
    engine = VerifierEngine(loaded, max_sessions=4, max_kv_tokens=48)  # 3 blocks in all
    engine.start()
    try:
        a = await engine.open("j", OpenRequest(PROMPT, 40, SamplingParams(), 0), 60)
        cache = engine.cache
        assert cache is not None and cache.blocks_used == 2
        with pytest.raises(ProtocolError) as err:  # 2 more blocks, 1 free
            await engine.open("j", OpenRequest(PROMPT, 8, SamplingParams(), 0), 60)
        assert err.value.code == ErrorCode.REFUSED and "KV cache is full" in err.value.message
        r = await engine.verify("j", VerifyWindow(a.session, len(PROMPT), tuple(ref[:2])))
        assert (r.accepted, r.next) == (2, ref[2])  # the third block: 35 positions
        assert cache.blocks_used == 3 and cache.blocks_free == 0
        with pytest.raises(ProtocolError) as err:  # 16 more positions need a 4th block
            await engine.verify("j", VerifyWindow(a.session, len(PROMPT) + 3, tuple(ref[3:19])))
        assert err.value.code == ErrorCode.REFUSED
        r = await engine.verify("j", VerifyWindow(a.session, len(PROMPT) + 3, tuple(ref[3:6])))
        assert (r.accepted, r.next) == (3, ref[6])  # a's KV survived the refusals
        b_open = await _open_after_close(engine, a.session)
        assert b_open.blocks_used == 2  # a's three blocks came back; b took two
    finally:
        await engine.aclose()
        MODELS.release(loaded)


async def _open_after_close(engine: VerifierEngine, session: int) -> KVCache:
    engine.close("j", session)
    b = await engine.open("j", OpenRequest(PROMPT, 8, SamplingParams(), 0), 60)
    await wait_for(lambda: engine.cache is not None and engine.cache.batch == 1, timeout=10,
                   what="the closed session's row to be freed")
    assert b.session in engine.sessions
    assert engine.cache is not None
    return engine.cache
