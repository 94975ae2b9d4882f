"""Tensor parallelism through real p2pllmd processes on loopback (issue 15).

Two daemons (torch threads 1 each) hold a tiny random llama model (4 heads, 2 KV heads);
GENERATE mode "tp" over both equals the single-process engine's greedy ids; a model whose
heads do not split is refused before anything starts, naming the possible N; a rank whose
daemon is SIGKILLed mid-generation ends the job with an error naming that rank.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from p2pllm.cli.client import open_daemon
from p2pllm.engine.generate import generate_ids
from p2pllm.engine.loader import load_slice
from p2pllm.wire.connection import RemoteError
from p2pllm.wire.messages import ErrorCode, MsgType
from tests.conftest import wait_for
from tests.e2e.test_split import all_connected, start_cluster

PROMPTS = ([1, 403, 407, 261, 378], [1, 17, 250, 9, 33, 101, 7])


def _model(root: Path, name: str, heads: int, kv: int, layers: int = 2) -> Path:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=16 * heads, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
        initializer_range=0.2, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(5)
    path = root / name
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tp_cluster(tmp_path_factory) -> Any:
    root = tmp_path_factory.mktemp("tp")
    models = root / "models"
    models.mkdir()
    _model(models, "tp-tiny", heads=4, kv=2)
    _model(models, "tp-odd", heads=3, kv=3)
    procs = start_cluster(root, ["a", "b"], {"a": models, "b": models})
    asyncio.run(all_connected(procs))
    yield {d.name: d for d in procs} | {"models": models}
    for d in procs:
        d.stop()


async def _generate(port: int, **meta: Any) -> tuple[list[int], dict[str, Any]]:
    conn = await open_daemon(f"127.0.0.1:{port}")
    streamed: list[int] = []
    try:
        async for frame in conn.stream(MsgType.GENERATE, {"mode": "tp", **meta},
                                       idle_timeout=120):
            if frame.is_partial:
                streamed += frame.meta["token_ids"]
            else:
                return streamed, frame.meta
    finally:
        conn.close()
    raise AssertionError("no final response")


async def test_tp2_greedy_equals_local_greedy(tp_cluster) -> None:
    local = load_slice(tp_cluster["models"] / "tp-tiny")
    for prompt in PROMPTS:
        want = generate_ids(local, prompt, max_tokens=24, stop_ids=()).token_ids
        streamed, res = await _generate(tp_cluster["a"].port, model="tp-tiny",
                                        prompt_ids=prompt, max_tokens=24, ignore_eos=True, tp=2)
        assert res["token_ids"] == want, prompt
        assert streamed == want
        assert res["mode"] == "tp" and res["tp"] == 2
        assert len(res["ranks"]) == 2
        # two all-reduces per layer per forward (2 layers), prefill included
        assert res["allreduces_per_token"] == pytest.approx(4.0)


async def test_uneven_heads_are_refused_naming_the_possible_n(tp_cluster) -> None:
    with pytest.raises(RemoteError) as err:
        await _generate(tp_cluster["a"].port, model="tp-odd", prompt_ids=PROMPTS[0],
                        max_tokens=4, tp=2)
    assert err.value.code == ErrorCode.BAD_REQUEST
    assert "possible N: 1, 3" in err.value.message, err.value.message
    conn = await open_daemon(tp_cluster["a"].address)
    try:
        jobs = (await conn.request(MsgType.JOBS, {}, timeout=10)).meta
    finally:
        conn.close()
    assert not any("tp-odd" in str(j) for j in jobs.get("jobs", [])), jobs  # nothing started


async def test_a_killed_rank_ends_the_job_naming_it(tp_cluster) -> None:
    a, b = tp_cluster["a"], tp_cluster["b"]
    conn = await open_daemon(a.address)
    got: list[int] = []
    t_kill = 0.0
    try:
        with pytest.raises(RemoteError) as err:
            async for frame in conn.stream(MsgType.GENERATE, {
                    "mode": "tp", "model": "tp-tiny", "prompt_ids": PROMPTS[0],
                    "max_tokens": 4000, "ignore_eos": True, "tp": 2}, idle_timeout=120):
                if frame.is_partial:
                    got += frame.meta["token_ids"]
                    if len(got) == 5:
                        b.kill()
                        t_kill = time.monotonic()
        elapsed = time.monotonic() - t_kill
    finally:
        conn.close()
    assert t_kill, "the generation ended before the kill"
    msg = err.value.message
    assert "tp rank 1 of 2 on b" in msg, msg
    assert elapsed < 15, elapsed
    print(f"killed rank: {msg!r} after {elapsed:.2f} s")
    assert a.proc.poll() is None  # the surviving daemon is fine

    async def released() -> bool:  # rank 0's role (and its group, its worker) is gone
        c = await open_daemon(a.address)
        try:
            snap = (await c.request(MsgType.STATUS, {}, timeout=10)).meta
        finally:
            c.close()
        return not snap.get("roles")

    await wait_for(released, timeout=15, what="the survivor released its rank")
    # and it still serves: a tp=1 job on a alone
    _, res = await _generate(a.port, model="tp-tiny", prompt_ids=PROMPTS[0], max_tokens=4, tp=1)
    assert res["generated_tokens"] == 4
