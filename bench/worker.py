"""RoleWorker benchmark: the cost of one item on a role's worker, side by side in one run with
the ways roles got compute off the loop before it (a one-thread executor, asyncio.to_thread).

Prints one JSON object: microseconds per awaited no-op item (median of --reps runs of --iters
items each, the contenders taking turns), and the same for a small real torch op (a 64x64 matmul), for each contender.

    python bench/worker.py [--iters 2000] [--reps 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2pllm.daemon.worker import RoleWorker


async def per_item_us(contenders: dict[str, Callable[[], Awaitable[Any]]], iters: int,
                      reps: int) -> dict[str, float]:
    """Median microseconds per item of each contender; the contenders take turns within each
    rep (in a rotating order), so a change in the host's load hits them alike."""
    names = list(contenders)
    for call in contenders.values():  # warm up (threads started, caches hot)
        for _ in range(min(200, iters)):
            await call()
    runs: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            call = contenders[name]
            t0 = time.perf_counter()
            for _ in range(iters):
                await call()
            runs[name].append(1e6 * (time.perf_counter() - t0) / iters)
    return {n: round(statistics.median(r), 2) for n, r in runs.items()}


async def main(iters: int, reps: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    a = torch.randn(64, 64)

    def noop() -> int:
        return 1

    def matmul() -> torch.Tensor:
        return a @ a

    worker = RoleWorker("bench")
    executor = ThreadPoolExecutor(1)
    loop = asyncio.get_running_loop()
    out: dict[str, Any] = {"iters": iters, "reps": reps}
    try:
        for work_name, fn in (("noop", noop), ("matmul64", matmul)):
            contenders: dict[str, Callable[[], Awaitable[Any]]] = {
                "role_worker": lambda fn=fn: worker.run(fn),  # type: ignore[misc]
                "executor_1thread": lambda fn=fn: loop.run_in_executor(executor, fn),  # type: ignore[misc]
                "to_thread": lambda fn=fn: asyncio.to_thread(fn),  # type: ignore[misc]
            }
            for name, us in (await per_item_us(contenders, iters, reps)).items():
                out[f"{work_name}_{name}_us"] = us
        s = worker.stats()
        out["role_worker_items"] = s.items
        out["role_worker_busy_s"] = round(s.busy_s, 4)
    finally:
        await worker.aclose()
        executor.shutdown()
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(main(args.iters, args.reps))))
