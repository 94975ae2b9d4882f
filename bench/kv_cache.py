"""KV-cache benchmark: batch-1 decode tokens/s of this tree against a baseline tree, side by side.

    python bench/kv_cache.py --base /tmp/p2pllm-base [--quick] [--threads 1]

Each measurement runs ``generate_ids`` (greedy, no stop ids) in a fresh process whose
``sys.path`` starts with the tree being measured, so the two trees never share a module.
Processes alternate between the trees (ours, base, ours, base, ...) because this machine is
shared; every figure is the best over ``--repeats`` processes, each the best of 2 runs.

Models: the bundled ``shakespeare`` (3.67M params, 4 layers, GQA 8/4, head_dim 32) at a short
and a long context, and a random ~110M Llama (hidden 768, 12 layers, 12 heads) saved to a
temp dir. Besides batch-1 generation, a batched case: 4 rows of different lengths decoded
together (the verifier's and shards' path). Prints one JSON object: per model and case,
decode tokens/s of both trees and the ratio ours / base, by wall clock and by the process's
CPU time (``*_cpu_*``: tokens per CPU second, which a loaded shared machine disturbs less).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from p2pllm.engine.generate import generate_ids
from p2pllm.engine.loader import load_slice
torch.set_num_threads(int(sys.argv[3]))
cases = json.loads(sys.argv[4])
model = load_slice(sys.argv[2])


def batched(rows, prompt_len, n):
    # rows sessions prefilled to prompt_len, prompt_len+8, ..., then n decode steps of all
    # rows in one forward each (the verifier's and shards' batched path)
    lens = [prompt_len + 8 * r for r in range(rows)]
    with torch.inference_mode():
        cache = model.new_cache(rows, max(lens) + n)
        for r, m in enumerate(lens):
            ids = torch.tensor([[(7 * i) % 200 + 3 for i in range(m)]])
            model(ids, torch.arange(m)[None], cache, slots=torch.tensor([r]))
        slots = torch.arange(rows)
        x = torch.full((rows, 1), 5, dtype=torch.int64)
        t0, c0 = time.perf_counter(), time.process_time()
        for j in range(n):
            model(x, torch.tensor([[m + j] for m in lens]), cache, slots=slots, last_only=True)
        return rows * n / (time.perf_counter() - t0), rows * n / (time.process_time() - c0)


def single(prompt, n):
    # decode tokens/s of generate_ids: its own wall-clock figure, and CPU time of n tokens
    # minus CPU time of 1 (prefill and first token) over the n - 1 decoded after it
    c0 = time.process_time()
    generate_ids(model, prompt, max_tokens=1, stop_ids=[])
    c1 = time.process_time()
    r = generate_ids(model, prompt, max_tokens=n, stop_ids=[])
    c2 = time.process_time()
    return r.tokens_per_s, (n - 1) / max((c2 - c1) - (c1 - c0), 1e-9)


out = []
for rows, prompt_len, n in cases:
    if rows > 1:
        batched(rows, prompt_len, 2)  # warm up
        got = [batched(rows, prompt_len, n) for _ in range(2)]
    else:
        prompt = [(7 * i) % 200 + 3 for i in range(prompt_len)]
        generate_ids(model, prompt, max_tokens=4, stop_ids=[])  # warm up
        got = [single(prompt, n) for _ in range(2)]
    out.append([max(g[0] for g in got), max(g[1] for g in got)])
print(json.dumps(out))
"""


def make_110m(root: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = root / "llama-110m"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                      num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                      max_position_embeddings=2048)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def measure(tree: Path, model: Path, threads: int,
            cases: list[tuple[int, int, int]]) -> list[list[float]]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, "-c", CHILD, str(tree), str(model), str(threads),
                          json.dumps(cases)], env=env, capture_output=True, text=True,
                         check=True, cwd=tempfile.gettempdir())
    return [[float(x) for x in pair] for pair in json.loads(out.stdout.strip().splitlines()[-1])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", required=True, help="a checkout of the baseline tree")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer tokens, 2 repeats")
    args = ap.parse_args(argv)
    repeats = 2 if args.quick else args.repeats
    base = Path(args.base).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        short, long_ = (64, 16) if args.quick else (128, 32)
        models = [  # (rows, prompt tokens, decode steps): rows 1 = generate_ids
            ("shakespeare", REPO / "p2pllm" / "models" / "shakespeare",
             [(1, 16, short), (1, 256, short), (4, 64, short)]),
            ("llama-110m", make_110m(Path(tmp)), [(1, 64, long_), (4, 64, long_ // 2)]),
        ]
        runs = []
        for name, path, cases in models:
            zero = [[0.0, 0.0] for _ in cases]
            best: dict[str, list[list[float]]] = {"ours": zero, "base": [z[:] for z in zero]}
            for _ in range(repeats):
                for side, tree in (("ours", REPO), ("base", base)):
                    got = measure(tree, path, args.threads, cases)
                    best[side] = [[max(a, b) for a, b in zip(old, new, strict=True)]
                                  for old, new in zip(best[side], got, strict=True)]
            for (rows, prompt_len, n), ours, theirs in zip(cases, best["ours"], best["base"],
                                                           strict=True):
                runs.append({"model": name, "rows": rows, "prompt_tokens": prompt_len,
                             "decode_steps": n, "threads": args.threads,
                             "ours_tokens_per_s": round(ours[0], 2),
                             "base_tokens_per_s": round(theirs[0], 2),
                             "ratio": round(ours[0] / theirs[0], 3) if theirs[0] else None,
                             "ours_cpu_tokens_per_s": round(ours[1], 2),
                             "base_cpu_tokens_per_s": round(theirs[1], 2),
                             "cpu_ratio": round(ours[1] / theirs[1], 3) if theirs[1] else None})
    print(json.dumps({"base": str(base), "load": os.getloadavg(), "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
