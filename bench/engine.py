"""Engine benchmark: decode and prefill tokens/s, ours vs transformers, and the memory limit.

    python bench/engine.py [--quick] [--threads 1,2] [--dtypes float32,bfloat16] [--models ...]

Prints one JSON object:
  machine        cpu, torch/transformers versions
  bandwidth_gbs  measured memory read bandwidth per thread count (sum over a buffer 4x L3)
  runs           per model x dtype x threads: tokens/s of our engine, transformers
                 generate() and a manual past_key_values loop (decode, and prefill of a
                 64-token prompt), weight bytes read per decoded token, the bandwidth limit
                 (bandwidth / bytes per token) and our share of it
  targets        the issue's targets, each with the figures it was judged on and "met"
  rss            peak RSS of loading the 110M model whole vs slices of it (fresh processes)
  smollm2        (``--models smollm2-135m``) SmolLM2-135M-Instruct from its GGUF files: per
                 weight format (f32, bf16, int8 = Q8_0 file, int4 = Q4_1 file) x threads,
                 decode and prefill tokens/s of our engine (``load_slice(gguf, dtype=,
                 quant=)``), the same without its native kernels (``ours_torch_kernels``:
                 P2PLLM_NATIVE=0, torch's own kernels), transformers (its GGUF load, float
                 only) and llama.cpp's
                 llama-bench on the same file, ratios ours/llama.cpp, and peak RSS of each
                 (fresh process per row); medians of rounds. Needs ../shared/tools/build-llamacpp.sh's output
                 (~/.cache/p2pllm-peers/llama.cpp, or $LLAMACPP_DIR); llama.cpp columns are
                 null without it.

Every figure is the best of ``--repeats`` runs, interleaved across implementations, because
this machine is shared (the SmolLM2 rows: medians of ``--repeats`` rounds, see bench_smollm2). Models: ../shared/models/{tinystories-656k,stories-260k} (skipped
when absent) and a random-initialised ~110M Llama (hidden 768, 12 layers, 12 heads,
intermediate 2048, vocab 32000) saved to a temp dir.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
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

from p2pllm.engine.generate import generate_ids  # noqa: E402
from p2pllm.engine.loader import load_slice  # noqa: E402
from p2pllm.engine.model import ModelSlice  # noqa: E402
from p2pllm.wire.tensors import torch_dtype  # noqa: E402

SHARED = REPO.parent / "shared" / "models"
LLAMACPP = Path(os.environ.get("LLAMACPP_DIR") or Path.home() / ".cache/p2pllm-peers/llama.cpp")
SMOLLM2_Q4 = SHARED / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
# weight format -> (llama.cpp's file suffix, our dtype, our quant)
SMOLLM2_FORMATS = {"f32": ("f32", "float32", "none"), "bf16": ("bf16", "bfloat16", "none"),
                   "int8": ("q8_0", "float32", "int8"), "int4": ("q4_1", "float32", "int4")}
PROMPT_LEN = 64
DTYPES = {name: torch_dtype(name) for name in ("float32", "bfloat16")}  # the rows benched


# -- the machine ----------------------------------------------------------------------------


def l3_bytes() -> int:
    try:
        out = subprocess.run(["lscpu", "-B"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("L3 cache:"):
                return int(line.split(":")[1].split()[0])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        pass
    return 64 << 20


def read_bandwidth(threads: int, repeats: int) -> float:
    """GB/s of summing a float32 buffer four times the L3 size (at least 1 GiB)."""
    torch.set_num_threads(threads)
    n = max(4 * l3_bytes(), 1 << 30) // 4
    buf = torch.ones(n, dtype=torch.float32)
    buf.sum()
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        best = max(best, n * 4 / (time.perf_counter() - t) / 1e9)
    del buf
    return best


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


# -- models -------------------------------------------------------------------------------


def make_110m(root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = root / "llama-110m"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                      num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                      max_position_embeddings=2048)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def weight_bytes_per_token(model: ModelSlice) -> int:
    """Bytes of weights one decode step reads: everything but the embedding table (one row),
    a tied head counted as the head."""
    total = 0
    for key, p, rows in model._hf_params():
        if key == "model.embed_tokens.weight" and not model.config.tie_word_embeddings:
            continue
        n = p.numel() if rows is None else (rows[1] - rows[0]) * (p.numel() // p.shape[0])
        total += n * p.element_size()
    seen: set[int] = set()
    for _, m in model.named_modules():
        qw = getattr(m, "qweight", None)
        if qw is not None and id(qw) not in seen:  # QuantLinear (fused groups share one)
            seen.add(id(qw))
            total += qw.nbytes()
    if model.config.tie_word_embeddings and model.lm_head is not None and hasattr(
            model.lm_head, "qweight"):  # the float embedding was counted as the head above
        emb = model.embed_tokens
        total -= 0 if emb is None else emb.weight.numel() * emb.weight.element_size()
    return total


# -- timing -------------------------------------------------------------------------------


@contextlib.contextmanager
def torch_kernels() -> Any:
    """Load and run without the native kernels (P2PLLM_NATIVE=0: oneDNN-packed float
    weights, torch's int8/int4 kernels, the lean torch decode layer): the side row."""
    old = os.environ.get("P2PLLM_NATIVE")
    os.environ["P2PLLM_NATIVE"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("P2PLLM_NATIVE")
        else:
            os.environ["P2PLLM_NATIVE"] = old


def time_ours(model: ModelSlice, prompt: list[int], n: int) -> tuple[float, float]:
    r = generate_ids(model, prompt, max_tokens=n, stop_ids=[])
    return r.tokens_per_s, len(prompt) / r.prefill_s


def time_hf_generate(hf: Any, ids: torch.Tensor, n: int) -> float:
    """Decode tokens/s of generate(): (n - 1) tokens / (time for n - time for 1)."""
    kw = {"do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        tn = time.perf_counter() - t
    return (n - 1) / max(tn - t1, 1e-9)


def time_hf_manual(hf: Any, ids: torch.Tensor, n: int) -> tuple[float, float]:
    """(decode tokens/s, prefill tokens/s) of a hand-written past_key_values loop."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = hf(ids, use_cache=True)
        pkv = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        for _ in range(n - 1):
            out = hf(nxt, past_key_values=pkv, use_cache=True)
            pkv = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t2 = time.perf_counter()
    return (n - 1) / (t2 - t1), ids.shape[1] / (t1 - t0)


def bench_model(name: str, path: Path, dtype_name: str, threads: list[int], n: int,
                repeats: int, bandwidth: dict[int, float]) -> list[dict[str, Any]]:
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[dtype_name]
    ours = load_slice(path, dtype=dtype)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    vocab = ours.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (PROMPT_LEN,), generator=g).tolist()
    ids = torch.tensor([prompt])
    nbytes = weight_bytes_per_token(ours)
    rows = []
    for th in threads:
        torch.set_num_threads(th)
        time_ours(ours, prompt, 4)  # warm up (rope tables, oneDNN primitives)
        time_hf_manual(hf, ids, 4)
        best: dict[str, float] = {}
        for _ in range(repeats):
            for key, value in (
                    (("ours_decode", "ours_prefill"), time_ours(ours, prompt, n)),
                    (("hf_manual_decode", "hf_manual_prefill"), time_hf_manual(hf, ids, n)),
                    (("hf_generate_decode",), (time_hf_generate(hf, ids, n),))):
                for k, v in zip(key, value, strict=True):
                    best[k] = max(best.get(k, 0.0), v)
        limit = bandwidth[th] * 1e9 / nbytes
        rows.append({
            "model": name, "dtype": dtype_name, "threads": th, "params": ours.num_parameters(),
            "decode_tokens": n, "prompt_tokens": PROMPT_LEN,
            "decode_tok_s": {"ours": round(best["ours_decode"], 1),
                             "hf_generate": round(best["hf_generate_decode"], 1),
                             "hf_manual": round(best["hf_manual_decode"], 1)},
            "prefill_tok_s": {"ours": round(best["ours_prefill"], 1),
                              "hf_manual": round(best["hf_manual_prefill"], 1)},
            "speedup_vs_hf_generate": round(best["ours_decode"] / best["hf_generate_decode"], 2),
            "speedup_vs_hf_manual": round(best["ours_decode"] / best["hf_manual_decode"], 2),
            "weight_bytes_per_token": nbytes,
            "bandwidth_limit_tok_s": round(limit, 1),
            "ours_share_of_limit": round(best["ours_decode"] / limit, 3),
            "hf_manual_share_of_limit": round(best["hf_manual_decode"] / limit, 3),
        })
        print(f"# {name} {dtype_name} threads={th}: {rows[-1]['decode_tok_s']} "
              f"limit {limit:.1f}", file=sys.stderr, flush=True)
    return rows


# -- peak RSS of loading ------------------------------------------------------------------

_RSS_SNIPPET = r"""
import sys, json
import torch
sys.path.insert(0, {repo!r})
from p2pllm.engine.loader import load_slice
def peak():  # VmHWM: peak RSS of this address space (ru_maxrss would include the parent's)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
import safetensors
from p2pllm.engine.config import ModelConfig
from p2pllm.engine.model import ModelSlice
tiny = ModelConfig.from_dict({{"model_type": "llama", "vocab_size": 8, "hidden_size": 8,
                              "intermediate_size": 8, "num_hidden_layers": 1,
                              "num_attention_heads": 2}})
with torch.device("meta"):  # one-time lazy imports of torch's meta-device support (~70 MB)
    ModelSlice(tiny)
base = peak()
m = load_slice({path!r}, layers={layers!r}, dtype=getattr(torch, {dtype!r}))
loaded = peak()
with torch.inference_mode():  # one token through the slice touches every weight
    x = torch.tensor([[5]]) if m.has_embed else torch.zeros(1, 1, m.config.hidden_size)
    m(x, torch.tensor([[0]]), m.new_cache(1, 8))
ran = peak()
nbytes = sum(p.numel() * p.element_size() for p in m.parameters())
print(json.dumps({{"param_mb": round(nbytes / 2**20, 1), "load_peak_rss_mb": round(loaded - base, 1),
                  "after_first_token_peak_rss_mb": round(ran - base, 1)}}))
"""


def rss(path: Path, layers: tuple[int, int] | None, dtype: str) -> dict[str, Any]:
    code = _RSS_SNIPPET.format(repo=str(REPO), layers=layers, path=str(path), dtype=dtype)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- SmolLM2 from GGUF, side by side with transformers and llama.cpp ---------------------

_SMOL_RSS = r"""
import sys, json, torch
sys.path.insert(0, {repo!r})
torch.set_num_threads(1)
from p2pllm.engine.loader import load_slice
def peak():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
base = peak()
m = load_slice({path!r}, dtype=getattr(torch, {dtype!r}), quant={quant!r})
with torch.inference_mode():
    m(torch.tensor([[5] * 64]), torch.arange(64)[None], m.new_cache(1, 128))
print(json.dumps({{"peak_rss_mb": round(peak(), 1), "after_imports_mb": round(base, 1)}}))
"""


def smol_file(fmt: str) -> Path | None:
    """The GGUF of one weight format: llama.cpp's converted copies, else (q4_1) the shared
    original."""
    suffix = SMOLLM2_FORMATS[fmt][0]
    f = LLAMACPP / "models" / f"smollm2-135m-instruct-{suffix}.gguf"
    if f.is_file():
        return f
    return SMOLLM2_Q4 if fmt == "int4" and SMOLLM2_Q4.is_file() else None


def llama_bench(gguf: Path, threads: int, n: int, prompt: int, reps: int
                ) -> tuple[dict[str, float] | None, float | None]:
    """({"decode": tg tokens/s, "prefill": pp tokens/s}, peak RSS MB) of llama-bench."""
    exe = LLAMACPP / "bin" / "llama-bench"
    if not exe.is_file():
        return None, None
    cmd = [str(exe), "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(n),
           "-r", str(reps), "-o", "json"]
    env = dict(os.environ, LD_LIBRARY_PATH=str(LLAMACPP / "bin"))
    hwm = 0  # VmHWM polled while it runs: ru_maxrss would carry this big process's own peak
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL, env=env)
        while proc.poll() is None:
            with contextlib.suppress(OSError, StopIteration, ValueError):
                with open(f"/proc/{proc.pid}/status") as f:
                    hwm = max(hwm, next(int(line.split()[1]) for line in f
                                        if line.startswith("VmHWM")))
            time.sleep(0.02)
        out.seek(0)
        text = out.read().decode()
    if proc.returncode != 0:
        print(f"# llama-bench failed ({proc.returncode}): {' '.join(cmd)}", file=sys.stderr)
        return None, None
    res: dict[str, float] = {}
    for row in json.loads(text):
        key = "decode" if row.get("n_gen", 0) > 0 else "prefill"
        res[key] = round(float(row["avg_ts"]), 1)
    return res, round(hwm / 1024, 1)


def smol_rss(path: Path, dtype: str, quant: str) -> float | None:
    code = _SMOL_RSS.format(repo=str(REPO), path=str(path), dtype=dtype, quant=quant)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    if out.returncode != 0:
        print(f"# rss run failed: {out.stderr[-500:]}", file=sys.stderr)
        return None
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def bench_smollm2(formats: list[str], threads: list[int], n: int, repeats: int,
                  with_rss: bool, with_hf: bool) -> dict[str, Any]:
    """Rows per format x threads: ``repeats`` rounds, each timing every implementation once
    (ours, transformers, llama-bench -r 1) one after the other; figures are the medians of
    the rounds and the ratios the medians of the rounds' ratios (the machine is shared)."""
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 49152, (PROMPT_LEN,), generator=g).tolist()
    ids = torch.tensor([prompt])
    rows: list[dict[str, Any]] = []
    for fmt in formats:
        f = smol_file(fmt)
        if f is None:
            print(f"# smollm2 {fmt}: no GGUF file, skipped", file=sys.stderr)
            continue
        _, dtype, quant = SMOLLM2_FORMATS[fmt]
        src = f
        ours = load_slice(src, dtype=DTYPES[dtype] if quant == "none" else torch.float32,
                          quant=quant)
        with torch_kernels():  # the engine without its native kernels (torch's own)
            plain = load_slice(src, dtype=DTYPES[dtype] if quant == "none" else torch.float32,
                               quant=quant)
        hf = None
        if with_hf and quant == "none":
            hf = AutoModelForCausalLM.from_pretrained(
                str(SMOLLM2_Q4.parent), gguf_file=SMOLLM2_Q4.name, dtype=torch.float32)
            hf = hf.to(DTYPES[dtype]).eval()
        nbytes = weight_bytes_per_token(ours)
        for th in threads:
            torch.set_num_threads(th)
            time_ours(ours, prompt, 4)
            # round by round, every implementation once per round (llama-bench -r 1 after
            # its own warm-up run), so each round's ratio compares the same machine state
            rounds: dict[str, list[float]] = {}
            for _ in range(repeats):
                timed = [("ours", time_ours(ours, prompt, n))]
                with torch_kernels():
                    timed.append(("ours_torch_kernels", time_ours(plain, prompt, n)))
                if hf is not None:
                    timed.append(("hf", time_hf_manual(hf, ids, n)))
                lc_round, lc_rss = llama_bench(f, th, n, PROMPT_LEN, 1)
                if lc_round is not None and "decode" in lc_round and "prefill" in lc_round:
                    timed.append(("llama_cpp", (lc_round["decode"], lc_round["prefill"])))
                for key, (dec_s, pre_s) in timed:
                    rounds.setdefault(key + "_decode", []).append(dec_s)
                    rounds.setdefault(key + "_prefill", []).append(pre_s)
            dec = {k.removesuffix("_decode"): round(statistics.median(v), 1)
                   for k, v in rounds.items() if k.endswith("_decode")}
            pre = {k.removesuffix("_prefill"): round(statistics.median(v), 1)
                   for k, v in rounds.items() if k.endswith("_prefill")}
            row: dict[str, Any] = {
                "format": fmt, "gguf": f.name, "ours_load": {"dtype": str(ours.dtype).removeprefix(
                    "torch."), "quant": quant}, "threads": th,
                "decode_tokens": n, "prompt_tokens": PROMPT_LEN, "rounds": repeats,
                "decode_tok_s": dec, "prefill_tok_s": pre,
                "decode_tok_s_rounds": {k.removesuffix("_decode"): [round(x, 1) for x in v]
                                        for k, v in rounds.items() if k.endswith("_decode")},
                "weight_bytes_per_token": nbytes,
                "llama_cpp_peak_rss_mb": lc_rss if "llama_cpp_decode" in rounds else None,
            }
            lc_dec = rounds.get("llama_cpp_decode")
            if lc_dec:
                for key, name in (("ours", "decode_ratio_vs_llama_cpp"),
                                  ("ours_torch_kernels", "decode_ratio_torch_kernels_vs_llama_cpp")):
                    if key + "_decode" in rounds:  # median of the rounds' ratios
                        row[name] = round(statistics.median(
                            a / b for a, b in zip(rounds[key + "_decode"], lc_dec, strict=True)), 2)
                row["prefill_ratio_vs_llama_cpp"] = round(statistics.median(
                    a / b for a, b in zip(rounds["ours_prefill"], rounds["llama_cpp_prefill"],
                                          strict=True)), 2)
            rows.append(row)
            print(f"# smollm2 {json.dumps(row)}", file=sys.stderr, flush=True)
        if with_rss:
            peak = smol_rss(src, dtype if quant == "none" else "float32", quant)
            for r in rows:
                if r["format"] == fmt:
                    r["ours_peak_rss_mb"] = peak
            print(f"# smollm2 {fmt} ours peak RSS {peak} MB", file=sys.stderr, flush=True)
        del ours, plain, hf
    return {"command_note": "ours: generate_ids on a 64-token random prompt, decode = "
                            "(n-1)/time after the first token; transformers: manual "
                            "past_key_values loop on its GGUF (dequantized) load; llama.cpp: "
                            "llama-bench -p 64 -n N -r 1 per round (tg from an empty context); "
                            "medians of the rounds; peak RSS: "
                            "VmHWM of a fresh process (ours, 1 thread, load + 64-token "
                            "prefill; absolute, imports included) and llama-bench's VmHWM "
                            "(polled every 20 ms while it runs)",
            "llama_cpp": str(LLAMACPP), "rows": rows}


# -- main ---------------------------------------------------------------------------------


def targets(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in runs:
        if r["model"] != "llama-110m" and r["dtype"] == "float32":
            best_hf = max(r["decode_tok_s"]["hf_generate"], r["decode_tok_s"]["hf_manual"])
            ratio = r["decode_tok_s"]["ours"] / best_hf
            out.append({"target": ">= 2x transformers decode tok/s (the faster of generate() "
                                  "and the manual loop)",
                        "model": r["model"], "threads": r["threads"], "ratio": round(ratio, 2),
                        "met": ratio >= 2.0})
        if r["model"] == "llama-110m":
            out.append({"target": ">= 85% of the bandwidth limit", "model": r["model"],
                        "dtype": r["dtype"], "threads": r["threads"],
                        "share": r["ours_share_of_limit"], "met": r["ours_share_of_limit"] >= 0.85})
    by = {(r["dtype"], r["threads"]): r for r in runs if r["model"] == "llama-110m"}
    for th in sorted({t for _, t in by}):
        f32, b16 = by.get(("float32", th)), by.get(("bfloat16", th))
        if f32 and b16:
            speed = b16["decode_tok_s"]["ours"] / f32["decode_tok_s"]["ours"]
            out.append({"target": "bfloat16 halves the bytes per token (and so ~2x decode)",
                        "threads": th,
                        "bytes_ratio": round(b16["weight_bytes_per_token"]
                                             / f32["weight_bytes_per_token"], 3),
                        "decode_speedup": round(speed, 2), "met": speed >= 1.7})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer tokens, one repeat")
    ap.add_argument("--models", default="tinystories-656k,stories-260k,llama-110m",
                    help="which of the models to run (default the first three; also "
                         "smollm2-135m)")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS measurements")
    ap.add_argument("--formats", default="f32,bf16,int8,int4",
                    help="SmolLM2 weight formats (with --models smollm2-135m)")
    ap.add_argument("--smol-tokens", type=int, default=32, help="SmolLM2 decode tokens")
    ap.add_argument("--no-hf", action="store_true", help="SmolLM2: skip transformers")
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    dtypes = args.dtypes.split(",")
    repeats = 1 if args.quick else args.repeats
    start = time.time()
    bandwidth = {th: round(read_bandwidth(th, 5), 2) for th in threads}
    result: dict[str, Any] = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "torch": torch.__version__,
                    "transformers": __import__("transformers").__version__},
        "bandwidth_gbs": bandwidth, "load_average_start": os.getloadavg(), "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        wanted = args.models.split(",")
        models: list[tuple[str, Path, int]] = []
        for name in ("tinystories-656k", "stories-260k"):
            if name in wanted and (SHARED / name / "config.json").is_file():
                models.append((name, (SHARED / name).resolve(), 64 if args.quick else 128))
        big = make_110m(Path(tmp)) if "llama-110m" in wanted else None
        if big is not None:
            models.append(("llama-110m", big, 16 if args.quick else 48))
        for name, path, n in models:
            for dt in dtypes:
                result["runs"] += bench_model(name, path, dt, threads, n, repeats, bandwidth)
        if "smollm2-135m" in wanted:
            result["smollm2"] = bench_smollm2(args.formats.split(","), threads,
                                              16 if args.quick else args.smol_tokens, repeats,
                                              not args.no_rss, not args.no_hf)
        # bandwidth again at the end: the machine is shared, report both
        result["bandwidth_gbs_after"] = {th: round(read_bandwidth(th, 5), 2) for th in threads}
        if big is not None and not args.no_rss:
            result["rss"] = {
                "command": "fresh python process per row: load_slice(path, layers=..., dtype=...),"
                           " then one token through it; peak RSS (VmHWM) minus the peak after "
                           "imports",
                "whole_float32": rss(big, None, "float32"),
                "layers_0_6_float32": rss(big, (0, 6), "float32"),
                "layers_6_12_float32": rss(big, (6, 12), "float32"),
                "layers_3_6_float32": rss(big, (3, 6), "float32"),
                "whole_bfloat16": rss(big, None, "bfloat16"),
                "layers_0_6_bfloat16": rss(big, (0, 6), "bfloat16"),
            }
    result["load_average_end"] = os.getloadavg()
    result["targets"] = targets(result["runs"])
    result["seconds"] = round(time.time() - start, 1)
    result["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
