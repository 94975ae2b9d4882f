"""Aggregate decode tokens/s through BatchEngine at several batch sizes, as JSON.

    taskset -c 0 python bench/batch.py [--model DIR] [--batches 1,4,16,64] [--tokens 16]

Each batch: B sequences of 8-token prompts submitted at once; the rate counts tokens after
each sequence's first (decode only) over the time from the last first token to the end.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from p2pllm.engine.loader import load_slice
from p2pllm.engine.scheduler import BatchEngine

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared/models/smollm2-135m-instruct"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=DEFAULT)
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--tokens", type=int, default=16)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = load_slice(a.model, dtype=torch.float32)
    out: dict[str, object] = {"model": str(a.model), "tokens": a.tokens, "threads": 1}
    rates = {}
    g = torch.Generator().manual_seed(0)
    for b in [int(x) for x in a.batches.split(",")]:
        eng = BatchEngine(model, max_total_tokens=b * (8 + a.tokens) + 64).start()
        times: list[list[float]] = [[] for _ in range(b)]
        prompts = [torch.randint(100, 20000, (8,), generator=g).tolist() for _ in range(b)]
        seqs = [eng.submit(p, max_tokens=a.tokens, stop_ids=[],
                           on_token=lambda _t, f=times[i]: f.append(time.perf_counter()))
                for i, p in enumerate(prompts)]
        for s in seqs:
            s.result(600)
        end = time.perf_counter()
        eng.stop()
        # decode window: after every sequence has its first token
        t0 = max(ts[0] for ts in times)
        n = sum(1 for ts in times for t in ts if t > t0)
        rates[b] = n / (end - t0) if end > t0 else 0.0
    out["decode_tokens_per_s"] = rates
    out["speedup_vs_1"] = {b: r / rates[min(rates)] for b, r in rates.items()} if rates else {}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
