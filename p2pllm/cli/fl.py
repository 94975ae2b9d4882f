"""`p2pllm fl run ...`: federated LoRA fine-tuning, coordinated by the local daemon.

The CLI sends FL_RUN to its daemon (protocol.md section 10), which becomes the coordinator;
partial responses report each round, the final one carries the result. Only the flags given
on the command line are sent: the daemon fills in defaults, or, with --resume, the values
saved in the run's checkpoint.

The run lives on the daemon under its state dir by name (`--run-name`, default from `--out`'s
last component or the model). With `--out DIR` the daemon streams the adapter's files back and
this process writes DIR (refusing a non-empty DIR without `--overwrite`); no path crosses the
wire.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from p2pllm.cli.client import open_daemon, run_daemon_call
from p2pllm.cli.files import FileSink, OutputError, check_target, run_name_from
from p2pllm.lab.runlog import (
    RunLog,
    RunLogError,
    add_log_arguments,
    noting_errors,
    open_runlog,
)
from p2pllm.wire.messages import MsgType

# (flag, key in FL_RUN, type, help)
_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--rounds", "rounds", int, "federated rounds (default 3)"),
    ("--clients", "clients", int, "clients to use (default: every node with FL data)"),
    ("--min-clients", "min_clients", int, "valid updates a round needs, else it is retried (default 1)"),
    ("--local-steps", "local_steps", int, "optimizer steps per client per round (default 20)"),
    ("--local-epochs", "local_epochs", float, "epochs over each client's data per round (overrides --local-steps)"),
    ("--lr", "lr", float, "client learning rate, AdamW (default 1e-3)"),
    ("--batch-size", "batch_size", int, "blocks per step (default 8)"),
    ("--block-size", "block_size", int, "tokens per training block (default 128)"),
    ("--eval-fraction", "eval_fraction", float, "share of each client's blocks held out for eval (default 0.1)"),
    ("--lora-rank", "lora_rank", int, "LoRA rank r (default 8)"),
    ("--lora-alpha", "lora_alpha", float, "LoRA alpha (default 16)"),
    ("--lora-dropout", "lora_dropout", float, "LoRA dropout (default 0.05)"),
    ("--round-timeout", "round_timeout", float, "seconds to wait for clients each round (default 300)"),
    ("--server-lr", "server_lr", float, "FedAvgM server learning rate (default 1.0)"),
    ("--server-momentum", "server_momentum", float, "FedAvgM momentum (default 0.9)"),
    ("--seed", "seed", int, "seed of the initial adapter, batch order and dropout (default 0)"),
    ("--max-retries", "max_retries", int, "retries of a round with too few valid updates (default 3)"),
    ("--wait-clients", "wait_clients", float, "seconds to wait for enough clients to appear (default 10)"),
    ("--run-name", "run_name", str, "name of the run on the daemon: <state dir>/fl/NAME (default from --out or the model)"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="fl_command", required=True, metavar="FL_COMMAND")
    r = sub.add_parser("run", help="run federated LoRA fine-tuning over the clients with data")
    r.add_argument("--daemon", metavar="HOST:PORT", help="daemon to ask (default 127.0.0.1:7411 or $P2PLLM_DAEMON)")
    r.add_argument("--secret-file", help="shared secret file, if the cluster uses one")
    r.add_argument("--model", required=True, help="base model: a name under the daemon's --models-dir, or a path")
    for flag, key, typ, help_text in _FLAGS:
        r.add_argument(flag, dest=key, type=typ, default=None, help=help_text)
    r.add_argument("--target-modules", default=None, help="comma-separated module names for LoRA (default q_proj,v_proj)")
    r.add_argument("--aggregation", choices=("fedavg", "fedavgm"), default=None, help="server aggregation (default fedavg)")
    r.add_argument("--quantize", choices=("4bit",), default=None, help="QLoRA: 4-bit base model (CUDA + bitsandbytes clients only)")
    r.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    r.add_argument("--out", default=None, help="directory (on this host) for the final adapter (peft format) and the plot")
    r.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    r.add_argument("--json", action="store_true", help="print one JSON object with the result")
    add_log_arguments(r)


def run_meta(args: argparse.Namespace) -> dict[str, Any]:
    """The FL_RUN body: only what was given."""
    meta: dict[str, Any] = {"model": _path_or_name(args.model)}
    for _, key, _, _ in _FLAGS:
        value = getattr(args, key, None)
        if value is not None:
            meta[key] = value
    if args.target_modules:
        meta["target_modules"] = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    for key in ("aggregation", "quantize"):
        if getattr(args, key) is not None:
            meta[key] = getattr(args, key)
    if args.resume:
        meta["resume"] = True
    if args.out:
        meta["send_files"] = True
        if "run_name" not in meta:
            meta["run_name"] = ("fl-" + run_name_from(str(Path(args.out).expanduser().resolve())))[:100]
    return meta


def _path_or_name(model: str) -> str:
    """An existing local directory is sent as an absolute path (the daemon's cwd differs)."""
    p = Path(model).expanduser()
    return str(p.resolve()) if p.is_dir() else model


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "-" if v is None else str(v)


def log_event(log: RunLog, m: dict[str, Any]) -> None:
    """One FL_RUN partial into the run log: a round's record (step = its round), the eval
    loss before training (step 0), anything else as it came."""
    if "record" in m:
        log.log({"event": "round", **m["record"]}, step=int(m["record"]["round"]))
    elif "initial_eval_loss" in m:
        log.log({"event": "initial_eval", **m}, step=0)
    else:
        log.log(m)


async def stream_run(args: argparse.Namespace, meta: dict[str, Any], echo: bool,
                     sink: FileSink | None = None, log: RunLog | None = None) -> dict[str, Any]:
    conn = await open_daemon(args.daemon, args.secret_file)
    try:
        result: dict[str, Any] = {}
        async for frame in conn.stream(MsgType.FL_RUN, meta):
            if not frame.is_partial:
                result = frame.meta
            elif frame.meta.get("event") == "file":
                if sink is None:
                    raise OutputError("the daemon sent files nobody asked for")
                sink.add(frame.meta, frame.payload)
            elif log is not None or echo:
                m = frame.meta
                if log is not None:
                    log_event(log, m)
                if not echo:
                    continue
                if "record" in m:
                    r = m["record"]
                    extra = ""
                    if r.get("dropped_clients"):
                        extra += f" dropped={','.join(r['dropped_clients'])}"
                    if r.get("rejected_clients"):
                        extra += f" rejected={','.join(x['name'] for x in r['rejected_clients'])}"
                    print(
                        f"round {r['round']}: {r['clients_answered']}/{r['clients_asked']} clients "
                        f"train_loss={_fmt(r['train_loss'])} eval_loss={_fmt(r['eval_loss'])} "
                        f"sent={r['bytes_sent']}B received={r['bytes_received']}B {r['seconds']:.2f}s{extra}",
                        file=sys.stderr,
                    )
                elif "initial_eval_loss" in m:
                    print(
                        f"clients: {', '.join(m.get('clients', []))}; eval loss before training "
                        f"{_fmt(m['initial_eval_loss'])}",
                        file=sys.stderr,
                    )
        if sink is not None and result:
            out = sink.finish()
            result["daemon_adapter_dir"] = result.get("adapter_dir")
            result["adapter_dir"] = str(out)
            if result.get("plot"):
                result["plot"] = str(out / "eval_loss.png")
        return result
    finally:
        if sink is not None:
            sink.discard()
        conn.close()


def run(args: argparse.Namespace) -> int:
    meta = run_meta(args)
    try:
        log = open_runlog(args, "fl-run", meta)
    except RunLogError as exc:
        print(f"p2pllm: {exc}", file=sys.stderr)
        return 1
    result = None
    try:
        sink = FileSink(check_target(args.out, args.overwrite), args.overwrite) if args.out else None
        result, rc = run_daemon_call(
            noting_errors(stream_run(args, meta, not args.json, sink, log), log), "fl run")
    except OutputError as exc:
        print(f"p2pllm: --out: {exc}", file=sys.stderr)
        return 1
    finally:
        if log is not None:
            log.finish(result, None if result is not None else
                       log.error or "the run did not finish")
    if result is None:
        return rc
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"adapter: {result.get('adapter_dir')}")
    if result.get("plot"):
        print(f"plot: {result['plot']}")
    elif result.get("plot_error"):
        print(f"plot: {result['plot_error']}", file=sys.stderr)
    print(
        f"eval loss {_fmt(result.get('initial_eval_loss'))} -> {_fmt(result.get('final_eval_loss'))} "
        f"over {len(result.get('rounds', []))} rounds (run {result.get('run_name')}, job {result.get('job')})"
    )
    return 0
