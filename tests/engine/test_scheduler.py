"""The continuous-batching scheduler: batched greedy outputs equal each sequence alone."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from p2pllm.engine.generate import generate_ids
from p2pllm.engine.loader import load_slice
from p2pllm.engine.sampling import SamplingParams
from p2pllm.engine.scheduler import BatchEngine, Scheduler, Sequence


def _prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(1, 20, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


def _run(s: Scheduler) -> None:
    for _ in range(10000):
        if not s.has_work():
            return
        s.step()
    raise AssertionError("scheduler did not finish")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_16_concurrent_equal_alone(tiny: dict[str, Any], arch: str) -> None:
    model = load_slice(tiny[arch].path)
    prompts = _prompts(16, 96)
    maxes = [1 + (i * 7) % 30 for i in range(16)]
    s = Scheduler(model, max_step_tokens=24)
    seqs = [s.add(Sequence(p, max_tokens=m)) for p, m in zip(prompts, maxes, strict=True)]
    _run(s)
    for p, m, q in zip(prompts, maxes, seqs, strict=True):
        alone = generate_ids(model, p, max_tokens=m)
        assert q.result() == alone.token_ids
        assert q.stop_reason == alone.stop_reason


def test_admission_waits_and_preemption_exact(tiny: dict[str, Any]) -> None:
    model = load_slice(tiny["llama"].path)
    prompts = _prompts(6, 96, seed=1)
    s = Scheduler(model, max_total_tokens=64, block_size=4, max_step_tokens=8)
    seqs = [s.add(Sequence(p, max_tokens=30)) for p in prompts]
    s.step()
    assert s.stats().waiting > 0  # the pool cannot take all six at once
    _run(s)
    assert s.stats().preemptions > 0
    assert s.cache.blocks_used == 0
    for p, q in zip(prompts, seqs, strict=True):
        assert q.result() == generate_ids(model, p, max_tokens=30).token_ids


def test_cancel_frees_blocks_at_once(tiny: dict[str, Any]) -> None:
    model = load_slice(tiny["llama"].path)
    s = Scheduler(model)
    a = s.add(Sequence([5, 6, 7, 8], max_tokens=40))
    b = s.add(Sequence([9, 10], max_tokens=40))
    for _ in range(3):
        s.step()
    used = s.cache.blocks_used
    a.abort()
    assert a.done and a.stop_reason == "cancelled"
    assert s.cache.blocks_used < used and s.stats().running == 1
    _run(s)
    assert b.result() == generate_ids(model, [9, 10], max_tokens=40).token_ids


def test_stop_ids(tiny: dict[str, Any]) -> None:
    model = load_slice(tiny["qwen3"].path)
    p = [4, 5, 6]
    full = generate_ids(model, p, max_tokens=20, stop_ids=[]).token_ids
    stop = full[5]
    s = Scheduler(model)
    q = s.add(Sequence(p, max_tokens=20, stop_ids=[stop]))
    _run(s)
    assert q.result() == generate_ids(model, p, max_tokens=20, stop_ids=[stop]).token_ids
    assert q.stop_reason == "eos" and q.result()[-1] == stop


def test_engine_thread_and_seeded_sampling(tiny: dict[str, Any]) -> None:
    model = load_slice(tiny["llama"].path)
    eng = BatchEngine(model).start()
    try:
        params = SamplingParams(temperature=0.9, seed=3)
        got: list[int] = []
        solo = eng.submit([4, 5, 6], params, 12, on_token=got.append).result(30)
        others = [eng.submit(p, max_tokens=10) for p in _prompts(6, 96, seed=2)]
        again = eng.submit([4, 5, 6], params, 12).result(30)
        assert got == solo
        assert len(again) == len(solo)  # same seed: own generator, draws in the same order
        for o in others:
            o.result(30)
        assert eng.stats().blocks_used == 0
    finally:
        eng.stop()


def test_smollm2_concurrent_greedy() -> None:
    from tests.conftest import SHARED_MODELS, SHARED_SKIP

    path = SHARED_MODELS / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{SHARED_SKIP}: {path} is not present")
    model = load_slice(path.parent, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(100, 20000, (n,), generator=g).tolist() for n in (3, 9, 17, 30, 5, 12)]
    eng = BatchEngine(model, max_total_tokens=2048).start()
    try:
        seqs = [eng.submit(p, max_tokens=10) for p in prompts]
        for p, q in zip(prompts, seqs, strict=True):
            assert q.result(60) == generate_ids(model, p, max_tokens=10).token_ids
    finally:
        eng.stop()
