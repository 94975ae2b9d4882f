"""`p2pllm train split ...`: split training across hosts (TRAIN_RUN to the local daemon), and
`p2pllm train local ...`: the same training in this process (the single-process reference).

`split --data X`: a file or directory of this host is read here and its content sent with the
request (a directory's documents as JSON lines; at most the daemon's max_dataset_bytes); any
other X is a dataset name in the first stage's --data-dir. `split --save DIR`: the daemon keeps
the checkpoint under its state dir by name (`--save-name`, default DIR's last component) and
streams its files back; this process writes DIR (refusing a non-empty DIR without
`--overwrite`). No path crosses the wire.

`split` streams the job's progress (the plan, one line per step, each checkpoint saved); with
`--json` it prints one JSON object at the end: `{"losses": [...], "steps": [{"step", "loss",
"seconds", "bytes_forward", "bytes_backward", ...}], "stages": [...], ...}` (protocol.md
section 11).
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


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory or model name")
    p.add_argument("--data", required=True,
                   help="dataset: a .txt/.md/.jsonl file, a directory of them, or a "
                        ".safetensors file of input_ids; with split, a file or directory here "
                        "is sent to the first stage, anything else is a dataset name in its "
                        "--data-dir")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps (default 10)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--micro-batches", type=int, default=2,
                   help="micro-batches per step; must divide the batch size (default 2)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    p.add_argument("--decay", choices=("constant", "cosine", "linear"), default="constant",
                   help="learning-rate decay after warm-up (default constant)")
    p.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the last step")
    p.add_argument("--grad-clip", type=float, default=None, help="clip the global gradient norm")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters, not the weights")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-targets", default="q_proj,v_proj",
                   help="comma-separated linear layers to adapt (default q_proj,v_proj)")
    p.add_argument("--seed", type=int, default=0, help="data order (and random init) seed")
    p.add_argument("--no-shuffle", action="store_true", help="use the blocks in file order")
    p.add_argument("--init", choices=("checkpoint", "random"), default="checkpoint",
                   help="start from the checkpoint's weights or from a random init")
    p.add_argument("--save", metavar="DIR",
                   help="write the trained model (or adapter with --lora) to DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="train_command", required=True, metavar="TRAIN_COMMAND")
    s = sub.add_parser("split", help="train one model split over several hosts' daemons",
                       description="Split training: each stage holds a contiguous range of "
                                   "layers; activations flow forward, gradients back.")
    _common(s)
    s.add_argument("--stages", type=int, default=None,
                   help="number of stages (default: every node that accepts train-stage)")
    s.add_argument("--layers", default=None,
                   help="explicit layer ranges in pipeline order, e.g. 0-1,1-2")
    s.add_argument("--nodes", default=None,
                   help="comma-separated node names or ids in pipeline order (repeats allowed)")
    s.add_argument("--schedule", choices=("gpipe", "1f1b"), default="1f1b",
                   help="pipeline schedule (default 1f1b)")
    s.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="also save every N steps (on the daemon, replaced atomically)")
    s.add_argument("--save-name", metavar="NAME", default=None,
                   help="the checkpoint's name on the daemon (<state dir>/checkpoints/NAME; "
                        "default: --save's last component)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --save directory")
    s.add_argument("--daemon", metavar="HOST:PORT",
                   help="daemon to ask (default 127.0.0.1:7411 or $P2PLLM_DAEMON)")
    s.add_argument("--secret-file", help="shared secret file, if the cluster uses one")
    add_log_arguments(s)
    s.set_defaults(train_run=run_split)
    s = sub.add_parser("local", help="the same training in this process (no daemon)")
    _common(s)
    s.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    s.set_defaults(train_run=run_local)


def run(args: argparse.Namespace) -> int:
    return int(args.train_run(args))


def _abs(path: str) -> str:
    return str(Path(path).expanduser().absolute())


def read_dataset(data: str) -> tuple[str, bytes] | None:
    """(format, content) of a local dataset file or directory; None if ``data`` is not one
    (then it is a dataset name on the first stage's host)."""
    p = Path(data).expanduser()
    if p.is_file():
        from p2pllm.pillars.splittrain.data import data_format

        return data_format(p), p.read_bytes()
    if p.is_dir():
        from p2pllm.pillars.splittrain.data import read_texts

        docs = read_texts(p)
        return "jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    return None


def train_meta(args: argparse.Namespace) -> dict[str, Any]:
    """The TRAIN_RUN request body from parsed arguments (the dataset's content, when it is
    local, goes in the payload: :func:`train_request`)."""
    return train_request(args)[0]


def train_request(args: argparse.Namespace) -> tuple[dict[str, Any], bytes]:
    """The TRAIN_RUN body and payload (the dataset's content, or nothing for a name)."""
    model = args.model
    if Path(model).expanduser().exists():
        model = _abs(model)
    local = read_dataset(args.data)
    payload = b""
    meta: dict[str, Any] = {
        "model": model, "steps": args.steps,
        "batch_size": args.batch_size, "micro_batches": args.micro_batches,
        "seq_len": args.seq_len, "schedule": args.schedule, "lr": args.lr,
        "weight_decay": args.weight_decay, "warmup_steps": args.warmup, "decay": args.decay,
        "min_lr": args.min_lr, "grad_clip": args.grad_clip, "lora": bool(args.lora),
        "lora_r": args.lora_r, "lora_alpha": args.lora_alpha,
        "lora_targets": [t.strip() for t in args.lora_targets.split(",") if t.strip()],
        "seed": args.seed, "shuffle": not args.no_shuffle, "init": args.init,
        "save_every": args.save_every,
    }
    if args.stages is not None:
        meta["stages"] = args.stages
    if args.layers:
        meta["layers"] = args.layers
    if args.nodes:
        meta["nodes"] = [n.strip() for n in args.nodes.split(",") if n.strip()]
    if local is None:
        meta["data"] = args.data
    else:
        meta["data_format"], payload = local
    if args.save:
        meta["save"] = args.save_name or run_name_from(args.save)
        meta["send_files"] = True
    return meta, payload


async def stream_train(address: str | None, secret_file: str | None, meta: dict[str, Any],
                       echo: bool, payload: bytes = b"",
                       sink: FileSink | None = None,
                       log: RunLog | None = None) -> dict[str, Any]:
    conn = await open_daemon(address, secret_file)
    try:
        result: dict[str, Any] = {}
        async for frame in conn.stream(MsgType.TRAIN_RUN, meta, [payload] if payload else []):
            if not frame.is_partial:
                result = frame.meta
            elif frame.meta.get("event") == "file":
                if sink is None:
                    raise OutputError("the daemon sent files nobody asked for")
                sink.add(frame.meta, frame.payload)
            else:
                if log is not None:
                    ev = frame.meta
                    log.log(ev, step=ev["step"] if ev.get("event") == "step" else None)
                if echo:
                    _print_event(frame.meta, meta["steps"])
        if sink is not None and result:
            result["checkpoint"] = result.get("saved")
            result["saved"] = str(sink.finish())
        return result
    finally:
        if sink is not None:
            sink.discard()
        conn.close()


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _print_event(ev: dict[str, Any], steps: int) -> None:
    kind = ev.get("event")
    if kind == "plan":
        print(f"job {ev.get('job')}")
        for st in ev.get("stages", []):
            a, b = st["layers"]
            fetch = (f", fetching {st['fetch_bytes'] / 1e6:.1f} MB in "
                     f"{'' if st.get('fetch_measured') else '~'}{st.get('fetch_s', 0):.1f} s"
                     if st.get("fetch_bytes") else "")
            print(f"  stage {st['index']}: layers {a}-{b} on {st['name']} ({st['node_id'][:8]}){fetch}")
    elif kind == "step":
        print(f"step {ev['step'] + 1:>{len(str(steps))}}/{steps}  loss {ev['loss']:.4f}  "
              f"{ev['seconds']:.3f}s  fwd {_mb(ev['bytes_forward'])}  "
              f"bwd {_mb(ev['bytes_backward'])}", flush=True)
    elif kind == "saved":
        print(f"saved checkpoint {ev.get('name')} on the daemon ({ev['path']}, after step "
              f"{ev['step']})", flush=True)


def run_split(args: argparse.Namespace) -> int:
    sink = None
    try:
        if args.save:
            sink = FileSink(check_target(args.save, args.overwrite), args.overwrite)
        meta, payload = train_request(args)
        log = open_runlog(args, "train-split", meta)
    except (OutputError, OSError, ValueError, RunLogError) as exc:
        print(f"p2pllm: {exc}", file=sys.stderr)
        return 1
    result = None
    try:
        result, rc = run_daemon_call(
            noting_errors(stream_train(args.daemon, args.secret_file, meta, not args.json,
                                       payload, sink, log), log), "split training")
    except OutputError as exc:
        print(f"p2pllm: --save: {exc}", file=sys.stderr)
        return 1
    finally:
        if log is not None:
            log.finish(result, None if result is not None else
                       log.error or "the training did not finish")
    if result is None:
        return rc
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{len(result.get('losses', []))} steps in {result.get('train_seconds', 0):.2f}s "
              f"({result.get('tokens_per_s', 0):.0f} tokens/s), bubble "
              f"{result.get('bubble', 0):.3f} measured (theory "
              f"{result.get('bubble_theory', 0):.3f}), idle fraction "
              f"{result.get('idle_fraction', 0):.3f}")
        if result.get("saved"):
            print(f"saved {result['saved']}")
    return 0


def run_local(args: argparse.Namespace) -> int:
    import torch

    from p2pllm.engine.errors import ModelError
    from p2pllm.engine.loader import resolve_model
    from p2pllm.pillars.splittrain.compute import OptimConfig, lora_spec
    from p2pllm.pillars.splittrain.data import DataError, load_blocks
    from p2pllm.pillars.splittrain.trainer import save_trained, train_local

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        path = resolve_model(args.model)
        optim = OptimConfig(lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup,
                            decay=args.decay, min_lr=args.min_lr, grad_clip=args.grad_clip)
        lora = lora_spec(r=args.lora_r, alpha=args.lora_alpha,
                         targets=tuple(t.strip() for t in args.lora_targets.split(",")
                                       if t.strip())) if args.lora else None
        blocks = load_blocks(args.data, args.seq_len, path)

        def show(rec: dict[str, float]) -> None:
            if not args.json:
                print(f"step {int(rec['step']) + 1}/{args.steps}  loss {rec['loss']:.4f}  "
                      f"{rec['seconds']:.3f}s", flush=True)

        run = train_local(path, blocks, steps=args.steps, batch_size=args.batch_size,
                          micro_batches=args.micro_batches, optim=optim, lora=lora,
                          seed=args.seed, shuffle=not args.no_shuffle, init=args.init,
                          on_step=show)
        if args.save:
            save_trained(run.model, args.save, lora=lora, tokenizer_src=path,
                         base_model=args.model)
    except (ModelError, DataError, ValueError) as exc:
        print(f"p2pllm: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"losses": run.losses, "steps": run.steps, "seconds": run.seconds,
                          "saved": _abs(args.save) if args.save else None}))
    return 0
