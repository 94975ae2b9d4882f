"""Serving benchmark (issue 13): N concurrent streaming chat clients against p2pllm's
OpenAI-compatible API and llama.cpp's ``llama-server -np N``, on the same GGUF, in one run.

    python bench/serve.py [--clients 1,4,16,64] [--max-tokens 64] [--threads 2]
                          [--gguf PATH] [--quant int4] [--only p2pllm|llamacpp]

Both servers get the same cores (``--cores``, default all) and threads, one at a time. Every
wave sends ``N`` streaming ``/v1/chat/completions`` requests at once (greedy,
``temperature: 0``, ``max_tokens``), client ``i`` asking prompt ``i % len(PROMPTS)``; the
1-client wave runs each prompt once, one after another, and gives each prompt's reference
text. Per server and N the JSON has:

  tokens_per_s      completion tokens of the wave (``usage``) / wall time of the wave
  ttft_ms           p50 / p95 time from sending a request to its first content chunk
  itl_ms            p50 / p95 gap between consecutive content chunks of one stream
  complete          every stream ended with a finish_reason and ``data: [DONE]``
  mismatched        streams whose text differs from the 1-client text of the same prompt
                    (a greedy server batching correctly has 0: nothing lost, cut or mixed)
  speedup_vs_1      tokens_per_s / the 1-client tokens_per_s of the same server

and ``ratio_vs_llamacpp`` per N (ours / llama-server's tokens_per_s). Needs
``../shared/tools/build-llamacpp.sh``'s llama-server (~/.cache/p2pllm-peers/llama.cpp, or
$LLAMACPP_DIR); without it the llama.cpp columns are null.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from p2pllm.lab.daemons import StartedDaemon, free_ports  # noqa: E402

SHARED_GGUF = REPO.parent / "shared" / "models" / "smollm2-135m-instruct" / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a CPU cache is in two sentences.",
    "Give me three tips for learning to cook.",
    "What is the capital of France and why is it famous?",
    "Describe a cat to someone who has never seen one.",
    "List four planets of the solar system.",
    "How do I boil an egg?",
    "Tell me a fun fact about octopuses.",
]


def llamacpp_dir() -> Path:
    return Path(os.environ.get("LLAMACPP_DIR", Path.home() / ".cache/p2pllm-peers/llama.cpp"))


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def one_stream(session: Any, url: str, model: str, prompt: str, max_tokens: int,
                     key: str | None) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    t0 = time.perf_counter()
    times: list[float] = []
    text: list[str] = []
    finish = None
    done = False
    usage = None
    async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
        if r.status != 200:
            return {"error": f"HTTP {r.status}: {(await r.text())[:200]}"}
        buf = b""
        async for chunk in r.content.iter_any():
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if not line.startswith(b"data: "):
                        continue
                    data = line[6:].strip()
                    if data == b"[DONE]":
                        done = True
                        continue
                    obj = json.loads(data)
                    if obj.get("usage"):
                        usage = obj["usage"]
                    for ch in obj.get("choices", []):
                        piece = (ch.get("delta") or {}).get("content")
                        if piece:
                            times.append(time.perf_counter())
                            text.append(piece)
                        if ch.get("finish_reason"):
                            finish = ch["finish_reason"]
    tokens = usage["completion_tokens"] if usage else len(times)
    return {"text": "".join(text), "tokens": tokens, "finish": finish, "done": done,
            "ttft": times[0] - t0 if times else None,
            "itl": [b - a for a, b in itertools.pairwise(times)],
            "usage": usage is not None}


async def wave(url: str, model: str, n: int, max_tokens: int, key: str | None,
               refs: dict[int, str] | None) -> dict[str, Any]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=1800)
    conn = aiohttp.TCPConnector(limit=0, force_close=True)  # llama-server exits on a reused one
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as s:
        t0 = time.perf_counter()
        if n == 1:  # each prompt once, one after another: the reference texts
            results = [await one_stream(s, url, model, p, max_tokens, key) for p in PROMPTS]
        else:
            results = await asyncio.gather(*(one_stream(s, url, model, PROMPTS[i % len(PROMPTS)],
                                                        max_tokens, key) for i in range(n)))
        wall = time.perf_counter() - t0
    errors = [r["error"] for r in results if "error" in r]
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    itl = [x for r in ok for x in r["itl"]]
    texts = {i % len(PROMPTS): r["text"] for i, r in enumerate(results) if "error" not in r}
    mismatched = None
    if refs is not None:
        mismatched = sum(1 for i, r in enumerate(results)
                         if "error" in r or r["text"] != refs.get(i % len(PROMPTS)))
    return {
        "clients": n, "requests": len(results), "errors": errors[:3], "n_errors": len(errors),
        "wall_s": round(wall, 3), "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "ttft_ms": {"p50": _ms(pct(ttft, 0.5)), "p95": _ms(pct(ttft, 0.95))},
        "itl_ms": {"p50": _ms(pct(itl, 0.5)), "p95": _ms(pct(itl, 0.95))},
        "complete": all(r.get("done") and r.get("finish") for r in ok) and not errors,
        "mismatched": mismatched, "_texts": texts,
    }


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 2)


async def wait_http(url: str, proc: subprocess.Popen[Any], timeout: float = 300) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                async with s.get(url + "/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.3)
    raise RuntimeError(f"{url} not healthy after {timeout} s")


async def run_server(name: str, url: str, model: str, clients: list[int], max_tokens: int,
                     key: str | None) -> list[dict[str, Any]]:
    out = []
    refs: dict[int, str] | None = None
    for n in clients:
        w = await wave(url, model, n, max_tokens, key, refs)
        if n == 1:
            refs = w["_texts"]
            w["mismatched"] = 0
        w.pop("_texts")
        w["server"] = name
        out.append(w)
        print(json.dumps({"progress": name, "clients": n, "tokens_per_s": w["tokens_per_s"]}),
              file=sys.stderr, flush=True)
    base = out[0]["tokens_per_s"] if out and out[0]["clients"] == 1 else None
    for w in out:
        w["speedup_vs_1"] = round(w["tokens_per_s"] / base, 2) if base and w["tokens_per_s"] \
            else None
    return out


def bench_p2pllm(args: argparse.Namespace, cores: set[int] | None, log_dir: Path,
                 clients: list[int]) -> list[dict[str, Any]]:
    models = Path(tempfile.mkdtemp(prefix="serve-models-"))
    (models / MODEL_NAME).mkdir()
    (models / MODEL_NAME / Path(args.gguf).name).symlink_to(Path(args.gguf).resolve())
    port = free_ports(1)[0]
    flags = ["--models-dir", str(models), "--api", f"127.0.0.1:{port}",
             "--api-max-pending", str(max(clients) + 8)]
    if args.quant:
        flags += ["--api-quant", args.quant]
    d = StartedDaemon("serve0", args.threads, cores, flags, log_dir)
    try:
        d.wait()
        url = f"http://127.0.0.1:{port}"
        asyncio.run(wait_http(url, d.proc))
        asyncio.run(wave(url, MODEL_NAME, 1, 4, None, None))  # load + warm up
        return asyncio.run(run_server("p2pllm", url, MODEL_NAME, clients, args.max_tokens, None))
    finally:
        d.stop()


def bench_llamacpp(args: argparse.Namespace, cores: set[int] | None, log_dir: Path,
                   clients: list[int]) -> list[dict[str, Any]] | None:
    exe = llamacpp_dir() / "bin" / "llama-server"
    if not exe.exists():
        return None
    out: list[dict[str, Any]] = []
    refs: dict[int, str] | None = None
    for n in clients:
        port = free_ports(1)[0]
        slots = max(n, 1)
        # every slot gets room for a prompt + max_tokens (the context is shared by the slots)
        ctx = slots * (256 + args.max_tokens)
        cmd = [str(exe), "-m", str(args.gguf), "--host", "127.0.0.1", "--port", str(port),
               "-np", str(slots), "-c", str(ctx), "-t", str(args.threads), "-tb",
               str(args.threads), "--no-webui", "-cb", "--jinja"]
        pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
        with open(log_dir / f"llama-server-{n}.log", "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    preexec_fn=pin)
            try:
                url = f"http://127.0.0.1:{port}"
                asyncio.run(wait_http(url, proc))
                asyncio.run(wave(url, MODEL_NAME, 1, 4, None, None))  # warm up
                w = asyncio.run(wave(url, MODEL_NAME, n, args.max_tokens, None, refs))
                if n == 1:
                    refs = w["_texts"]
                    w["mismatched"] = 0
                w.pop("_texts")
                w["server"] = "llama-server"
                out.append(w)
                print(json.dumps({"progress": "llama-server", "clients": n,
                                  "tokens_per_s": w["tokens_per_s"]}), file=sys.stderr,
                      flush=True)
            finally:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
    base = out[0]["tokens_per_s"] if out and out[0]["clients"] == 1 else None
    for w in out:
        w["speedup_vs_1"] = round(w["tokens_per_s"] / base, 2) if base and w["tokens_per_s"] \
            else None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", default="1,4,16,64")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cores", default=None, help="cores both servers run on (default: all)")
    p.add_argument("--gguf", default=str(SHARED_GGUF))
    p.add_argument("--quant", default="int4",
                   help="p2pllm's weights from the GGUF (int4 keeps Q4_1 as stored; none = "
                        "float32); passed as --api-quant")
    p.add_argument("--only", choices=("p2pllm", "llamacpp"), default=None)
    args = p.parse_args()
    clients = sorted({int(c) for c in args.clients.split(",")} | {1})
    cores = {int(c) for c in args.cores.split(",")} if args.cores else None
    if not Path(args.gguf).exists():
        raise SystemExit(f"no GGUF at {args.gguf}")
    log_dir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    ours = [] if args.only == "llamacpp" else bench_p2pllm(args, cores, log_dir, clients)
    theirs = None if args.only == "p2pllm" else bench_llamacpp(args, cores, log_dir, clients)
    ratio = None
    if theirs:
        by_n = {w["clients"]: w["tokens_per_s"] for w in theirs}
        ratio = {str(w["clients"]): round(w["tokens_per_s"] / by_n[w["clients"]], 2)
                 for w in ours if by_n.get(w["clients"]) and w["tokens_per_s"]}
    s16 = next((w["speedup_vs_1"] for w in ours if w["clients"] == 16), None)
    print(json.dumps({
        "model": Path(args.gguf).name, "quant": args.quant, "threads": args.threads,
        "cores": sorted(cores) if cores else sorted(os.sched_getaffinity(0)),
        "max_tokens": args.max_tokens, "load_avg": os.getloadavg(),
        "p2pllm": ours, "llama_server": theirs, "ratio_vs_llamacpp": ratio,
        "goals": {"speedup_16_vs_1": s16, "speedup_16_ge_6": s16 is not None and s16 >= 6,
                  "ge_llamacpp_at_16_64": bool(ratio) and all(
                      ratio.get(k, 0) >= 1 for k in ("16", "64") if str(k) in ratio),
                  "no_loss": all(w["complete"] and not w["mismatched"] for w in ours)},
        "logs": str(log_dir),
    }, indent=1))


if __name__ == "__main__":
    main()
