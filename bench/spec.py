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

``--smollm2`` (issue 14) instead: SmolLM2-135M-Instruct (the shared Q4_1 GGUF, as a float32
target, quant none) against its own int4 / int8 (``draft_quant``) and bfloat16
(``draft_dtype``) copies as drafts, greedy, ``--ignore-eos``-style ``max_tokens``, prompt "The
capital of France is"::

    python bench/spec.py --smollm2 [--tokens 96] [--repeats 2] [--window 4]
        [--rtt 0,5,20] [--drafts int4,int8,bf16] | [--cells reduced | int4@0,int8@0,int4@20]

Local float32 decode in this process (pinned to core 0, one thread) vs spec with the verifier
daemon on core 1 and a drafter daemon on core 0 (``--threads 1`` each) whose only peer is a
bench/linkproxy.py child at the cell's RTT in front of the verifier; windows ``--window`` and
"auto"; llama.cpp's llama-speculative-simple (f32 target, q4_1 / q8_0 / bf16 draft GGUFs,
``-t 1``, ``--temp 0``, ``--spec-draft-n-max`` = ``--window``) and ``llama-bench -n`` (plain)
in the repeats of the first RTT group. Every ratio is taken within one repeat. Per cell:
tokens/s, speedup, α, γ, tokens / draft ms / verify ms / network ms per round, overlap share
(look-ahead hits per round), Leviathan's theory (with c measured here, and with the measured
verify cost), and ``exact`` (the tokens equal local greedy).
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


async def wait_linked(address: str, timeout: float = 60) -> None:
    """Until the daemon at ``address`` has a peer up."""
    conn = await open_daemon(address, None)
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
            "overlap": overlap, "verifier": "verifier", "drafter": "drafter"}
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
    # a daemon refuses a link under its roots that points outside them: the folders the links
    # point into are roots too (the roles are pinned by name in run_spec)
    roots = [a for r in (work / "models", SHARED) if r.exists() for a in ("--models-dir", str(r))]
    verifier = Daemon("verifier", ["--models-dir", str(dirs["target"]), *roots],
                      logs / "verifier.log", threads)
    drafter = None
    try:
        drafter = Daemon("drafter", ["--models-dir", str(dirs["draft"]), *roots, "--peer",
                                     verifier.address], logs / "drafter.log", threads)
        asyncio.run(wait_linked(drafter.address))
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



# -- SmolLM2: a real model, its quantized copies as drafts, emulated links, llama.cpp ------------

SMOL_GGUF = SHARED / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_NAME = "smollm2-135m-instruct"
SMOL_PROMPT_IDS = [504, 3575, 282, 4649, 314]  # "The capital of France is" (no BOS, no template)
SMOL_PROMPT = "The capital of France is"
# our draft formats -> (GENERATE fields, llama.cpp's draft GGUF of the same weights)
SMOL_DRAFTS: dict[str, tuple[dict[str, str], str]] = {
    "int4": ({"draft_quant": "int4"}, "q4_1"),
    "int8": ({"draft_quant": "int8"}, "q8_0"),
    "bf16": ({"draft_dtype": "bfloat16"}, "bf16"),
}
SMOL_DEFAULT_CELLS = "int4@0,int8@0,bf16@0,int4@5,int4@20"


def llamacpp_dir() -> Path:
    return Path(os.environ.get("LLAMACPP_DIR", Path.home() / ".cache/p2pllm-peers/llama.cpp"))


def parse_cells(text: str) -> list[tuple[str, float]]:
    """``"int4@0,int8@0,int4@5"`` -> [("int4", 0.0), ("int8", 0.0), ("int4", 5.0)] (draft @ RTT
    ms); a draft outside SMOL_DRAFTS is a ValueError."""
    out: list[tuple[str, float]] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        draft, sep, rtt = part.partition("@")
        if draft not in SMOL_DRAFTS or not sep:
            raise ValueError(f"cell {part!r}: expected DRAFT@RTT_MS, DRAFT in {sorted(SMOL_DRAFTS)}")
        out.append((draft, float(rtt)))
    return out


def parse_llama_spec(text: str) -> dict[str, float]:
    """The figures llama-speculative-simple prints at its end: decode speed (tokens/s), tokens
    decoded and seconds, n_draft (window), n_predict, n_drafted, n_accept, accept (a fraction).
    Missing lines are left out."""
    import re

    out: dict[str, float] = {}
    m = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+) t/s", text)
    if m:
        out.update(decoded=int(m[1]), seconds=float(m[2]), tokens_per_s=float(m[3]))
    for key in ("n_draft", "n_predict", "n_drafted", "n_accept"):
        m = re.search(rf"\b{key}\s*=\s*(\d+)", text)
        if m:
            out[key] = int(m[1])
    m = re.search(r"\baccept\s*=\s*([\d.]+)%", text)
    if m:
        out["accept"] = float(m[1]) / 100
    return out


def parse_llama_bench(text: str) -> float | None:
    """The text-generation tokens/s (avg_ts of the n_gen > 0 row) of ``llama-bench -o json``."""
    start = text.find("[")
    if start < 0:
        return None
    try:
        rows = json.loads(text[start:text.rfind("]") + 1])
    except json.JSONDecodeError:
        return None
    for row in rows:
        if row.get("n_gen", 0) > 0:
            return float(row["avg_ts"])
    return None


def _pin(core: int) -> Any:
    return lambda: os.sched_setaffinity(0, {core})


def llama_run(exe: str, args: list[str], core: int, log: Path) -> str:
    bin_dir = llamacpp_dir() / "bin"
    env = {**os.environ, "LD_LIBRARY_PATH": str(bin_dir)}
    r = subprocess.run([str(bin_dir / exe), *args], capture_output=True, text=True, env=env,
                       preexec_fn=_pin(core), timeout=300, stdin=subprocess.DEVNULL)
    log.write_text(r.stdout + r.stderr)
    return r.stdout + r.stderr


def llama_plain(n: int, core: int, log: Path) -> float | None:
    gguf = llamacpp_dir() / "models" / f"{SMOL_NAME}-f32.gguf"
    text = llama_run("llama-bench", ["-m", str(gguf), "-p", "0", "-n", str(n), "-t", "1",
                                     "-r", "1", "-o", "json"], core, log)
    return parse_llama_bench(text)


def llama_spec(draft: str, n: int, window: int, core: int, log: Path) -> dict[str, float]:
    models = llamacpp_dir() / "models"
    text = llama_run("llama-speculative-simple", [
        "-m", str(models / f"{SMOL_NAME}-f32.gguf"),
        "-md", str(models / f"{SMOL_NAME}-{SMOL_DRAFTS[draft][1]}.gguf"),
        "--spec-type", "draft-simple", "-t", "1", "-td", "1", "--temp", "0", "-n", str(n),
        "--ignore-eos", "--spec-draft-n-max", str(window), "--spec-draft-n-min", "0",
        "-p", SMOL_PROMPT], core, log)
    return parse_llama_spec(text)


class Proxy:
    """bench/linkproxy.py as a child process: listen on a free port, forward to ``target``."""

    def __init__(self, target: str, rtt_ms: float, log: Path) -> None:
        from p2pllm.lab.daemons import free_ports

        self.port = free_ports(1)[0]
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "linkproxy.py"), "--listen",
             f"127.0.0.1:{self.port}", "--target", target, "--rtt-ms", str(rtt_ms)],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while "linkproxy" not in Path(log).read_text() and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


def smol_local(model: Any, n: int) -> dict[str, Any]:
    r = generate_ids(model, SMOL_PROMPT_IDS, max_tokens=n, stop_ids=[])
    return {"decode_tps": r.tokens_per_s, "ids": r.token_ids}


def bench_smollm2(args: argparse.Namespace) -> dict[str, Any]:
    """Local float32 decode vs spec across two pinned daemons (a link proxy between them) vs
    llama.cpp, on SmolLM2-135M-Instruct; one JSON object."""
    source = SMOL_GGUF if args.target_gguf is None else (
        llamacpp_dir() / "models" / f"{SMOL_NAME}-f32.gguf" if args.target_gguf == "f32"
        else Path(args.target_gguf))
    if not source.exists():
        raise SystemExit(f"missing {source}")
    n, w = args.tokens, args.window
    cells = parse_cells(args.cells) if args.cells else [
        (d, float(r)) for r in args.rtt.split(",") for d in args.drafts.split(",")]
    windows: list[Any] = [w, "auto"]
    os.sched_setaffinity(0, {0})  # this process: the local decodes, on the drafter's core
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="spec-smol-"))
    (tmp / "models" / SMOL_NAME).mkdir(parents=True)
    (tmp / "models" / SMOL_NAME / source.name).symlink_to(source)
    gguf_dir = tmp / "models" / SMOL_NAME
    if args.prompt:  # every run below (ours and llama.cpp's) takes this prompt instead
        global SMOL_PROMPT, SMOL_PROMPT_IDS
        from p2pllm.engine.loader import load_tokenizer

        SMOL_PROMPT = args.prompt
        SMOL_PROMPT_IDS = list(load_tokenizer(gguf_dir)(args.prompt)["input_ids"])
    logs = tmp / "logs"
    logs.mkdir()
    t_start = time.monotonic()
    load_start = os.getloadavg()
    target = load_slice(gguf_dir, dtype=torch.float32, quant="none")
    drafts_used = sorted({d for d, _ in cells})
    # the draft's decode step over the target's (c), our engine, this process, core 0
    c_of: dict[str, float] = {}
    for d in drafts_used:
        fields = SMOL_DRAFTS[d][0]
        dm = load_slice(gguf_dir, dtype=getattr(torch, fields.get("draft_dtype", "float32")),
                        quant=fields.get("draft_quant", "none"))
        ratios = []
        for _ in range(args.repeats):
            t = smol_local(target, 32)["decode_tps"]
            ratios.append(t / smol_local(dm, 32)["decode_tps"])
        c_of[d] = statistics.median(ratios)
        del dm
    ref = smol_local(target, n)["ids"]
    rows: dict[str, list[dict[str, Any]]] = {}
    local_rows: dict[float, list[float]] = {}
    pair_ratio: dict[str, list[float]] = {}
    from p2pllm.lab.daemons import StartedDaemon

    # llama.cpp, same formats, one process, one thread on core 0: in the repeats of the first
    # RTT group, beside our local decode (the daemons idle then), so ratios are per repeat
    have_llama = (llamacpp_dir() / "bin" / "llama-speculative-simple").exists()
    plain_runs: list[float] = []
    spec_runs: dict[str, list[dict[str, float]]] = {}
    ours_over_llama: dict[str, list[float]] = {}
    first_rtt = min(r for _, r in cells)
    verifier = StartedDaemon("verifier", 1, {1}, ["--models-dir", str(tmp / "models")], logs)
    try:
        verifier.wait()
        for rtt in sorted({r for _, r in cells}):
            group = [d for d, r in cells if r == rtt]
            proxy = Proxy(verifier.address, rtt, logs / f"proxy-{rtt:g}.log")
            drafter = StartedDaemon(f"drafter-{rtt:g}ms", 1, {0}, [
                "--models-dir", str(tmp / "models"), "--peer", f"127.0.0.1:{proxy.port}"], logs)
            try:
                drafter.wait()
                address = drafter.address
                asyncio.run(wait_linked(address))
                for d in group:  # warm up: loads of every draft format, the target
                    _spec_pinned(address, 8, d, w, f"drafter-{rtt:g}ms")
                for i in range(args.repeats):
                    base = smol_local(target, n)
                    local_rows.setdefault(rtt, []).append(base["decode_tps"])
                    lspec: dict[str, dict[str, float]] = {}
                    if have_llama and rtt == first_rtt:
                        plain = llama_plain(n, 0, logs / f"llama-bench-{i}.log")
                        plain_runs.append(plain or 0.0)
                        for d in drafts_used:
                            lr = llama_spec(d, n, w, 0, logs / f"llama-spec-{d}-{i}.log")
                            if plain and lr.get("tokens_per_s"):
                                lr["speedup"] = lr["tokens_per_s"] / plain
                            spec_runs.setdefault(d, []).append(lr)
                            lspec[d] = lr
                    for d in group:
                        for win in windows:
                            key = f"spec_{d}_w{win}_rtt{rtt:g}"
                            r = _spec_pinned(address, n, d, win, f"drafter-{rtt:g}ms")
                            r["exact"] = r["token_ids"] == ref
                            r["speedup"] = r["decode_tps"] / base["decode_tps"]
                            rows.setdefault(key, []).append(r)
                            pair_ratio.setdefault(key, []).append(r["speedup"])
                            if lspec.get(d, {}).get("tokens_per_s"):
                                ours_over_llama.setdefault(key, []).append(
                                    r["decode_tps"] / lspec[d]["tokens_per_s"])
                            print(json.dumps({"progress": key, "tps": round(r["decode_tps"], 2),
                                              "speedup": round(r["speedup"], 3),
                                              "exact": r["exact"]}), file=sys.stderr, flush=True)
            finally:
                drafter.stop()
                proxy.stop()
    finally:
        verifier.stop()
    llama: dict[str, Any] = {}
    if have_llama:
        llama["plain_tps"] = round(statistics.median(plain_runs), 2)
        for d, rs in spec_runs.items():
            ok = [r for r in rs if "tokens_per_s" in r]
            if not ok:
                llama[f"spec_{d}_w{w}"] = {"error": "no speed line; see logs", "logs": str(logs)}
                continue
            llama[f"spec_{d}_w{w}"] = {
                "draft_gguf": SMOL_DRAFTS[d][1],
                "tokens_per_s": round(median(ok, "tokens_per_s"), 2),
                "speedup_vs_llama_plain": round(median(ok, "speedup"), 3) if all(
                    "speedup" in r for r in ok) else None,
                "accept": round(median(ok, "accept"), 4) if all("accept" in r for r in ok) else None,
                # every round drafts n_draft tokens (--spec-draft-p-min 0)
                "tokens_per_round": round(statistics.median(
                    r["n_predict"] * r["n_draft"] / r["n_drafted"] for r in ok), 3)
                if all(r.get("n_drafted") and "n_predict" in r and "n_draft" in r for r in ok)
                else None,
            }
    # verify forward cost over a decode step, the target, this process
    costs = forward_costs(gguf_dir, list(range(1, 10)))
    local_tps = statistics.median(v for vs in local_rows.values() for v in vs)
    out: dict[str, Any] = {
        "model": f"{SMOL_NAME} ({source.name}: target float32, quant none)",
        "tokens": n, "repeats": args.repeats, "window": w,
        "prompt_ids": SMOL_PROMPT_IDS,
        "local_target_decode_tps": round(local_tps, 2),
        "local_target_decode_tps_by_rtt_group": {
            f"{k:g}": round(statistics.median(v), 2) for k, v in local_rows.items()},
        "c_draft_over_target": {d: round(c, 4) for d, c in c_of.items()},
        "verify_over_decode": {g: round(costs[g + 1] / costs[1], 3) for g in range(1, 9)},
        "decode_ms": round(costs[1] * 1e3, 2),
        "cells": {},
        "llama_cpp": llama,
    }
    for key, rs in rows.items():
        d = key.split("_")[1]
        alpha = median(rs, "alpha")
        gamma = median(rs, "mean_window")
        g = max(1, round(gamma))
        c = c_of[d]
        theory = expected_speedup(min(alpha, 1.0), g, c)
        t1 = g + 1 if g + 1 in costs else max(costs)
        v = costs[t1] / costs[1]
        theory_v = expected_tokens_per_round(min(alpha, 1.0), g) / (g * c + v)
        measured = statistics.median(pair_ratio[key])
        per_round = [(r["draft_s"] / max(r["rounds"], 1), r["verify_s"] / max(r["rounds"], 1))
                     for r in rs]
        out["cells"][key] = {
            "decode_tps": round(median(rs, "decode_tps"), 2),
            "speedup_vs_local": round(measured, 3),
            "alpha": round(alpha, 4),
            "acceptance_rate": round(median(rs, "acceptance_rate"), 4),
            "gamma": round(gamma, 2),
            "tokens_per_round": round(median(rs, "mean_tokens_per_round"), 3),
            "draft_ms_per_round": round(1e3 * statistics.median(p[0] for p in per_round), 2),
            "verify_ms_per_round": round(1e3 * statistics.median(p[1] for p in per_round), 2),
            "network_ms_per_round": round(median(rs, "network_ms_per_round"), 2),
            "wait_s": round(median(rs, "wait_s"), 4),
            "lookahead": rs[0].get("lookahead"),
            "lookahead_choice": rs[0].get("lookahead_choice"),
            "overlap_share": round(statistics.median(
                r.get("lookahead_hits", 0) / max(r["rounds"], 1) for r in rs), 3),
            "speedup_theoretical": round(theory, 3),
            "measured_over_theoretical": round(measured / theory, 3),
            "verify_cost_in_steps": round(v, 3),
            "speedup_theoretical_with_verify_cost": round(theory_v, 3),
            "tps_over_llama_spec_same_draft": round(statistics.median(ours_over_llama[key]), 3)
            if key in ours_over_llama else None,
            "exact": all(r["exact"] for r in rs),
            "rounds": median(rs, "rounds"),
        }
    out["all_exact"] = all(c["exact"] for c in out["cells"].values())
    out["wall_s"] = round(time.monotonic() - t_start, 1)
    out["loadavg_start"] = load_start
    out["logs"] = str(logs)
    return out


def _spec_pinned(address: str, n: int, draft: str, window: Any, drafter: str) -> dict[str, Any]:
    """One greedy spec GENERATE through the daemon at ``address``, its roles pinned by node
    name: the verifier on "verifier", the drafter on ``drafter`` (that daemon's --name)."""
    meta = {"mode": "spec", "prompt": "", "prompt_ids": SMOL_PROMPT_IDS, "model": SMOL_NAME,
            "draft_model": SMOL_NAME, "draft_tokens": window, "max_tokens": n, "temperature": 0.0,
            "seed": 1, "quant": "none", "dtype": "float32", "ignore_eos": True,
            "verifier": "verifier", "drafter": drafter, **SMOL_DRAFTS[draft][0]}
    r = asyncio.run(stream_generate(address, None, meta, echo=False))
    if "token_ids" not in r:
        raise RuntimeError(f"spec run failed: {r}")
    return {**r, "decode_tps": r["tokens_per_s"]}


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
    ap.add_argument("--smollm2", action="store_true",
                    help="SmolLM2-135M-Instruct: float32 target vs its int4/int8/bf16 copies as "
                         "drafts, two daemons pinned to cores 0/1 behind bench/linkproxy.py at "
                         "--rtt, and llama.cpp's llama-speculative-simple on the same formats")
    ap.add_argument("--rtt", default="0,5,20", help="--smollm2: emulated RTTs in ms (with --drafts)")
    ap.add_argument("--drafts", default="int4,int8,bf16", help="--smollm2: draft formats")
    ap.add_argument("--prompt", default=None,
                    help="--smollm2: the prompt text (default \"The capital of France is\")")
    ap.add_argument("--target-gguf", default=None, metavar="PATH|f32",
                    help="--smollm2: the target's GGUF (default the shared Q4_1, whose int4 "
                    "copy is the target itself: acceptance 1; f32 = llama.cpp's f32 GGUF of "
                    "the original weights, as its llama-speculative-simple target)")
    ap.add_argument("--cells", default=None,
                    help=f"--smollm2: DRAFT@RTT cells instead of --drafts x --rtt; 'reduced': "
                         f"{SMOL_DEFAULT_CELLS}")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.smollm2:
        if args.cells == "reduced":
            args.cells = SMOL_DEFAULT_CELLS
        res = bench_smollm2(args)
        res["command"] = " ".join(["python", "bench/spec.py", *sys.argv[1:]])
        res["loadavg_end"] = os.getloadavg()
        res["machine"] = {"cpu": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count(), "torch": torch.__version__}
        print(json.dumps(res, indent=2))
        return
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
