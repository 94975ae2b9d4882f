"""Split training benchmark: step time of one process vs two stage daemons, M micro-batches.

Starts two p2pllmd processes on 127.0.0.1 (one torch thread each unless --threads), trains a
random Llama (or --model) for a few steps with M = 1, 2, 4, 8 micro-batches over 2 stages,
and the same training in this process (same threads per process). Prints one JSON object:
per M the median step time of both (and their ratio), each stage's measured idle fraction
next to the theoretical bubble (K-1)/(M+K-1) and the idle fraction the schedule simulator
predicts from the stages' measured compute times, and the bytes sent each way per step.

    python bench/splittrain.py                    # defaults: 4 layers, hidden 128, B=8, T=64
    python bench/splittrain.py --steps 6 --micro-batches 1,2,4,8 --schedule 1f1b
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from p2pllm.cli.client import open_daemon  # noqa: E402
from p2pllm.pillars.splittrain.compute import OptimConfig  # noqa: E402
from p2pllm.pillars.splittrain.data import load_blocks  # noqa: E402
from p2pllm.pillars.splittrain.schedule import (  # noqa: E402
    bubble_fraction,
    pipeline_schedules,
    simulate,
)
from p2pllm.pillars.splittrain.trainer import train_local  # noqa: E402
from p2pllm.wire.messages import MsgType  # noqa: E402


def make_model(path: Path, layers: int, hidden: int, vocab: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
                      num_key_value_heads=max(1, hidden // 64), max_position_embeddings=1024,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def start_daemon(name: str, threads: int, log_dir: Path, peers: list[str]) -> tuple[Any, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "p2pllm.cli.p2pllmd", "--name", name, "--host", "127.0.0.1",
           "--port", "0", "--print-port", "--no-mdns", "--threads", str(threads),
           "--log-level", "WARNING", "--state-dir", str(log_dir / name)]
    for p in peers:
        cmd += ["--peer", p]
    log = open(log_dir / f"{name}.log", "w")  # lives as long as the daemon
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("PORT "):
            return proc, f"127.0.0.1:{line.split()[1]}"
        if not line and proc.poll() is not None:
            raise RuntimeError(f"daemon {name} exited: {(log_dir / f'{name}.log').read_text()}")
    raise TimeoutError(f"daemon {name} did not start")


async def wait_peers(address: str, count: int) -> None:
    conn = await open_daemon(address)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            snap = (await conn.request(MsgType.STATUS, {}, timeout=10)).meta
            if sum(p["state"] == "up" for p in snap["peers"]) >= count:
                return
            await asyncio.sleep(0.2)
        raise TimeoutError("peers did not come up")
    finally:
        conn.close()


async def split_run(address: str, meta: dict[str, Any]) -> dict[str, Any]:
    conn = await open_daemon(address)
    try:
        result: dict[str, Any] = {}
        async for frame in conn.stream(MsgType.TRAIN_RUN, meta):
            if not frame.is_partial:
                result = frame.meta
        return result
    finally:
        conn.close()


def median_step(seconds: list[float]) -> float:
    measured = seconds[1:] if len(seconds) > 1 else seconds  # the first step warms up
    return statistics.median(measured)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint directory (default: a random Llama)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--micro-batches", default="1,2,4,8")
    ap.add_argument("--schedule", choices=("gpipe", "1f1b"), default="1f1b")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = ap.parse_args()
    micro = [int(m) for m in args.micro_batches.split(",")]
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-splittrain-") as tmp_s:
        tmp = Path(tmp_s)
        model = Path(args.model) if args.model else make_model(
            tmp / "model", args.layers, args.hidden, args.vocab)
        from p2pllm.engine.config import ModelConfig

        cfg = ModelConfig.from_dir(model)
        g = torch.Generator().manual_seed(0)
        tokens = args.batch_size * args.seq_len * (args.steps + 1) + 1
        data = tmp / "ids.safetensors"
        from safetensors.torch import save_file

        save_file({"input_ids": torch.randint(3, cfg.vocab_size, (tokens,), generator=g)},
                  str(data))
        blocks = load_blocks(data, args.seq_len)
        optim = OptimConfig(lr=1e-3)

        a, addr_a = start_daemon("a", args.threads, tmp, [])
        b, _ = start_daemon("b", args.threads, tmp, [addr_a])
        rows: list[dict[str, Any]] = []
        try:
            asyncio.run(wait_peers(addr_a, 1))
            for m in micro:
                # Single process, same micro-batching, same threads per process.
                local = train_local(model, blocks, steps=args.steps, batch_size=args.batch_size,
                                    micro_batches=m, optim=optim, seed=0)
                local_step = median_step([r["seconds"] for r in local.steps])
                meta = {"model": str(model), "data": str(data), "steps": args.steps,
                        "batch_size": args.batch_size, "micro_batches": m,
                        "seq_len": args.seq_len, "schedule": args.schedule, "lr": 1e-3,
                        "seed": 0, "stages": 2}
                res = asyncio.run(split_run(addr_a, meta))
                split_step = median_step([s["seconds"] for s in res["steps"]])
                k = len(res["stages"])
                # What the schedule predicts from the measured per-micro-batch compute times.
                n = len(res["steps"])
                f_cost = [s["forward_s"] / (n * m) for s in res["stages"]]
                b_cost = [s["backward_s"] / (n * m) for s in res["stages"]]
                tl = simulate(pipeline_schedules(args.schedule, k, m), f_cost, b_cost)
                rows.append({
                    "micro_batches": m,
                    "local_step_s": round(local_step, 4),
                    "split_step_s": round(split_step, 4),
                    "split_over_local": round(split_step / local_step, 3),
                    "idle_fraction_measured": [round(s["idle_fraction"], 3) for s in res["stages"]],
                    "idle_fraction_mean": round(res["idle_fraction"], 3),
                    "idle_fraction_simulated": round(tl.idle_fraction, 3),
                    "bubble_theory": round(bubble_fraction(k, m), 3),
                    "bytes_forward_per_step": res["steps"][-1]["bytes_forward"],
                    "bytes_backward_per_step": res["steps"][-1]["bytes_backward"],
                    "loss_equal": bool(torch.allclose(torch.tensor(res["losses"]),
                                                      torch.tensor(local.losses),
                                                      rtol=1e-5, atol=4e-5)),
                })
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        finally:
            for proc in (b, a):
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        baseline = train_local(model, blocks, steps=args.steps, batch_size=args.batch_size,
                               micro_batches=1, optim=optim, seed=0)
        out = {
            "bench": "splittrain",
            "command": " ".join(["python", "bench/splittrain.py", *sys.argv[1:]]),
            "platform": platform.platform(), "cpus": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0],
            "threads_per_process": args.threads,
            "model": {"layers": cfg.num_layers, "hidden": cfg.hidden_size,
                      "vocab": cfg.vocab_size, "params": None},
            "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
            "schedule": args.schedule, "stages": 2,
            "single_process_full_batch_step_s": round(
                median_step([r["seconds"] for r in baseline.steps]), 4),
            "runs": rows,
        }
        out["model"]["params"] = sum(p.numel() for p in baseline.model.parameters())
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
