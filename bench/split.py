"""Split inference benchmark: the local engine vs 2 and 3 shard daemons on loopback.

Builds a random-initialised Llama (~110M parameters by default: hidden 768, 12 layers,
vocab 32000, tied embeddings) in a temp dir, then measures, side by side in one run:

- per-token decode latency: local engine vs 2 and 3 shards (each process gets --threads
  torch threads, pinned to its own core(s) when the machine has them);
- aggregate tokens/s with 1, 4 and 8 concurrent sessions: local (2 x --threads threads,
  one Python thread per session) vs 2 shards of --threads each (same total cores), with and
  without batched decode steps;
- bytes on the wire per generated token for each wire dtype (and whether its tokens equal
  float32's);
- RSS of each shard daemon (growth once its layers are loaded, and peak) vs the local
  process holding the whole model.

Prints one JSON object; "goals" compares against the issue's targets.

    python bench/split.py                       # ~110M model, 48 tokens, sessions 1,4,8
    python bench/split.py --hidden 256 --layers 4 --vocab 2048 --tokens 16   # a quick look
    python bench/split.py --smollm2 --pin --tokens 32 --reps 2   # SmolLM2-135M rows only

``--smollm2``: SmolLM2-135M-Instruct from ../shared's GGUF (a models dir folder holding it):
per ``--quants`` (none = float32, int8, int4) the per-token decode latency of 2 shards (one
core each with --pin) against the local engine on one core, and whether their greedy ids
agree; the goal is <= 1.05x local latency. Each row also gives every local/split pair's
ratio (the machine's noise) and the CPU time per token of both shard daemons against the
local thread (a figure other processes on the machine barely move).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from p2pllm.cli.client import open_daemon  # noqa: E402
from p2pllm.lab.daemons import free_ports  # noqa: E402
from p2pllm.wire.connection import RemoteError  # noqa: E402
from p2pllm.wire.messages import ErrorCode, MsgType  # noqa: E402


def make_model(path: Path, hidden: int, layers: int, vocab: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 64), max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    import random

    rng = random.Random(0)
    return [[1] + [rng.randrange(3, vocab) for _ in range(length - 1)] for _ in range(n)]


PIN = False  # --pin: each process on its own core(s); only meaningful on a quiet machine


def cores_for(index: int, count: int) -> set[int]:
    """`count` cores for process `index` with --pin (distinct while the machine has enough),
    else every usable core (the scheduler places them)."""
    avail = sorted(os.sched_getaffinity(0))
    if not PIN:
        return set(avail)
    return {avail[(index * count + i) % len(avail)] for i in range(count)}


def cpu_ns(pid: int) -> tuple[int, int]:
    """(ns on a CPU, ns runnable but waiting for one) of all of a process's threads so far
    (/proc/PID/task/*/schedstat): the first is what the work cost, whatever else the machine
    runs; the second is how long other processes held its core."""
    run = wait = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                a, b, _ = f.read().split()
        except (OSError, ValueError):  # a thread that just ended
            continue
        run, wait = run + int(a), wait + int(b)
    return run, wait


def proc_mem(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


# -- the local engine ----------------------------------------------------------------------------


def local_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """In a child process (for a clean memory figure): load the whole model and decode."""
    import torch

    from p2pllm.engine.generate import generate_ids
    from p2pllm.engine.loader import load_slice

    os.sched_setaffinity(0, set(spec["cores"]))
    torch.set_num_threads(spec["threads"])
    generate_ids(load_slice(spec["warm"]), [1, 2], max_tokens=2)  # imports, allocator warm
    base = proc_mem(os.getpid())["VmRSS"]
    model = load_slice(spec["model"])
    generate_ids(model, spec["prompt"], max_tokens=spec["tokens"])
    mem = proc_mem(os.getpid())  # after decoding: every weight page has been read
    return {"rss": {"base": base, "growth": mem["VmRSS"] - base, "peak": mem["VmHWM"]},
            "params": model.num_parameters()}


def run_local_memory(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--local-worker", json.dumps(spec)],
                         capture_output=True, text=True, check=True, timeout=3600,
                         env={**os.environ, "OMP_NUM_THREADS": str(spec["threads"])})
    return json.loads(out.stdout.strip().splitlines()[-1])


class Local:
    """The local engine in this process. Its timings are taken between the shards' runs, so
    both see the same machine load; while it runs, this process is pinned like a shard."""

    def __init__(self, path: Path, tokens: int, quant: str = "none") -> None:
        import torch

        from p2pllm.engine.loader import load_slice

        self.torch = torch
        self.model = load_slice(path, quant=quant)
        self.tokens = tokens
        self.all_cores = os.sched_getaffinity(0)

    def _pin(self, threads: int) -> None:
        os.sched_setaffinity(0, cores_for(0, threads))
        self.torch.set_num_threads(threads)

    def run(self, prompt: list[int], threads: int) -> tuple[list[int], list[float], float]:
        """(token ids, gaps between consecutive tokens, time to first token); the CPU
        seconds of this thread during the run are left in ``self.cpu_s``."""
        from p2pllm.engine.generate import generate_ids

        self._pin(threads)
        try:
            stamps: list[float] = []
            c0 = time.thread_time()
            r = generate_ids(self.model, prompt, max_tokens=self.tokens,
                             on_token=lambda _t: stamps.append(time.perf_counter()))
            self.cpu_s = time.thread_time() - c0
        finally:
            os.sched_setaffinity(0, self.all_cores)
        return r.token_ids, [b - a for a, b in itertools.pairwise(stamps)], r.time_to_first_token_s

    def throughput(self, ps: list[list[int]], n: int, threads: int) -> float:
        """Tokens/s of n sessions at once (one Python thread each, `threads` torch threads)."""
        from p2pllm.engine.generate import generate_ids

        self._pin(threads)
        done: list[int] = []

        def one(p: list[int]) -> None:
            done.append(generate_ids(self.model, p, max_tokens=self.tokens).generated_tokens)

        try:
            workers = [threading.Thread(target=one, args=(ps[i % len(ps)],)) for i in range(n)]
            t0 = time.perf_counter()
            for t in workers:
                t.start()
            for t in workers:
                t.join()
            return sum(done) / (time.perf_counter() - t0)
        finally:
            os.sched_setaffinity(0, self.all_cores)


# -- shard daemons --------------------------------------------------------------------------------


class Daemon:
    def __init__(self, name: str, port: int, peers: list[int], threads: int, cores: set[int],
                 models: Path, logs: Path) -> None:
        self.name = name
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
        args = [sys.executable, "-m", "p2pllm.cli.p2pllmd", "--name", name, "--host", "127.0.0.1",
                "--port", str(port), "--no-mdns", "--threads", str(threads), "--print-port",
                "--models-dir", str(models), "--log-level", "WARNING"]
        for p in peers:
            args += ["--peer", f"127.0.0.1:{p}"]
        self.log = open(logs / f"{name}.log", "w")  # closed in stop()
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, preexec_fn=lambda: os.sched_setaffinity(0, cores))
        self.port = port
        self.node_id = ""

    def wait(self) -> Daemon:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("PORT "):
                self.node_id = line.split()[3]
                return self
        raise RuntimeError(f"daemon {self.name} did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()



async def start_daemons(n: int, threads: int, models: Path, logs: Path) -> list[Daemon]:
    ports = free_ports(n)
    ds = [Daemon(f"s{i}", p, [q for q in ports if q != p], threads, cores_for(i, threads),
                 models, logs) for i, p in enumerate(ports)]
    for d in ds:
        d.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # every daemon sees every other
        ok = True
        for d in ds:
            conn = await open_daemon(f"127.0.0.1:{d.port}")
            snap = (await conn.request(MsgType.STATUS, {}, timeout=10)).meta
            conn.close()
            ok &= sum(p["state"] == "up" for p in snap["peers"]) == n - 1
        if ok:
            return ds
        await asyncio.sleep(0.2)
    raise RuntimeError("daemons did not connect")


async def generate(port: int, **meta: Any) -> dict[str, Any]:
    """GENERATE mode split; adds "gaps": seconds between consecutive streamed tokens."""
    conn = await open_daemon(f"127.0.0.1:{port}")
    stamps: list[float] = []
    try:
        async for frame in conn.stream(MsgType.GENERATE, {"mode": "split", **meta},
                                       idle_timeout=3600):
            if frame.is_partial:
                stamps.append(time.perf_counter())
            else:
                return frame.meta | {"gaps": [b - a for a, b in itertools.pairwise(stamps)]}
    finally:
        conn.close()
    raise RuntimeError("no result")


async def split_phase(ds: list[Daemon], local: Local, model: Path, ps: list[list[int]],
                      tokens: int, reps: int, shards: int, threads: int, sessions: list[int],
                      extra: dict[str, Any], check_ids: bool = True) -> dict[str, Any]:
    port = ds[0].port
    # a tiny model first, so the figures below count the shard, not first-use imports
    await generate(port, model=str(model.parent / "warm"), prompt_ids=[1, 2], max_tokens=2,
                   shards=shards, keep_alive=0)
    base = {d.node_id: proc_mem(d.proc.pid)["VmRSS"] for d in ds}
    common = {"model": str(model), "max_tokens": tokens, "shards": shards, "keep_alive": 600,
              **extra}
    first = await generate(port, prompt_ids=ps[0], **common)  # plans and loads the shards
    out: dict[str, Any] = {"setup_s": first["setup_s"], "job": first["job"],
                           "plan": [s["layers"] for s in first["shards"]]}
    # 1. latency: local and split runs alternate
    gaps: dict[str, list[float]] = {"local": [], "split": []}
    ttft: dict[str, list[float]] = {"local": [], "split": []}
    per_rep: dict[str, list[float]] = {"local": [], "split": []}  # each run's median gap
    cpu: dict[str, list[float]] = {"local": [], "split": [], "split_waiting": []}
    for _ in range(reps):
        _, g, t = local.run(ps[0], threads)
        gaps["local"] += g
        ttft["local"].append(t)
        per_rep["local"].append(statistics.median(g))
        cpu["local"].append(local.cpu_s / tokens)
        before = [cpu_ns(d.proc.pid) for d in ds]
        r = await generate(port, prompt_ids=ps[0], **common)
        after = [cpu_ns(d.proc.pid) for d in ds]
        gaps["split"] += r["gaps"]
        ttft["split"].append(r["time_to_first_token_s"])
        per_rep["split"].append(statistics.median(r["gaps"]))
        # every thread of every shard daemon (the coordinator's relay included)
        cpu["split"].append(sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
                            / 1e9 / tokens)
        cpu["split_waiting"].append(sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
                                    / 1e9 / tokens)
    out["ms_per_token"] = {k: 1000 * statistics.median(v) for k, v in gaps.items()}
    out["ratio_per_rep"] = [round(s / loc, 3) for loc, s in zip(per_rep["local"],
                                                                per_rep["split"], strict=True)]
    out["cpu_ms_per_token"] = {k: round(1000 * statistics.median(v), 2) for k, v in cpu.items()}
    out["ttft_ms"] = {k: 1000 * statistics.median(v) for k, v in ttft.items()}
    # what each shard's forward took per step (the rest of a token's time is the hops)
    out["shard_compute_ms_per_step"] = [round(1000 * s["compute_s"] / s["steps"], 3)
                                        for s in r["shards"]]
    # 2. the same greedy ids as the local engine, for 8 prompts
    if check_ids:
        out["ids_equal_local"] = all([
            (await generate(port, prompt_ids=p, **common))["token_ids"]
            == local.run(p, threads)[0] for p in ps[:8]])
    by_node = {d.node_id: d for d in ds}
    out["shards"] = []
    for s in first["shards"]:
        mem = proc_mem(by_node[s["node_id"]].proc.pid)
        out["shards"].append({
            "layers": s["layers"], "params": s["params"], "weight_bytes": s["params"] * 4,
            "rss_growth": mem["VmRSS"] - base[s["node_id"]], "rss_peak": mem["VmHWM"],
            "rss": mem["VmRSS"]})
    # 3. aggregate tokens/s, n sessions at once; the local engine gets as many cores in all
    agg: dict[str, dict[str, float]] = {}
    for n in sessions:
        best = {"local": 0.0, "split": 0.0}
        for _ in range(2):  # best of two each, alternating: the machine may be shared
            best["local"] = max(best["local"], local.throughput(ps, n, threads * shards))
            t0 = time.perf_counter()
            res = await asyncio.gather(*(generate(port, prompt_ids=ps[i % len(ps)], **common)
                                         for i in range(n)))
            best["split"] = max(best["split"], sum(r["generated_tokens"] for r in res)
                                / (time.perf_counter() - t0))
        agg[str(n)] = best
    out["tokens_per_s"] = agg
    conn = await open_daemon(f"127.0.0.1:{port}")
    await conn.request(MsgType.JOB_STOP, {"job": first["job"]}, timeout=60)
    conn.close()
    return out


async def wire_phase(ds: list[Daemon], model: Path, p: list[int], tokens: int,
                     hidden: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ref: list[int] = []
    for wire in ("float32", "bfloat16", "float16"):
        r = await generate(ds[0].port, model=str(model), prompt_ids=p[:1], max_tokens=tokens,
                           shards=2, wire_dtype=wire, keep_alive=0)
        positions = r["prompt_tokens"] + r["generated_tokens"] - 1
        ref = ref or r["token_ids"]
        same = sum(a == b for a, b in zip(ref, r["token_ids"], strict=False))
        out[wire] = {
            "bytes_per_token": round(r["wire_bytes"] / positions, 1),
            "hidden_payload_bytes": hidden * {"float32": 4, "bfloat16": 2, "float16": 2}[wire],
            "tokens_equal_to_float32": f"{same}/{len(ref)}"}
    return out


def balanced_layers(args: argparse.Namespace) -> str:
    """Two ranges whose compute (layer weights; the head on the last) is closest to equal."""
    layer = 4 * args.hidden * args.hidden + 3 * args.hidden * (args.hidden * 8 // 3)
    head = args.vocab * args.hidden
    k = min(range(1, args.layers),
            key=lambda k: max(k * layer, (args.layers - k) * layer + head))
    return f"0-{k},{k}-{args.layers}"


# -- SmolLM2 ------------------------------------------------------------------------------------

SMOLLM2_GGUF = REPO.parent / "shared" / "models" / "smollm2-135m-instruct" / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"


async def smol_rows(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """2 shards vs local on SmolLM2, per quant mode, in one run (fresh daemons per mode)."""
    folder = tmp / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / SMOLLM2_GGUF.name).symlink_to(SMOLLM2_GGUF)
    make_model(tmp / "models" / "warm", 64, 3, 256)
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)
    ps = prompts(2, args.prompt, 49152)
    rows: dict[str, Any] = {}
    for quant in args.quants.split(","):
        local = Local(folder, args.tokens, quant)
        for attempt in range(3):
            ds = await start_daemons(2, args.threads, tmp / "models", logs)
            try:
                r = await split_phase(ds, local, folder, ps, args.tokens, args.reps, 2,
                                      args.threads, [], {"quant": quant})
                break
            except RemoteError as exc:
                # seen on the shared 2-core box: a peer link replaced while a pinned daemon
                # loads its slice, so the plan's ASSIGN finds the shard "unreachable"
                if attempt == 2 or exc.code != ErrorCode.REFUSED:
                    raise
                print(f"bench: {quant}: {exc}; again on fresh daemons", file=sys.stderr)
            finally:
                for d in ds:
                    d.stop()
        ms, cpu = r["ms_per_token"], r["cpu_ms_per_token"]
        reps = sorted(r["ratio_per_rep"])
        rows[quant] = {"plan": r["plan"], "local_ms_per_token": round(ms["local"], 2),
                       "split_ms_per_token": round(ms["split"], 2),
                       "ratio": round(ms["split"] / ms["local"], 3),
                       "ratio_per_rep": r["ratio_per_rep"],
                       "ratio_spread": [reps[0], reps[-1]],
                       "cpu_ms_per_token": cpu,
                       "cpu_ratio": round(cpu["split"] / cpu["local"], 3),
                       "shard_compute_ms_per_step": r["shard_compute_ms_per_step"],
                       "ids_equal_local": r["ids_equal_local"],
                       "ttft_ms": {k: round(v, 1) for k, v in r["ttft_ms"].items()},
                       "goal_le_1.05x_local": ms["split"] / ms["local"] <= 1.05}
        del local
    return {"model": str(SMOLLM2_GGUF.name), "tokens": args.tokens, "prompt": args.prompt,
            "threads_per_process": args.threads, "pinned": PIN,
            "machine_load_avg_at_end": os.getloadavg(),
            "method": "median gap between consecutive streamed tokens; local runs (pinned "
                      "like shard 0) alternate with split runs; 'ratio_per_rep' is each "
                      "local/split pair's ratio (the spread shows the machine's noise); "
                      "'cpu_ms_per_token' is CPU time (schedstat: every thread of both shard "
                      "daemons, the coordinator's relay included, vs the local thread), "
                      "'split_waiting' the time their threads were runnable but another "
                      "process held the core; 'shard_compute_ms_per_step' is each shard's "
                      "forward time per step (the rest is hops/scheduling)",
            "rows": rows}


# -- main -----------------------------------------------------------------------------------------


async def run_split(args: argparse.Namespace, local: Local, model: Path, ps: list[list[int]],
                    logs: Path) -> dict[str, Any]:
    sessions = [int(x) for x in args.sessions.split(",")]
    out: dict[str, Any] = {}
    # fresh daemons for each memory figure: RSS does not shrink back when a job ends
    for shards in (2, 3):
        ds = await start_daemons(shards, args.threads, model.parent, logs)
        try:
            out[f"{shards}_shards"] = await split_phase(
                ds, local, model, ps, args.tokens, args.reps, shards, args.threads,
                sessions if shards == 2 else [], {})
            if shards == 2:
                out["2_shards_batched"] = await split_phase(
                    ds, local, model, ps, args.tokens, 1, 2, args.threads, sessions,
                    {"batch_decode": True})
                # the LM head makes the last shard the slower one: layers balanced by compute
                out["2_shards_balanced"] = await split_phase(
                    ds, local, model, ps, args.tokens, 1, 2, args.threads, sessions[-1:],
                    {"layers": balanced_layers(args)}, check_ids=False)
                out["wire"] = await wire_phase(ds, model, ps[0], min(args.tokens, 32),
                                               args.hidden)
        finally:
            for d in ds:
                d.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=48, help="tokens generated per session")
    parser.add_argument("--prompt", type=int, default=16, help="prompt length")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per shard")
    parser.add_argument("--sessions", default="1,4,8")
    parser.add_argument("--pin", action="store_true",
                        help="pin each process to its own core(s) (a quiet machine only)")
    parser.add_argument("--smollm2", action="store_true",
                        help="only the SmolLM2-135M rows (needs ../shared)")
    parser.add_argument("--quants", default="none,int4",
                        help="--smollm2: quant modes to compare (none,int8,int4)")
    parser.add_argument("--local-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global PIN
    PIN = args.pin
    if args.local_worker:
        print(json.dumps(local_worker(json.loads(args.local_worker))))
        return
    if args.smollm2:
        tmp = Path(tempfile.mkdtemp(prefix="p2pllm-bench-split-"))
        print(json.dumps({"smollm2": asyncio.run(smol_rows(args, tmp))}, indent=2))
        return

    tmp = Path(tempfile.mkdtemp(prefix="p2pllm-bench-split-"))
    model = make_model(tmp / "models" / "llama", args.hidden, args.layers, args.vocab)
    warm = make_model(tmp / "models" / "warm", 64, 3, 256)
    logs = tmp / "logs"
    logs.mkdir()
    ps = prompts(8, args.prompt, args.vocab)
    sessions = [str(x) for x in args.sessions.split(",")]
    local_mem = run_local_memory({"model": str(model), "warm": str(warm), "prompt": ps[0],
                                  "tokens": args.tokens, "threads": args.threads,
                                  "cores": sorted(cores_for(0, args.threads))})
    local = Local(model, args.tokens)
    split = asyncio.run(run_split(args, local, model, ps, logs))

    s2, s3, sb = split["2_shards"], split["3_shards"], split["2_shards_batched"]

    def ratio(a: float, b: float) -> float:
        return round(a / b, 3)

    lat = {"method": "median gap between consecutive tokens, local runs alternating with "
                     "split runs",
           "2_shards": {"local_ms": round(s2["ms_per_token"]["local"], 3),
                        "split_ms": round(s2["ms_per_token"]["split"], 3),
                        "ratio": ratio(s2["ms_per_token"]["split"], s2["ms_per_token"]["local"])},
           "3_shards": {"local_ms": round(s3["ms_per_token"]["local"], 3),
                        "split_ms": round(s3["ms_per_token"]["split"], 3),
                        "ratio": ratio(s3["ms_per_token"]["split"], s3["ms_per_token"]["local"])},
           "shard_compute_ms_per_step": {"2_shards": s2["shard_compute_ms_per_step"],
                                         "3_shards": s3["shard_compute_ms_per_step"]},
           "ttft_ms": {"local": round(s2["ttft_ms"]["local"], 3),
                       "2_shards": round(s2["ttft_ms"]["split"], 3),
                       "3_shards": round(s3["ttft_ms"]["split"], 3)}}
    top = sessions[-1]
    thr = {n: {"local": round(s2["tokens_per_s"][n]["local"], 2),
               "2_shards": round(s2["tokens_per_s"][n]["split"], 2),
               "ratio": ratio(s2["tokens_per_s"][n]["split"], s2["tokens_per_s"][n]["local"]),
               "local_again": round(sb["tokens_per_s"][n]["local"], 2),
               "2_shards_batched": round(sb["tokens_per_s"][n]["split"], 2),
               "ratio_batched": ratio(sb["tokens_per_s"][n]["split"],
                                      sb["tokens_per_s"][n]["local"])}
           for n in sessions}
    bal = split["2_shards_balanced"]
    thr[top] |= {"layers_balanced": bal["plan"],
                 "local_again_2": round(bal["tokens_per_s"][top]["local"], 2),
                 "2_shards_balanced": round(bal["tokens_per_s"][top]["split"], 2),
                 "ratio_balanced": ratio(bal["tokens_per_s"][top]["split"],
                                         bal["tokens_per_s"][top]["local"])}
    local_bytes = local_mem["params"] * 4
    mem: dict[str, Any] = {"local": {"weight_bytes": local_bytes,
                                     "rss_growth": local_mem["rss"]["growth"],
                                     "rss_peak": local_mem["rss"]["peak"]}}
    for k, phase in (("2_shards", s2), ("3_shards", s3)):
        mem[k] = [{**s, "share_of_local_weights": ratio(s["weight_bytes"], local_bytes),
                   "rss_growth_vs_weights": ratio(s["rss_growth"], s["weight_bytes"])}
                  for s in phase["shards"]]
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "usable_cores": len(os.sched_getaffinity(0)),
                    "load_avg_at_end": os.getloadavg()},
        "model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
                  "params": local_mem["params"], "tokens": args.tokens, "prompt": args.prompt},
        "threads": {"local_latency": args.threads, "local_throughput": 2 * args.threads,
                    "per_shard": args.threads, "pinned": PIN},
        "decode_latency": lat,
        "aggregate_tokens_per_s": thr,
        "wire_bytes_per_token": split["wire"],
        "memory": mem,
        "greedy_ids_equal_local": {"2_shards": s2["ids_equal_local"],
                                   "3_shards": s3["ids_equal_local"],
                                   "2_shards_batched": sb["ids_equal_local"]},
        "plans": {"2_shards": s2["plan"], "3_shards": s3["plan"]},
        "setup_s": {"2_shards": s2["setup_s"], "3_shards": s3["setup_s"]},
        "goals": {
            "2_shard_latency_le_1.15x_local": lat["2_shards"]["ratio"] <= 1.15,
            f"2_shards_beat_local_at_{top}_sessions": thr[top]["ratio"] > 1.0,
            f"2_shards_batched_beat_local_at_{top}_sessions": thr[top]["ratio_batched"] > 1.0,
            f"2_shards_balanced_beat_local_at_{top}_sessions": thr[top]["ratio_balanced"] > 1.0,
            "shard_rss_growth_within_1.15x_its_weights": all(
                s["rss_growth_vs_weights"] <= 1.15 for s in mem["2_shards"] + mem["3_shards"]),
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
