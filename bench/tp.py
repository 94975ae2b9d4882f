"""bench/tp.py: tensor parallelism (issue 15) -- local decode on one core vs TP=2 over two
p2pllmd daemons pinned to separate cores (sched_setaffinity, as taskset), at float32 and
bfloat16. Prints one JSON object: decode tokens/s and all-reduce time per token.

The model is RANDOM WEIGHTS OF SMOLLM2-135M'S SHAPE but with 8 attention heads / 4 KV heads
(hidden 576, 30 layers, intermediate 1536, vocab 49152, tied head), built from LlamaConfig:
SmolLM2-135M itself has 9 heads / 3 KV heads, so TP=2 is impossible on it (only N=1, 3), and
TP=3 needs 3 cores. Greedy ids of TP and local are compared (random weights: only a check).

    python bench/tp.py [--tokens 64] [--layers 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def make_model(root: Path, layers: int) -> Path:
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    path = root / "smollm2-shape-8h"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def local_decode(path: Path, dtype: str, prompt: list[int], tokens: int) -> dict[str, Any]:
    import torch

    from p2pllm.engine.generate import generate_ids
    from p2pllm.engine.loader import load_slice
    from p2pllm.wire.tensors import torch_dtype

    torch.set_num_threads(1)
    model = load_slice(path, dtype=torch_dtype(dtype))
    generate_ids(model, prompt, max_tokens=4, stop_ids=())  # warm up
    r = generate_ids(model, prompt, max_tokens=tokens, stop_ids=())
    return {"tokens_per_s": round(r.tokens_per_s, 3), "token_ids": r.token_ids}


async def tp_decode(address: str, dtype: str, prompt: list[int], tokens: int) -> dict[str, Any]:
    from p2pllm.cli.client import open_daemon
    from p2pllm.wire.messages import MsgType

    meta = {"mode": "tp", "model": "smollm2-shape-8h", "prompt_ids": prompt, "tp": 2,
            "max_tokens": tokens, "ignore_eos": True, "dtype": dtype}
    conn = await open_daemon(address)
    try:
        res: dict[str, Any] = {}
        async for frame in conn.stream(MsgType.GENERATE, meta, idle_timeout=600):
            if not frame.is_partial:
                res = frame.meta
        return res
    finally:
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--no-pin", action="store_true",
                    help="leave the TP daemons unpinned (gloo's I/O thread then gets its own "
                         "core: a pinned single-core rank pays ~3 ms per all-reduce here)")
    args = ap.parse_args()
    from p2pllm.lab.daemons import start_cluster

    prompt = [1, 450, 4335, 310, 3444, 338, 1029, 278]
    out: dict[str, Any] = {"model": "random weights of SmolLM2-135M's shape, 8 heads / 4 KV "
                           f"heads, hidden 576, {args.layers} layers (LlamaConfig)",
                           "tokens": args.tokens, "cores": sorted(os.sched_getaffinity(0)),
                           "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = root / "models"
        models.mkdir()
        path = make_model(models, args.layers)
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[0]})
        local = {dt: local_decode(path, dt, prompt, args.tokens) for dt in ("float32", "bfloat16")}
        os.sched_setaffinity(0, set(cores))
        if args.no_pin:
            real = os.sched_getaffinity
            os.sched_getaffinity = lambda pid: {0}  # type: ignore[assignment]  # start_cluster: too few cores -> no pin
            try:
                ds = asyncio.run(start_cluster(2, 1, ["--models-dir", str(models)], root, "tp"))
            finally:
                os.sched_getaffinity = real  # type: ignore[assignment]
        else:
            ds = asyncio.run(start_cluster(2, 1, ["--models-dir", str(models)], root, "tp"))
        out["tp_daemons_pinned"] = not args.no_pin
        try:
            for dt in ("float32", "bfloat16"):
                asyncio.run(tp_decode(ds[0].address, dt, prompt, 4))  # load + warm path
                t0 = time.monotonic()
                res = asyncio.run(tp_decode(ds[0].address, dt, prompt, args.tokens))
                row = {"dtype": dt, "local_1core_tokens_per_s": local[dt]["tokens_per_s"],
                       "tp2_tokens_per_s": res.get("tokens_per_s"),
                       "speedup": round(float(res.get("tokens_per_s", 0.0))
                                        / max(local[dt]["tokens_per_s"], 1e-9), 3),
                       "allreduce_ms_per_token": round(1e3 * float(res.get("comm_s_per_token", 0.0)), 3),
                       "allreduces_per_token": res.get("allreduces_per_token"),
                       "job_wall_s_incl_load": round(time.monotonic() - t0, 3),
                       "greedy_ids_equal_local": res.get("token_ids") == local[dt]["token_ids"]}
                out["rows"].append(row)
        finally:
            for d in ds:
                d.stop()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
