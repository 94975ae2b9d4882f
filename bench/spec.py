"""Speculative decoding benchmark: target alone vs spec across two daemons vs transformers.

    python bench/spec.py [--tokens 96] [--repeats 3] [--threads 1] [--window 4] [--all]
                         [--quick] [--work DIR] [--only NAME]

For each (target, draft) pair, in one run, interleaved ``--repeats`` times (this machine is
shared: every ratio is taken within one repeat, then the median over repeats):

- ``target_only`` / ``draft_only``: our engine's local greedy decoding (``generate_ids``);
- ``spec_w{γ}``, ``spec_auto`` (window γ / adaptive, look-ahead at its default: off, as the
  two daemons share this machine), ``spec_w{γ}_lookahead`` (forced on): ``generate --mode
  spec`` through two real p2pllmd processes on loopback (the drafter on one, the verifier on
  the other, ``--threads`` torch threads each), plus one sampling run (temperature 0.8) for
  the bytes of q;
- ``hf_assisted``: transformers' ``generate(assistant_model=draft)`` in this process
  (``--threads`` threads), and ``hf_target_only`` beside it.

Then α (per-token acceptance, censored-geometric estimate), γ, the cost ratio c (the draft's
decode step over the target's, our engine), the measured speedup over target_only, the
theoretical one (1−α^(γ+1)) / ((1−α)(γc+1)), their ratio, the same with the measured cost v
of a (γ+1)-token verification forward in decode steps in place of 1 (γc + v), the ratio to
transformers' assisted generation, and the per-round network time and bytes. Prints one
JSON object.

Pairs: (a) a random-initialised ~110M Llama (hidden 768, 12 layers, vocab 32000, as in
bench/engine.py) with the same weights in bfloat16 as the draft (``--all`` adds its first 2
layers + final norm + head as a second draft: α ≈ 0.05 for random weights); (b)
tinystories-656k (trained) with its first layer + final norm + head; (c) the bundled
shakespeare pair when present.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
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
from p2pllm.cli.remote import stream_generate  # noqa: E402
from p2pllm.engine.generate import generate_ids  # noqa: E402
from p2pllm.engine.loader import list_models, load_slice  # noqa: E402
from p2pllm.pillars.speculative.acceptance import (  # noqa: E402
    expected_speedup,
    expected_tokens_per_round,
)
from p2pllm.pillars.speculative.drafts import random_llama, truncate  # noqa: E402
from p2pllm.wire.messages import MsgType  # noqa: E402

SHARED = REPO.parent / "shared" / "models"
PROMPT_IDS = [1, 80, 147, 201, 282, 57, 313, 598]  # any ids < every vocab here


# -- models -----------------------------------------------------------------------------------


def build_pairs(work: Path, quick: bool, all_pairs: bool) -> list[dict[str, Any]]:
    """[{name, target, draft}] with every model under work/models (a daemon --models-dir)."""
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    pairs = []
    big = models / ("rand-small" if quick else "rand-110m")
    if not (big / "config.json").exists():
        size = dict(hidden_size=256, layers=4, intermediate_size=688, heads=4, kv_heads=4) if quick \
            else dict(hidden_size=768, layers=12, intermediate_size=2048, heads=12, kv_heads=12)
        random_llama(big, vocab_size=32000, max_positions=2048, seed=0, **size)  # type: ignore[arg-type]
    draft = models / f"{big.name}-2l"
    if all_pairs and not (draft / "config.json").exists():
        truncate(big, draft, layers=2)
    if all_pairs:
        pairs.append({"name": f"{big.name} + its first 2 layers (random init)", "target": big.name,
                      "draft": draft.name, "kind": "random"})
    half = models / f"{big.name}-bf16"
    if not (half / "config.json").exists():
        truncate(big, half, layers=int(json.loads((big / "config.json").read_text())["num_hidden_layers"]),
                 dtype=torch.bfloat16)
    pairs.append({"name": f"{big.name} + itself in bfloat16 (random init)", "target": big.name,
                  "draft": half.name, "kind": "random", "draft_dtype": "bfloat16"})
    tiny = SHARED / "tinystories-656k"
    if (tiny / "config.json").exists():
        link = models / "tinystories-656k"
        if not link.exists():
            link.symlink_to(tiny, target_is_directory=True)
        d1 = models / "tinystories-656k-1l"
        if not (d1 / "config.json").exists():
            truncate(tiny, d1, layers=1)
        pairs.append({"name": "tinystories-656k + its first layer (trained)",
                      "target": link.name, "draft": d1.name, "kind": "real"})
    bundled = {m.name: m.path for m in list_models(None)}
    if "shakespeare" in bundled and "shakespeare-draft" in bundled:
        pairs.append({"name": "bundled shakespeare + shakespeare-draft (trained)",
                      "target": "shakespeare", "draft": "shakespeare-draft", "kind": "real",
                      "paths": {k: str(bundled[k]) for k in ("shakespeare", "shakespeare-draft")}})
    return pairs


def model_path(work: Path, pair: dict[str, Any], which: str) -> Path:
    name = pair[which]
    return Path(pair.get("paths", {}).get(name, work / "models" / name))


# -- daemons ------------------------------------------------------------------------------------


class Daemon:
    def __init__(self, name: str, args: list[str], log: Path, threads: int) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "p2pllm.cli.p2pllmd", "--name", name, "--host", "127.0.0.1",
             "--port", "0", "--print-port", "--no-mdns", "--threads", str(threads),
             "--log-level", "WARNING", *args],
            stdout=subprocess.PIPE, stderr=self.log, env=env, text=True)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("PORT "):
                self.port = int(line.split()[1])
                return
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"daemon {name} exited; see {log}")
        raise TimeoutError(f"daemon {name} did not start; see {log}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def wait_linked(a: Daemon, timeout: float = 60) -> None:
    conn = await open_daemon(a.address, None)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            snap = (await conn.request(MsgType.STATUS, {}, timeout=10)).meta
            if any(p["state"] == "up" for p in snap["peers"]):
                return
            await asyncio.sleep(0.2)
        raise TimeoutError("the daemons did not link up")
    finally:
        conn.close()


# -- runs ---------------------------------------------------------------------------------------


def run_local(path: Path, n: int, dtype: str = "float32") -> dict[str, float]:
    model = load_slice(path, dtype=getattr(torch, dtype))
    r = generate_ids(model, PROMPT_IDS, max_tokens=n, stop_ids=[])
    return {"decode_tps": r.tokens_per_s, "e2e_tps": r.generated_tokens / r.seconds,
            "tokens": r.generated_tokens, "ids": r.token_ids}  # type: ignore[dict-item]


def forward_costs(path: Path, sizes: list[int], reps: int = 5) -> dict[int, float]:
    """Median seconds of one T-token forward on a KV cache (T = 1: a decode step), per T."""
    model = load_slice(path)
    out: dict[int, float] = {}
    with torch.inference_mode():
        cache = model.new_cache(1, len(PROMPT_IDS) + max(sizes) + 1)
        model(torch.tensor([PROMPT_IDS]), torch.arange(len(PROMPT_IDS))[None], cache)
        base = cache.lengths[0]
        for t in sorted(set(sizes)):
            times = []
            for _ in range(reps):
                ids = torch.full((1, t), 5, dtype=torch.int64)
                t0 = time.perf_counter()
                model(ids, torch.arange(base, base + t)[None], cache)
                times.append(time.perf_counter() - t0)
                cache.rollback(0, base)
            out[t] = statistics.median(times)
    return out


def verify_cost(path: Path, reps: int) -> dict[str, Any]:
    """The γ+1-token verify forward's cost over one decode step, γ = 1..8 (median of reps)."""
    costs = forward_costs(path, list(range(1, 10)), reps=max(reps, 5))
    return {"model": str(path), "threads": torch.get_num_threads(),
            "decode_ms": round(costs[1] * 1e3, 2), "loadavg": os.getloadavg(),
            "verify_over_decode": {g: round(costs[g + 1] / costs[1], 3) for g in range(1, 9)},
            "command": " ".join(["python", "bench/spec.py", *sys.argv[1:]])}


def run_spec(address: str, pair: dict[str, Any], n: int, window: Any, temperature: float = 0.0,
             overlap: bool | str = "auto") -> dict[str, Any]:
    meta = {"mode": "spec", "prompt": "", "prompt_ids": PROMPT_IDS, "model": pair["target"],
            "draft_model": pair["draft"], "draft_tokens": window, "max_tokens": n,
            "temperature": temperature, "seed": 1, "draft_dtype": pair.get("draft_dtype", "float32"),
            "overlap": overlap}
    r = asyncio.run(stream_generate(address, None, meta, echo=False))
    return {**r, "e2e_tps": r["generated_tokens"] / r["seconds"], "decode_tps": r["tokens_per_s"]}


def run_hf(target: Any, draft: Any | None, n: int) -> dict[str, Any]:
    ids = torch.tensor([PROMPT_IDS])
    kwargs: dict[str, Any] = {"max_new_tokens": n, "do_sample": False, "pad_token_id": 0}
    if draft is not None:
        kwargs["assistant_model"] = draft
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = target.generate(ids, **kwargs)
    dt = time.perf_counter() - t0
    new = out[0, len(PROMPT_IDS):].tolist()
    return {"e2e_tps": len(new) / dt, "tokens": len(new), "ids": new}


def median(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(float(r[key]) for r in rows))


def bench_pair(work: Path, pair: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    n, threads = args.tokens, args.threads
    torch.set_num_threads(threads)
    tpath, dpath = model_path(work, pair, "target"), model_path(work, pair, "draft")
    ddtype = pair.get("draft_dtype", "float32")
    hf_t = AutoModelForCausalLM.from_pretrained(tpath, dtype=torch.float32).eval()
    hf_d = AutoModelForCausalLM.from_pretrained(dpath, dtype=getattr(torch, ddtype)).eval()
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    # the drafter's host lacks the target, so the verifier goes to the other daemon
    dirs = {"target": work / "vmodels", "draft": work / "dmodels"}
    for which, d in dirs.items():
        d.mkdir(exist_ok=True)
        link = d / pair[which]
        if not link.exists():
            link.symlink_to(model_path(work, pair, which), target_is_directory=True)
    w = args.window
    # the defaults (look-ahead "auto": off, as both daemons share this machine) and a fixed
    # window with the look-ahead forced on
    spec_variants: dict[str, tuple[Any, bool | str]] = {
        f"spec_w{w}": (w, "auto"), f"spec_w{w}_lookahead": (w, True), "spec_auto": ("auto", "auto")}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in (
        "target_only", "draft_only", *spec_variants, "hf_target_only", "hf_assisted")}
    verifier = Daemon("verifier", ["--models-dir", str(dirs["target"])], logs / "verifier.log", threads)
    drafter = None
    try:
        drafter = Daemon("drafter", ["--models-dir", str(dirs["draft"]), "--peer", verifier.address],
                         logs / "drafter.log", threads)
        asyncio.run(wait_linked(drafter))
        run_spec(drafter.address, pair, 8, 4)  # warm up: imports, first loads
        # interleaved; every ratio is taken within one repeat (this machine's load drifts)
        for _ in range(args.repeats):
            runs["target_only"].append(run_local(tpath, n))
            runs["draft_only"].append(run_local(dpath, n, ddtype))
            for key, (window, overlap) in spec_variants.items():
                runs[key].append(run_spec(drafter.address, pair, n, window, overlap=overlap))
            runs["hf_target_only"].append(run_hf(hf_t, None, n))
            runs["hf_assisted"].append(run_hf(hf_t, hf_d, n))
        sampled = run_spec(drafter.address, pair, n, w, temperature=0.8)
    finally:
        for d in (drafter, verifier):
            if d is not None:
                d.stop()
    ref = runs["target_only"][0]["ids"]
    same = {k: all(r.get("ids", r.get("token_ids")) == ref for r in v)
            for k, v in runs.items() if k != "draft_only"}

    def ratio(a: str, ka: str, b: str, kb: str) -> float:
        return float(statistics.median(float(x[ka]) / float(y[kb])
                                       for x, y in zip(runs[a], runs[b], strict=True)))

    c = ratio("target_only", "decode_tps", "draft_only", "decode_tps")
    # what a verification forward of γ+1 tokens costs, in decode steps of the target (the
    # formula takes 1: true when decoding is bound by memory bandwidth, not on 1 CPU thread)
    sizes = {k: max(1, round(median(runs[k], "mean_window"))) + 1 for k in spec_variants}
    costs = forward_costs(tpath, [1, *sizes.values()])
    out: dict[str, Any] = {
        "pair": pair["name"],
        "tokens": n,
        "c_draft_over_target": round(c, 4),
        "target_only": {"decode_tps": round(median(runs["target_only"], "decode_tps"), 2),
                        "e2e_tps": round(median(runs["target_only"], "e2e_tps"), 2)},
        "draft_only": {"decode_tps": round(median(runs["draft_only"], "decode_tps"), 2)},
        "hf_target_only": {"e2e_tps": round(median(runs["hf_target_only"], "e2e_tps"), 2)},
        "hf_assisted": {"e2e_tps": round(median(runs["hf_assisted"], "e2e_tps"), 2),
                        "speedup_vs_hf_target_only": round(
                            ratio("hf_assisted", "e2e_tps", "hf_target_only", "e2e_tps"), 3)},
        "same_tokens_as_target_only": same,
    }
    for key in spec_variants:
        rows = runs[key]
        alpha = median(rows, "alpha")
        gamma = median(rows, "mean_window")
        measured = ratio(key, "decode_tps", "target_only", "decode_tps")
        g = max(1, round(gamma))
        theory = expected_speedup(min(alpha, 1.0), g, c)
        v = costs[sizes[key]] / costs[1]
        theory_v = expected_tokens_per_round(min(alpha, 1.0), g) / (g * c + v)
        out[key] = {
            "decode_tps": round(median(rows, "decode_tps"), 2),
            "e2e_tps": round(median(rows, "e2e_tps"), 2),
            "alpha": round(alpha, 4),
            "acceptance_rate": round(median(rows, "acceptance_rate"), 4),
            "gamma": round(gamma, 2),
            "speedup_measured": round(measured, 3),
            "speedup_theoretical": round(theory, 3),
            "measured_over_theoretical": round(measured / theory, 3),
            "verify_forward_cost_in_steps": round(v, 3),
            "speedup_theoretical_with_verify_cost": round(theory_v, 3),
            "measured_over_theoretical_with_verify_cost": round(measured / theory_v, 3),
            "vs_hf_assisted_e2e": round(ratio(key, "e2e_tps", "hf_assisted", "e2e_tps"), 3),
            "network_ms_per_round": round(median(rows, "network_ms_per_round"), 3),
            "bytes_per_round": round(median(rows, "bytes_per_round"), 1),
            "rounds": median(rows, "rounds"),
            "lookahead": rows[0]["lookahead"],
            "lookahead_hits_per_round": round(
                statistics.median(r["lookahead_hits"] / max(r["rounds"], 1) for r in rows), 3),
            "draft_s": round(median(rows, "draft_s"), 4),
            "verify_s": round(median(rows, "verify_s"), 4),
            "wait_s": round(median(rows, "wait_s"), 4),
            "seconds": round(median(rows, "seconds"), 4),
        }
    out["spec_sampling_t0.8"] = {
        "alpha": round(sampled["alpha"], 4), "gamma": round(sampled["mean_window"], 2),
        "decode_tps": round(sampled["decode_tps"], 2),
        "bytes_per_round": round(sampled["bytes_per_round"], 1),
        "network_ms_per_round": round(sampled["network_ms_per_round"], 3),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per daemon / process")
    ap.add_argument("--window", type=int, default=4, help="the fixed draft window γ")
    ap.add_argument("--quick", action="store_true", help="a small random pair instead of 110M")
    ap.add_argument("--work", type=Path, default=None, help="keep models here (default: a temp dir)")
    ap.add_argument("--only", default=None, help="run only pairs whose name contains this")
    ap.add_argument("--all", action="store_true",
                    help="also the 110M target with its first 2 layers as the draft (alpha ~0.05)")
    ap.add_argument("--verify-cost", type=Path, default=None, metavar="MODEL",
                    help="only the verifier's forward over γ+1 tokens against one decode step "
                         "for γ = 1..8 on MODEL (issue 14 goal: <= 1.3x), as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.verify_cost is not None:
        print(json.dumps(verify_cost(args.verify_cost, args.repeats), indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        pairs = build_pairs(work, args.quick, args.all)
        if args.only:
            pairs = [p for p in pairs if args.only in p["name"]]
        results = [bench_pair(work, p, args) for p in pairs]
    print(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads_per_process": args.threads,
                    "loadavg": os.getloadavg()},
        "command": " ".join(["python", "bench/spec.py", *sys.argv[1:]]),
        "pairs": results,
    }, indent=2))


if __name__ == "__main__":
    main()
