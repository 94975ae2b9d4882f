"""Tensor parallelism (p2pllm.engine.tp): real rank processes on a gloo group over 127.0.0.1
match the local engine (greedy ids, float32 logits), and uneven splits are refused."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from p2pllm.engine.config import ModelConfig
from p2pllm.engine.generate import generate_ids
from p2pllm.engine.loader import load_slice
from p2pllm.engine.tp import TPSizeError, check_tp, load_tp_rank, tp_sizes
from tests.conftest import SHARED_MODELS, SHARED_SKIP

WORKER = Path(__file__).with_name("_tp_worker.py")
REPO = Path(__file__).resolve().parents[2]
PROMPTS = [[5, 9, 17, 33], [3, 4], [7, 1, 8, 2, 9, 6]]
SMOLLM2 = SHARED_MODELS / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_ranks(tmp: Path, world: int, spec: dict[str, Any]) -> list[dict[str, Any]]:
    port = _port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), str(port),
                               json.dumps(spec), str(tmp / f"rank{r}.json")], cwd=REPO)
             for r in range(world)]
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0] * world
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "qwen3"])
def test_tp2_equals_local(tiny: dict[str, Any], tmp_path: Path, arch: str) -> None:
    path = tiny[arch].path
    n = 10
    outs = _run_ranks(tmp_path, 2, dict(path=str(path), prompts=PROMPTS, max_tokens=n,
                                        logits=True))
    local = load_slice(path)
    for i, prompt in enumerate(PROMPTS):
        ref = generate_ids(local, prompt, max_tokens=n, stop_ids=[]).token_ids
        assert outs[0]["ids"][i] == ref and outs[1]["ids"][i] == ref
        # two all-reduces per layer per forward (prefill + n - 1 decode steps)
        assert outs[0]["comm_calls"][i] == 2 * local.config.num_layers * n
        with torch.inference_mode():
            ids = torch.tensor([prompt + ref])
            want = local(ids, torch.arange(ids.shape[1])[None])[0]
        got = torch.tensor(outs[0]["logits"][i])
        assert (got - want).abs().max().item() < 1e-4


def test_smollm2_tp3_greedy_equals_local(tmp_path: Path) -> None:
    if not SMOLLM2.is_file():
        pytest.skip(f"{SHARED_SKIP}: {SMOLLM2} is not present")
    prompts = [[1, 4093, 314, 253, 1345], [504, 3458, 282]]
    n = 6
    outs = _run_ranks(tmp_path, 3, dict(path=str(SMOLLM2), prompts=prompts, max_tokens=n))
    local = load_slice(SMOLLM2)
    for i, prompt in enumerate(prompts):
        ref = generate_ids(local, prompt, max_tokens=n, stop_ids=[]).token_ids
        assert [o["ids"][i] for o in outs] == [ref] * 3


def test_uneven_heads_refused(tiny: dict[str, Any]) -> None:
    cfg = ModelConfig.from_dir(tiny["llama"].path)  # 4 heads, 2 KV heads, intermediate 112
    assert tp_sizes(cfg) == [1, 2]
    check_tp(cfg, 2)
    with pytest.raises(TPSizeError, match=r"possible N: 1, 2") as e:
        check_tp(cfg, 3)
    assert e.value.possible == [1, 2]
    with pytest.raises(TPSizeError, match="4 attention heads, 2 KV heads"):
        load_tp_rank(tiny["llama"].path, 0, 4, None)
