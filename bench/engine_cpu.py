"""SmolLM2 decode cost per token in CPU seconds, ours vs llama.cpp, one thread.

    taskset -c 1 python bench/engine_cpu.py [--formats f32,bf16,int8,int4] [--tokens 32]
        [--repeats 5]

On a shared box the wall clock of a 1-thread decode swings 2-3x from round to round (other
processes take the core), which buries a 10% change. CPU time counts only the time the
work ran: a decode token's CPU time is what it costs whatever else runs (memory-bandwidth
and cache contention still show). Both sides are measured by difference, so loading,
warm-up and prefill cancel out:

* ours: CPU time of this (1-thread) process over ``generate_ids`` of 2N tokens minus that
  of N tokens, after a 64-token random prompt, divided by N;
* llama.cpp: CPU time (user + sys, from the child's rusage) of ``llama-bench -p 0 -n 2N
  -r 1`` minus that of ``-n N``, divided by N (tg from an empty context).

Each run's CPU time is the least of TRIES runs. Under heavy load even this swings (a
round can come out near zero or negative when one side's short run was the slow one):
read the medians and the rounds together.

Prints one JSON object: per format the medians over ``--repeats`` rounds (each round runs
both sides) of ms per token, each side's tokens per CPU-second and their ratio, with every
round's figures. Needs ../shared/tools/build-llamacpp.sh's output (bench/engine.py's
``LLAMACPP``); without it the llama.cpp columns are null.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import DTYPES, LLAMACPP, PROMPT_LEN, SMOLLM2_FORMATS, smol_file

from p2pllm.engine.generate import generate_ids
from p2pllm.engine.loader import load_slice


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


TRIES = 2  # each run's CPU time is the least of this many (contention only adds)


def _ours_cpu(model: Any, prompt: list[int], tokens: int) -> float:
    best = float("inf")
    for _ in range(TRIES):
        t0 = _cpu()
        generate_ids(model, prompt, max_tokens=tokens, stop_ids=[])
        best = min(best, _cpu() - t0)
    return best


def ours_ms(model: Any, prompt: list[int], n: int) -> float:
    """CPU ms per decoded token: generate 2N minus generate N, over N."""
    a, b = _ours_cpu(model, prompt, n + 1), _ours_cpu(model, prompt, 2 * n + 1)
    return (b - a) / n * 1e3


def _llama_cpu(gguf: Path, n: int) -> float | None:
    exe = LLAMACPP / "bin" / "llama-bench"
    if not exe.is_file():
        return None
    cmd = [str(exe), "-m", str(gguf), "-t", "1", "-p", "0", "-n", str(n), "-r", "1",
           "-o", "json"]
    env = dict(os.environ, LD_LIBRARY_PATH=str(LLAMACPP / "bin"))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        print(f"# llama-bench failed ({proc.returncode}): {' '.join(cmd)}", file=sys.stderr)
        return None
    return ru.ru_utime + ru.ru_stime


def _llama_best(gguf: Path, n: int) -> float | None:
    runs = [_llama_cpu(gguf, n) for _ in range(TRIES)]
    return None if any(r is None for r in runs) else min(r for r in runs if r is not None)


def llama_ms(gguf: Path, n: int) -> float | None:
    a, b = _llama_best(gguf, n), _llama_best(gguf, 2 * n)
    return None if a is None or b is None else (b - a) / n * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--formats", default="f32,bf16,int8,int4")
    ap.add_argument("--tokens", type=int, default=32, help="N (rounds decode N and 2N)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if args.tokens < 1 or args.repeats < 1:
        ap.error("--tokens and --repeats must be >= 1")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 49152, (PROMPT_LEN,), generator=g).tolist()
    rows: list[dict[str, Any]] = []
    start = time.time()
    for fmt in args.formats.split(","):
        f = smol_file(fmt)
        if f is None:
            print(f"# smollm2 {fmt}: no GGUF file, skipped", file=sys.stderr)
            continue
        _, dtype, quant = SMOLLM2_FORMATS[fmt]
        model = load_slice(f, dtype=DTYPES[dtype] if quant == "none" else torch.float32,
                           quant=quant)
        ours_ms(model, prompt, 4)  # warm-up
        mine: list[float] = []
        theirs: list[float] = []
        for _ in range(args.repeats):
            mine.append(ours_ms(model, prompt, args.tokens))
            lc = llama_ms(f, args.tokens)
            if lc is not None:
                theirs.append(lc)
        row: dict[str, Any] = {
            "format": fmt, "gguf": f.name, "threads": 1, "tokens": args.tokens,
            "ours_cpu_ms_per_token": round(statistics.median(mine), 2),
            "ours_rounds": [round(x, 2) for x in mine],
            "llama_cpp_cpu_ms_per_token": round(statistics.median(theirs), 2) if theirs else None,
            "llama_cpp_rounds": [round(x, 2) for x in theirs],
        }
        if theirs:
            row["decode_ratio_vs_llama_cpp"] = round(statistics.median(
                b / a for a, b in zip(mine, theirs, strict=True)), 2)
        rows.append(row)
        print(f"# {json.dumps(row)}", file=sys.stderr, flush=True)
        del model
    print(json.dumps({"command_note": " ".join(__doc__.split("\n\n")[2:5]) if __doc__ else "",
                      "load_average_end": os.getloadavg(),
                      "seconds": round(time.time() - start, 1), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
