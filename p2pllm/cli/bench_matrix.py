"""`p2pllm bench matrix`: a grid of modes x context x batch, run through real daemons.

Every cell is GENERATE requests to a daemon, as `p2pllm generate --mode spec|split` sends them
(:mod:`p2pllm.cli.remote`): "batch" requests at once, each with a prompt of "context" token ids
and ``--new-tokens`` to generate (greedy). Per cell: tokens/s (all sessions' generated tokens
over the wall time from the first submit to the last final response), time to first token
(median over the sessions, measured here: submit to the first streamed token; the daemons'
own figure rides along as daemon_ttft_s), and the daemons' peak RSS (each daemon's VmHWM,
reset through /proc/PID/clear_refs when the cell starts, summed over the daemons).

Modes: ``local`` is the whole model on one daemon (a split job of one shard: the daemon's own
engine, no hops); ``spec`` is speculative decoding (``--draft-model``); ``split`` is
``--shards`` shards; ``tp`` is not built (issue 15): its cells are "unavailable".

Daemons: by default the matrix starts its own on loopback, fresh for each mode (so a mode's
memory is its own): one for local (with ``--nodes x --threads`` torch threads), ``--nodes``
for spec and split, each pinned to its own core(s) (sched_setaffinity, as taskset does) when
the machine has them. ``--daemon HOST:PORT`` uses a running cluster instead; peak RSS is then
not measured (its daemons are not this run's children).

Writes ``OUT/results.jsonl`` (one line per cell, each with machine, versions and config) and
``OUT/*.png`` heatmaps (:mod:`p2pllm.lab.heatmaps`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from p2pllm.lab.daemons import StartedDaemon, nodes_up, start_cluster, status_of
from p2pllm.lab.matrix import (
    FAILED,
    OK,
    UNAVAILABLE,
    Cell,
    cell_label,
    cell_status,
    combine_reps,
    expand_grid,
    parse_list,
    parse_modes,
    record,
    summarize,
    to_jsonl,
)
from p2pllm.lab.runlog import RunLogError, add_log_arguments, open_runlog

DEFAULT_MODEL, DEFAULT_DRAFT = "shakespeare", "shakespeare-draft"


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    m = sub.add_parser("matrix", help="modes x context x batch through the daemons, heatmaps",
                       description=__doc__.split("\n\n")[0])
    m.add_argument("--model", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL})")
    m.add_argument("--draft-model", default=None,
                   help=f"spec mode's draft (default {DEFAULT_DRAFT} with the default model)")
    m.add_argument("--modes", default="local,spec,split,tp", help="local,spec,split,tp")
    m.add_argument("--context", default="64,256,1024", help="prompt lengths in tokens")
    m.add_argument("--batch", default="1,4,16", help="concurrent requests per cell")
    m.add_argument("--new-tokens", type=_positive, default=16, help="tokens generated per request")
    m.add_argument("--reps", type=_positive, default=1,
                   help="rounds per cell; tokens/s and TTFT are their medians (default 1)")
    m.add_argument("--stop-at-eos", action="store_true",
                   help="let an end token stop a request early (default: every request "
                        "generates exactly --new-tokens, GENERATE ignore_eos)")
    m.add_argument("--out", required=True, help="output folder (results.jsonl, *.png)")
    m.add_argument("--daemon", metavar="HOST:PORT", default=None,
                   help="use this running daemon (its cluster) instead of starting daemons")
    m.add_argument("--secret-file", default=None, help="with --daemon: the cluster's secret")
    m.add_argument("--nodes", type=_positive, default=2, help="daemons started for spec/split (2)")
    m.add_argument("--shards", type=_positive, default=2, help="split mode's shards (default 2)")
    m.add_argument("--threads", type=_positive, default=1, help="torch threads per started daemon")
    m.add_argument("--models-dir", action="append", default=[],
                   help="models dir for the started daemons and to read the model's config")
    m.add_argument("--no-plots", action="store_true", help="results.jsonl only")
    add_log_arguments(m)


# -- facts about the run ---------------------------------------------------------------------


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    mem = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {"host": platform.node(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "mem_total_bytes": mem, "load_avg_at_start": list(os.getloadavg())}


def versions() -> dict[str, Any]:
    from p2pllm import __version__

    return {"p2pllm": __version__, "python": platform.python_version(),
            **{k: _version(k) for k in ("torch", "transformers", "msgpack")}}


def model_facts(ref: str, models_dirs: list[str]) -> dict[str, Any]:
    """max_position_embeddings and vocab_size from the model's config.json when it can be
    found here (a path, a bundled name, a name under --models-dir); None when it cannot."""
    from p2pllm.daemon.modelrefs import ModelRoots

    facts: dict[str, Any] = {"max_positions": None, "vocab_size": None, "path": None}
    try:
        found = ModelRoots(models_dirs).find(ref)
    except Exception:  # FORBIDDEN / NOT_FOUND here: the daemon may still have it
        found = None
    if found is None:
        return facts
    facts["path"] = str(found.path)
    cfg = found.path / "config.json"
    if cfg.is_file():
        c = json.loads(cfg.read_text())
        facts["max_positions"] = c.get("max_position_embeddings")
        facts["vocab_size"] = c.get("vocab_size")
    return facts


def prompt_ids(context: int, index: int, vocab: int) -> list[int]:
    rng = random.Random(context * 100003 + index)
    return [rng.randrange(2, vocab) for _ in range(context)]


# -- one cell -----------------------------------------------------------------------------------


async def one_session(address: str, secret_file: str | None, meta: dict[str, Any]
                      ) -> dict[str, Any]:
    from p2pllm.cli.client import open_daemon
    from p2pllm.wire.messages import MsgType

    conn = await open_daemon(address, secret_file)
    try:
        t0 = time.perf_counter()
        first: float | None = None
        async for frame in conn.stream(MsgType.GENERATE, meta, idle_timeout=600):
            if frame.is_partial:
                if first is None and frame.meta.get("token_ids"):
                    first = time.perf_counter() - t0
            else:
                r = frame.meta
                return {"generated_tokens": r.get("generated_tokens", 0), "ttft_s": first,
                        "daemon_ttft_s": r.get("time_to_first_token_s"), "job": r.get("job")}
    finally:
        conn.close()
    raise RuntimeError("the stream ended without a result")


def request_meta(mode: str, args: argparse.Namespace, max_sessions: int) -> dict[str, Any]:
    from p2pllm.daemon.modelrefs import cli_model_ref

    meta: dict[str, Any] = {"model": cli_model_ref(args.model), "max_tokens": args.new_tokens,
                            "temperature": 0.0, "ignore_eos": not args.stop_at_eos}
    if mode == "spec":
        return meta | {"mode": "spec", "draft_model": cli_model_ref(args.draft_model)}
    shards = 1 if mode == "local" else args.shards
    return meta | {"mode": "split", "shards": shards, "keep_alive": 600,
                   "max_sessions": max_sessions}


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


async def run_cell(cell: Cell, address: str, secret_file: str | None, base: dict[str, Any],
                   vocab: int, daemons: list[StartedDaemon], reps: int = 1
                   ) -> tuple[str, str | None, dict[str, Any], set[str]]:
    """(status, reason, figures, jobs seen) of one measured cell: `reps` rounds of `batch`
    requests at once, combined by :func:`combine_reps` (the peak RSS spans them all)."""
    for d in daemons:
        d.reset_peak()
    jobs: set[str] = set()
    rounds = []
    for rep in range(reps):
        metas = [base | {"prompt_ids": prompt_ids(cell.context, rep * cell.batch + i, vocab)}
                 for i in range(cell.batch)]
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_session(address, secret_file, m) for m in metas),
                                       return_exceptions=True)
        wall = time.perf_counter() - t0
        errors = [r for r in results if isinstance(r, BaseException)]
        good = [r for r in results if isinstance(r, dict)]
        jobs |= {str(r["job"]) for r in good if r.get("job")}
        if errors:
            return (FAILED, f"{len(errors)}/{cell.batch} requests failed: {_reason(errors[0])}",
                    {}, jobs)
        rounds.append(summarize(cell, good, wall))
    return OK, None, combine_reps(rounds), jobs


async def stop_jobs(address: str, secret_file: str | None, jobs: set[str]) -> None:
    from p2pllm.cli.client import open_daemon
    from p2pllm.wire.messages import MsgType

    for job in jobs:
        with contextlib.suppress(Exception):
            conn = await open_daemon(address, secret_file)
            try:
                await conn.request(MsgType.JOB_STOP, {"job": job}, timeout=30)
            finally:
                conn.close()


# -- the matrix ---------------------------------------------------------------------------------


def prepare(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """What the run needs before any daemon: the grid, the model's facts, the daemons' flags,
    and the machine / versions / config every record carries."""
    modes = parse_modes(args.modes)
    contexts, batches = parse_list(args.context), parse_list(args.batch)
    if args.draft_model is None and args.model == DEFAULT_MODEL:
        args.draft_model = DEFAULT_DRAFT
    facts = model_facts(args.model, args.models_dir)
    models_dirs = list(args.models_dir)
    for ref in (args.model, args.draft_model):
        p = Path(ref).expanduser() if ref else None
        if p is not None and p.exists():
            models_dirs.append(str(p.resolve().parent))
    max_sessions = min(256, max(8, *batches))
    config = {k: getattr(args, k) for k in ("model", "draft_model", "new_tokens", "reps", "stop_at_eos",
                                            "daemon", "nodes", "shards", "threads")}
    config |= {"modes": modes, "contexts": contexts, "batches": batches, "model_facts": facts,
               "max_sessions": max_sessions, "daemons": "--daemon" if args.daemon else "started",
               "peak_rss": "not measured (--daemon)" if args.daemon else
               "sum over the mode's daemons of VmHWM, reset at the cell's start"}
    log_dir = out / "daemon-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    return {"cells": expand_grid(modes, contexts, batches), "modes": modes, "contexts": contexts,
            "batches": batches, "facts": facts, "vocab": int(facts["vocab_size"] or 256),
            "flags": [x for d in dict.fromkeys(models_dirs) for x in ("--models-dir", d)],
            "max_sessions": max_sessions, "log_dir": log_dir,
            "ctx": {"machine": machine(), "versions": versions(), "config": config}}


async def run_matrix(args: argparse.Namespace, plan: dict[str, Any], fh: Any,
                     progress: Any = None, runlog: Any = None) -> list[dict[str, Any]]:
    """Run every cell of `plan` (from :func:`prepare`), writing each record to `fh` (and
    to `runlog`, a :class:`p2pllm.lab.runlog.RunLog`, without the run's context) as it
    comes; returns the records."""
    cells, modes, facts, vocab = plan["cells"], plan["modes"], plan["facts"], plan["vocab"]
    flags, max_sessions, log_dir, ctx = plan["flags"], plan["max_sessions"], plan["log_dir"], plan["ctx"]
    records: list[dict[str, Any]] = []
    task = progress.add_task("matrix", total=len(cells)) if progress else None


    def emit(cell: Cell, status: str, reason: str | None, **kw: Any) -> None:
        rec = record(cell, status, reason=reason, context=ctx, **kw)
        records.append(rec)
        fh.write(to_jsonl(rec))
        fh.flush()
        if runlog is not None:
            runlog.log({"event": "cell", **{k: v for k, v in rec.items() if k not in ctx}},
                       step=len(records) - 1)
        if progress is not None:
            progress.update(task, advance=1, description=f"{cell.mode} ctx={cell.context} "
                            f"batch={cell.batch}")
            progress.console.log(f"{cell.mode:5} ctx={cell.context:<5} batch={cell.batch:<3}"
                                 f" {cell_label(status, reason)}"
                                 + (f" {rec['tokens_per_s']} tok/s" if status == OK else ""))

    cluster_nodes = nodes_up(await status_of(args.daemon, args.secret_file)) if args.daemon else None
    for mode in modes:
        mine = [c for c in cells if c.mode == mode]
        nodes = cluster_nodes if cluster_nodes is not None else (1 if mode == "local" else args.nodes)
        whys: dict[Cell, str | None] = {}
        for c in mine:
            whys[c] = cell_status(c, max_positions=facts["max_positions"],
                                  new_tokens=args.new_tokens, nodes=nodes)
            if mode == "split" and whys[c] is None and nodes < args.shards:
                whys[c] = f"not enough nodes for split: {nodes} up, {args.shards} shards asked"
        runnable = [c for c in mine if whys[c] is None]
        if not runnable:
            for c in mine:
                emit(c, UNAVAILABLE, whys[c])
            continue
        daemons: list[StartedDaemon] = []
        jobs: set[str] = set()
        try:
            if args.daemon:
                address = args.daemon
            else:
                threads = args.threads * (args.nodes if mode == "local" else 1)
                daemons = await start_cluster(1 if mode == "local" else args.nodes, threads,
                                              flags, log_dir, f"{mode}-")
                address = daemons[0].address
            base = request_meta(mode, args, max_sessions)
            # warm-up (not measured): imports, plan, loading the shards
            warm = await one_session(address, args.secret_file,
                                     base | {"prompt_ids": prompt_ids(2, 0, vocab),
                                             "max_tokens": 2})
            jobs.add(str(warm.get("job")))
            for c in mine:
                why = whys[c]
                if why is not None:
                    emit(c, UNAVAILABLE, why)
                    continue
                status, reason, figs, seen = await run_cell(c, address, args.secret_file,
                                                            base, vocab, daemons, args.reps)
                jobs |= seen
                peaks = {d.name: d.peak_rss() for d in daemons} if daemons else None
                emit(c, status, reason, figures=figs, rss_per_daemon=peaks,
                     peak_rss_bytes=sum(peaks.values()) if peaks else None)
        except Exception as exc:
            done = {(r["mode"], r["context"], r["batch"]) for r in records}
            for c in mine:
                if (c.mode, c.context, c.batch) not in done:
                    why = whys[c]
                    if why is not None:
                        emit(c, UNAVAILABLE, why)
                    else:
                        emit(c, FAILED, f"mode {mode} could not run: {_reason(exc)}")
        finally:
            if args.daemon:
                await stop_jobs(address, args.secret_file, {j for j in jobs if j != "None"})
            for d in daemons:
                d.stop()
    return records


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        parse_modes(args.modes), parse_list(args.context), parse_list(args.batch)
    except ValueError as exc:
        print(f"p2pllm bench matrix: {exc}", file=sys.stderr)
        return 2
    console = Console(stderr=True)
    plan = prepare(args, out)
    try:
        runlog = open_runlog(args, "bench-matrix", plan["ctx"])
    except RunLogError as exc:
        print(f"p2pllm bench matrix: {exc}", file=sys.stderr)
        return 2
    try:
        with open(out / "results.jsonl", "w") as fh, Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), console=console) as progress:
            records = asyncio.run(run_matrix(args, plan, fh, progress, runlog))
    except BaseException as exc:
        if runlog is not None:
            runlog.finish(None, f"{type(exc).__name__}: {exc}")
        raise
    pngs: list[Path] = []
    if not args.no_plots:
        try:
            import matplotlib  # noqa: F401  (the [plot] extra)

            from p2pllm.lab.heatmaps import write_heatmaps
        except ImportError as exc:  # pragma: no cover - the [plot] extra is missing
            print(f"p2pllm bench matrix: no heatmaps ({exc}; pip install p2pllm[plot])",
                  file=sys.stderr)
        else:
            pngs = write_heatmaps(out, records, plan["modes"], plan["contexts"],
                                  plan["batches"])
    counts = {s: sum(r["status"] == s for r in records) for s in (OK, UNAVAILABLE, FAILED)}
    if runlog is not None:
        runlog.finish({"results": str(out / "results.jsonl"), "cells": counts})
    print(json.dumps({"results": str(out / "results.jsonl"), "cells": counts,
                      "heatmaps": [str(p) for p in pngs]}))
    return 0 if counts[FAILED] == 0 else 1
