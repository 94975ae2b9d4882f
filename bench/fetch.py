"""Fetch benchmark (issue 16): a model slice fetched peer to peer vs a plain socket copy of the
same bytes, and a cold 3-shard split job's time to first token with fetch vs pre-placed files.

Prints one JSON object. Side by side in one run, interleaved rep by rep:

- **fetch**: a source daemon holding the model (pinned to one core) and a fetching daemon
  (pinned to another) on loopback; ``WEIGHTS_PULL {model, layers}`` on the fetcher (through its
  ctl connection) fetches the slice's pieces (manifest, WEIGHTS_READ batches, sha256 check,
  pwrite into the sparse cache, journal) -- timed from the request to the final answer, with a
  fresh cache each rep (the entry is deleted between reps; one unmeasured warm-up pull first,
  which builds the source's manifest);
- **plain copy**: an asyncio server (pinned like the source) sending exactly the same byte
  ranges (the pieces ``pieces_for`` names: ``os.pread`` of each), and a client (pinned like
  the fetcher) writing them at their offsets into files created at full size, fsync at the
  end; also the same with a sha256 of every piece (what the fetch verifies);

each both on raw loopback and through the test proxy (tests/weights/proxy.py, its own
process, unpinned) limited to ``--gbit`` Gbit/s per direction (LAN-like), and the fetch plain
and sealed (both daemons given a secret: AES-256-GCM frames; the copy is never sealed).

- **ttft**: three fresh daemons (pinned round-robin), a 3-shard split job on the model: with
  the model in every daemon's models dir (pre-placed) vs only in the first's (the two others
  fetch their slices from it as the job starts); the client's time from the GENERATE request
  to the first streamed token, the job's greedy ids (equal both ways), and the bytes the
  fetching daemons hold on disk afterwards.

    python bench/fetch.py                           # SmolLM2-135M layers 10-20, 3 reps
    python bench/fetch.py --reps 5 --gbit 1 --ttft-reps 2
    python bench/fetch.py --model DIR --layers 0-2 --no-ttft    # another model folder

Needs the model under a models dir (default ../shared/models/smollm2-135m-instruct).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from p2pllm.cli.client import open_daemon  # noqa: E402
from p2pllm.lab.daemons import free_ports  # noqa: E402
from p2pllm.weights.manifest import Manifest, build_manifest  # noqa: E402
from p2pllm.weights.slices import Need, pieces_for, slice_bytes  # noqa: E402
from p2pllm.wire.messages import MsgType  # noqa: E402

DEFAULT_MODEL = REPO.parent / "shared" / "models" / "smollm2-135m-instruct"
PROXY = REPO / "tests" / "weights" / "proxy.py"
CACHE_DIR = "models-cache"  # under a daemon's state dir (p2pllm/daemon/weights.py)


def cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def core(i: int) -> int:
    """The i-th usable core, round-robin: the source side on core(0), the fetcher on core(1)."""
    cs = cores()
    return cs[i % len(cs)]


def pin_self(c: int | None) -> None:
    os.sched_setaffinity(0, {c} if c is not None else set(cores()))


# -- the bytes of a slice -----------------------------------------------------------------------


def parse_layers(text: str, num_layers: int) -> Need:
    a, b = (int(x) for x in text.split("-"))
    return Need((a, b), a == 0, b == num_layers)  # WEIGHTS_PULL's reading of "A-B"


def num_layers(m: Manifest) -> int:
    from p2pllm.weights.slices import tensor_part

    found = [n for t in m.tensor_names() if (n := tensor_part(t)[1]) is not None]
    return max(found) + 1 if found else 0


def slice_ranges(m: Manifest, need: Need) -> list[tuple[int, int, int]]:
    """(file index, offset, length) of every piece the slice needs, in manifest order."""
    return [(m.pieces[i].file, m.pieces[i].offset, m.pieces[i].length) for i in pieces_for(m, need)]


# -- the plain copy -----------------------------------------------------------------------------


def copy_server_main(folder: str, names: list[str], c: int, port_file: str) -> None:
    """A plain asyncio server: reads one request (4-byte length + JSON list of [file, offset,
    length]) and sends those bytes back to back (os.pread each), then waits for the next."""
    pin_self(c)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fds = [os.open(os.path.join(folder, n), os.O_RDONLY) for n in names]
        try:
            while True:
                try:
                    n = struct.unpack("!I", await reader.readexactly(4))[0]
                except asyncio.IncompleteReadError:
                    return
                for f, off, length in json.loads(await reader.readexactly(n)):
                    writer.write(os.pread(fds[f], length, off))
                    await writer.drain()
        finally:
            for fd in fds:
                os.close(fd)
            writer.close()

    async def run() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        Path(port_file).write_text(str(server.sockets[0].getsockname()[1]))
        await asyncio.Event().wait()

    asyncio.run(run())


async def plain_copy(port: int, m: Manifest, ranges: list[tuple[int, int, int]], out: Path,
                     verify: bool) -> float:
    """Seconds to receive the ranges and write them into sparse files under ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    by_range = {(p.file, p.offset): p.sha256 for p in m.pieces} if verify else {}
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 24)
    fds = []
    for name, size in m.files:
        fd = os.open(out / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fd, size)
        fds.append(fd)
    try:
        body = json.dumps(ranges).encode()
        writer.write(struct.pack("!I", len(body)) + body)
        await writer.drain()
        for f, off, length in ranges:
            data = await reader.readexactly(length)
            if verify and hashlib.sha256(data).hexdigest() != by_range[(f, off)]:
                raise RuntimeError(f"plain copy: bytes at {f}:{off} do not match the manifest")
            os.pwrite(fds[f], data, off)
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)
        writer.close()
    return time.perf_counter() - t0


# -- processes ----------------------------------------------------------------------------------


class ProxyProc:
    """tests/weights/proxy.py in its own process (bytes only, no frame parsing)."""

    def __init__(self, upstream: int, rate: float | None) -> None:
        args = [sys.executable, str(PROXY), "--upstream", f"127.0.0.1:{upstream}", "--no-parse"]
        if rate:
            args += ["--rate", str(rate)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"proxy did not start: {line!r}")
        self.port = int(line.split()[1])

    def stop(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=15)
        return json.loads(out.strip().splitlines()[-1]) if out.strip() else {}


class Daemon:
    def __init__(self, name: str, tmp: Path, models: Path, c: int, peers: list[int],
                 secret: Path | None, port: int = 0) -> None:
        self.name = name
        self.state = tmp / f"state-{name}"
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        args = [sys.executable, "-m", "p2pllm.cli.p2pllmd", "--name", name, "--host", "127.0.0.1",
                "--port", str(port), "--no-mdns", "--threads", "1", "--print-port", "--models-dir",
                str(models), "--state-dir", str(self.state), "--log-level", "WARNING"]
        for p in peers:
            args += ["--peer", f"127.0.0.1:{p}"]
        if secret is not None:
            args += ["--secret-file", str(secret)]
        self.secret = str(secret) if secret else None
        self.log = open(tmp / f"{name}.log", "w")  # closed in stop()
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, preexec_fn=lambda: os.sched_setaffinity(0, {c}))
        self.core = c
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("PORT "):
                self.port, self.node_id = int(line.split()[1]), line.split()[3]
                return
        raise RuntimeError(f"daemon {name} did not start: {(tmp / f'{name}.log').read_text()[-2000:]}")

    async def status(self) -> dict[str, Any]:
        conn = await open_daemon(f"127.0.0.1:{self.port}", self.secret)
        try:
            return (await conn.request(MsgType.STATUS, {}, timeout=10)).meta
        finally:
            conn.close()

    async def sees(self, n: int, model: str | None, timeout: float = 60) -> None:
        """Wait until ``n`` peers are up (each listing ``model`` in its caps, unless None)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            snap = await self.status()
            up = [p for p in snap["peers"] if p["state"] == "up"]
            if len(up) >= n and (model is None or all(
                    any(x.get("name") == model for x in p.get("models") or []) for p in up)):
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"{self.name}: peers with {model} not up in {timeout}s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def warm_manifest(port: int, secret: Path | None, model: str) -> None:
    """Ask a source for the model's manifest as a peer would (it builds and caches it)."""
    import uuid

    from p2pllm.cli.client import read_secret
    from p2pllm.net.auth import client_handshake
    from p2pllm.wire.connection import connect
    from p2pllm.wire.frame import Limits

    async def no_requests(conn: Any, req: Any) -> None:
        return None

    conn = await connect("127.0.0.1", port, no_requests, limits=Limits(max_payload=1 << 30),
                         name="bench", timeout=10)
    try:
        await client_handshake(conn, node_id=f"bench-{uuid.uuid4().hex[:12]}", name="bench",
                               kind="peer", port=0, secret=read_secret(str(secret) if secret else None))
        await conn.request(MsgType.WEIGHTS_MANIFEST, {"model": model}, timeout=300)
    finally:
        conn.close()


async def pull(d: Daemon, model: str, layers: str | None) -> tuple[float, dict[str, Any]]:
    """(seconds from the WEIGHTS_PULL request to its final answer, the final answer)."""
    conn = await open_daemon(f"127.0.0.1:{d.port}", d.secret)
    meta: dict[str, Any] = {"model": model}
    if layers:
        meta["layers"] = layers
    try:
        t0 = time.perf_counter()
        async for frame in conn.stream(MsgType.WEIGHTS_PULL, meta, idle_timeout=600):
            if not frame.is_partial:
                return time.perf_counter() - t0, frame.meta
    finally:
        conn.close()
    raise RuntimeError("WEIGHTS_PULL ended without an answer")


# -- throughput ---------------------------------------------------------------------------------


def mbps(nbytes: int, seconds: list[float]) -> float:
    return round(nbytes / statistics.median(seconds) / 1e6, 1)


async def throughput(args: argparse.Namespace, tmp: Path, m: Manifest,
                     ranges: list[tuple[int, int, int]], total: int) -> dict[str, Any]:
    folder = Path(args.model)
    name = folder.name
    secret = tmp / "secret"
    secret.write_text(os.urandom(24).hex())
    secret.chmod(0o600)
    port_file = tmp / "copy-port"
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    server = ctx.Process(target=copy_server_main, daemon=True,
                         args=(str(folder), [f for f, _ in m.files], core(0), str(port_file)))
    server.start()
    rate = args.gbit * 1e9 / 8 if args.gbit else None
    out: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline:
                raise RuntimeError("copy server did not start")
            await asyncio.sleep(0.05)
        copy_port = int(port_file.read_text())
        for link in ("loopback", f"proxy_{args.gbit}gbit"):
            copy_proxy = ProxyProc(copy_port, rate) if link != "loopback" else None
            row: dict[str, Any] = {}
            times: dict[str, list[float]] = {"plain_copy": [], "plain_copy_sha256": []}
            for transport in ("plain", "sealed"):
                key = f"fetch_{transport}"
                sec = secret if transport == "sealed" else None
                src = Daemon(f"src-{link}-{transport}", tmp, folder.parent, core(0), [], sec)
                proxy = ProxyProc(src.port, rate) if link != "loopback" else None
                times[key] = []
                replies = []
                try:
                    await warm_manifest(src.port, sec, name)  # the source hashes the model once
                    for rep in range(args.reps):
                        pin_self(core(1))  # the baselines beside each fetch, on its core
                        port = copy_proxy.port if copy_proxy else copy_port
                        times["plain_copy"].append(
                            await plain_copy(port, m, ranges, tmp / "copy", verify=False))
                        times["plain_copy_sha256"].append(
                            await plain_copy(port, m, ranges, tmp / "copy", verify=True))
                        pin_self(None)
                        # a fresh fetching daemon each rep: an empty cache (a daemon keeps its
                        # open cache entries in memory, so deleting the folder is not enough)
                        dst = Daemon(f"dst-{link}-{transport}-{rep}", tmp, tmp / "empty", core(1),
                                     [proxy.port if proxy else src.port], sec)
                        try:
                            await dst.sees(1, name)
                            seconds, reply = await pull(dst, name, args.layers)
                        finally:
                            dst.stop()
                        if reply["bytes"] != total:
                            raise RuntimeError(f"the pull fetched {reply['bytes']} bytes, the plain "
                                               f"copy sends {total}: not the same byte set")
                        times[key].append(seconds)
                        replies.append(reply)
                        if transport == "plain" and args.small:
                            # the same pull of one layer on another fresh daemon: what a pull
                            # costs besides moving bytes shows in the difference
                            small = Daemon(f"one-{link}-{rep}", tmp, tmp / "empty", core(1),
                                           [proxy.port if proxy else src.port], None)
                            try:
                                await small.sees(1, name)
                                t_small, r_small = await pull(small, name, args.small)
                            finally:
                                small.stop()
                            times.setdefault("fetch_plain_small", []).append(t_small)
                            row["small_bytes"] = r_small["bytes"]
                    row[f"{key}_disk_bytes"] = replies[-1]["disk_bytes"]
                    row[f"{key}_daemon_seconds"] = [round(r["seconds"], 4) for r in replies]
                finally:
                    if proxy:
                        proxy.stop()
                    src.stop()
            if copy_proxy:
                copy_proxy.stop()
            small = times.pop("fetch_plain_small", None)
            row["MBps"] = {k: mbps(total, v) for k, v in times.items()}
            row["MBps_best"] = {k: round(total / min(v) / 1e6, 1) for k, v in times.items()}
            row["seconds"] = {k: [round(x, 4) for x in v] for k, v in times.items()}
            b = row["MBps"]
            row["ratio_fetch_plain_over_plain_copy"] = round(b["fetch_plain"] / b["plain_copy"], 3)
            row["ratio_fetch_sealed_over_plain_copy"] = round(b["fetch_sealed"] / b["plain_copy"], 3)
            row["ratio_fetch_plain_over_copy_sha256"] = round(b["fetch_plain"] / b["plain_copy_sha256"], 3)
            row["goal_fetch_ge_80pct_of_plain_copy"] = b["fetch_plain"] >= 0.8 * b["plain_copy"]
            if small:
                t_big, t_small = statistics.median(times["fetch_plain"]), statistics.median(small)
                small_bytes = row.pop("small_bytes")
                row["fetch_plain_small"] = {
                    "layers": args.small, "bytes": small_bytes,
                    "seconds": [round(x, 4) for x in small], "median_s": round(t_small, 4),
                    # from two measured medians: the slice's extra bytes over its extra time
                    "marginal_MBps": (round((total - small_bytes) / (t_big - t_small) / 1e6, 1)
                                      if t_big > t_small else None)}
            out[link] = row
    finally:
        pin_self(None)
        server.terminate()
    return out


# -- time to first token ------------------------------------------------------------------------



async def split_ttft(args: argparse.Namespace, tmp: Path, m: Manifest, fetch: bool,
                     rep: int) -> dict[str, Any]:
    """One cold 3-shard split job on three fresh daemons; with ``fetch`` only the first has the
    model in its models dir (the others fetch their slices as the job starts)."""
    folder = Path(args.model)
    name = folder.name
    ports = free_ports(3)
    ds: list[Daemon] = []
    try:
        for i, port in enumerate(ports):
            models = folder.parent if (i == 0 or not fetch) else tmp / "empty"
            # each dials only those started before it: no two dial each other, so no link
            # is replaced by the other side's (a mutual dial once failed an ASSIGN sent over
            # the connection being replaced: "unreachable: ... replaced by a newer connection")
            ds.append(Daemon(f"ttft-{'fetch' if fetch else 'placed'}{rep}-{i}", tmp, models, core(i),
                             ports[:i], None, port=port))
        for d in ds:
            await d.sees(2, None)
        conn = await open_daemon(f"127.0.0.1:{ds[0].port}")
        meta = {"mode": "split", "model": name, "prompt_ids": args.prompt_ids,
                "max_tokens": args.tokens, "shards": 3, "keep_alive": 0}
        first: float | None = None
        result: dict[str, Any] = {}
        try:
            t0 = time.perf_counter()
            async for frame in conn.stream(MsgType.GENERATE, meta, idle_timeout=900):
                if frame.is_partial and first is None:
                    first = time.perf_counter() - t0
                if not frame.is_partial:
                    result = frame.meta
        finally:
            conn.close()
        plan = [s.get("layers") for s in result.get("shards", [])]
        by_node = {s.get("node_id"): s.get("layers") for s in result.get("shards", [])}
        disk: dict[str, Any] = {}
        for d in ds[1:]:
            entry = d.state / CACHE_DIR / name
            held = sum(f.stat().st_blocks * 512 for f in entry.rglob("*") if f.is_file()) \
                if entry.exists() else 0
            layers = by_node.get(d.node_id)
            # what its slice needs (pieces_for), to compare with what it holds on disk
            need = (slice_bytes(m, Need.for_layers(layers[0], layers[1], num_layers(m)))
                    if layers else None)
            disk[d.name] = {"layers": layers, "disk_bytes": held, "slice_bytes": need}
        return {"ttft_s": round(first, 3) if first is not None else None,
                "setup_s": result.get("setup_s"), "token_ids": result.get("token_ids"),
                "plan": plan, "cache": disk}
    finally:
        for d in ds:
            d.stop()


async def ttft(args: argparse.Namespace, tmp: Path, m: Manifest) -> dict[str, Any]:
    rows: dict[str, list[dict[str, Any]]] = {"pre_placed": [], "fetch": []}
    for rep in range(args.ttft_reps):
        for fetch in (False, True):
            try:
                rows["fetch" if fetch else "pre_placed"].append(await split_ttft(args, tmp, m, fetch, rep))
            except Exception as exc:  # a failed job is a figure too: say why
                rows["fetch" if fetch else "pre_placed"].append({"error": f"{type(exc).__name__}: {exc}"})
    out: dict[str, Any] = {"rows": rows, "whole_model_bytes": m.file_bytes}
    ok = {k: [r["ttft_s"] for r in v if r.get("ttft_s") is not None] for k, v in rows.items()}
    if ok["pre_placed"] and ok["fetch"]:
        out["ttft_s_median"] = {k: statistics.median(v) for k, v in ok.items()}
        out["ttft_fetch_over_pre_placed"] = round(statistics.median(ok["fetch"])
                                                  / statistics.median(ok["pre_placed"]), 3)
        ids = {json.dumps(r["token_ids"]) for v in rows.values() for r in v if "token_ids" in r}
        out["greedy_ids_equal"] = len(ids) == 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="a model folder inside a models dir")
    ap.add_argument("--layers", default="10-20", help="the slice: layers A-B ([A, B))")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--small", default="10-11", help="also pull this slice (plain; '' : no) to "
                    "see the fixed cost of a pull: the main slice's extra bytes over its extra time")
    ap.add_argument("--gbit", type=float, default=1.0, help="the proxy's limit, Gbit/s per direction")
    ap.add_argument("--no-ttft", action="store_true", help="skip the split-job TTFT phase")
    ap.add_argument("--no-throughput", action="store_true", help="skip the throughput phase")
    ap.add_argument("--ttft-reps", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=4, help="tokens the split job generates")
    args = ap.parse_args()
    args.prompt_ids = [1, 504, 3458, 28, 2683, 314, 253]
    folder = Path(args.model)
    if not folder.is_dir():
        sys.exit(f"no model folder at {folder} (the shared checkout?)")
    tmp = Path(tempfile.mkdtemp(prefix="p2pllm-bench-fetch-"))
    (tmp / "empty").mkdir()
    m = build_manifest(folder, folder.name)
    need = parse_layers(args.layers, num_layers(m))
    ranges = slice_ranges(m, need)
    total = sum(r[2] for r in ranges)
    result: dict[str, Any] = {
        "bench": "fetch", "model": folder.name, "layers": args.layers, "slice_bytes": total,
        "model_bytes": m.file_bytes, "pieces": len(ranges), "reps": args.reps,
        "usable_cores": len(cores()), "pinning": "source and copy server on core(0), fetcher and "
        "copy client on core(1) (sched_setaffinity, as taskset); proxies unpinned",
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
    }
    try:
        if not args.no_throughput:
            result["throughput"] = asyncio.run(throughput(args, tmp, m, ranges, total))
        if not args.no_ttft:
            result["ttft"] = asyncio.run(ttft(args, tmp, m))
    finally:
        result["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
