"""Federated LoRA benchmark: 3 client daemons on loopback vs one centralized LoRA run.

    python bench/fl.py [--rounds 5] [--local-steps 20] [--stories 120]

Starts a coordinator daemon and three client daemons, each with its own world of template
stories (the e2e test's generator) in its --data-dir, runs `p2pllm fl run --json` against the
coordinator, then trains one LoRA adapter centrally, in this process, on the union of the
clients' training blocks for the same total number of optimizer steps (rounds x clients x
local steps, same batch size, lr, seed and LoRA config). Both adapters, and the base model, are
evaluated on the union of the clients' eval blocks, with peft and with the engine (which is
what `p2pllm generate --adapter` loads).

Prints one JSON object:
  config         the run's settings
  bytes          adapter and full-model bytes; per client per round: FL_TRAIN answer bytes
                 (what a client uploads) and what the coordinator sent it; ratios to the model
  rounds         per round: wall seconds, aggregated eval loss, train loss, clients answered
  eval_loss      base, federated, centralized with the same total steps, centralized with
                 the steps one client takes in sequence (rounds x local steps), all on the same
                 eval blocks, and the ratios
  engine         eval loss through the engine with and without the federated adapter
  wall_s         the federated run (CLI wall time) and the centralized run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from p2pllm.pillars.federated import lora as lora_mod  # noqa: E402
from p2pllm.pillars.federated.data import LocalData, load_local_data  # noqa: E402
from p2pllm.pillars.federated.lora import LoraSpec  # noqa: E402
from p2pllm.pillars.federated.messages import RoundConfig  # noqa: E402
from p2pllm.pillars.federated.training import LocalTrainer  # noqa: E402
from tests.conftest import DaemonProc  # noqa: E402
from tests.e2e.test_fl import write_client_data  # noqa: E402

MODEL = REPO.parent / "shared" / "models" / "tinystories-656k"
CLIENTS = {"sea": "jsonl", "farm": "txt", "sky": "jsonl"}


def client_data(dirs: list[Path], block_size: int, eval_fraction: float, seed: int) -> list[LocalData]:
    """Each client's blocks exactly as its fl-client role cuts and splits them."""
    from p2pllm.engine.loader import load_tokenizer

    tok = load_tokenizer(MODEL)
    return [
        load_local_data(d, lambda t: tok(t, add_special_tokens=True)["input_ids"], block_size=block_size,
                        eval_fraction=eval_fraction, seed=seed, eos_id=tok.eos_token_id)
        for d in dirs
    ]


def engine_loss(adapter: Path | None, blocks: torch.Tensor) -> float:
    """Mean next-token loss of the engine's model (adapter merged at load) on (N, T) blocks."""
    import torch.nn.functional as F

    from p2pllm.engine.loader import load_slice

    model = load_slice(MODEL, adapter=adapter)
    pos = torch.arange(blocks.shape[1]).unsqueeze(0).expand(blocks.shape[0], -1)
    with torch.no_grad():
        logits = model.forward(blocks, pos)  # (N, T, V)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    return float(loss)


def read_adapter(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--server-lr", type=float, default=1.0, help="FedAvgM server learning rate")
    ap.add_argument("--server-momentum", type=float, default=0.9, help="FedAvgM momentum")
    ap.add_argument("--local-steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--stories", type=int, default=120, help="stories per client")
    ap.add_argument("--aggregation", choices=("fedavg", "fedavgm"), default="fedavg")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per daemon and for the central run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seed, eval_fraction, spec = 0, 0.1, LoraSpec()
    root = Path(tempfile.mkdtemp(prefix="p2pllm-bench-fl-"))
    dirs = []
    for theme, fmt in CLIENTS.items():
        write_client_data(root / f"data-{theme}", theme, fmt, count=args.stories)
        dirs.append(root / f"data-{theme}")

    # 1. Federated: a coordinator and three client daemons on loopback.
    procs: list[DaemonProc] = []
    try:
        coord = DaemonProc("coord", ["--no-mdns", "--state-dir", str(root / "state")], root, args.threads)
        procs.append(coord.wait_ready())
        for theme, d in zip(CLIENTS, dirs, strict=True):
            procs.append(DaemonProc(theme, ["--no-mdns", "--peer", coord.address, "--data-dir", str(d)],
                                    root, args.threads))
        for p in procs[1:]:
            p.wait_ready()
        out_dir = root / "adapter"
        cmd = [
            sys.executable, "-m", "p2pllm.cli.main", "fl", "run", "--daemon", coord.address,
            "--model", str(MODEL), "--rounds", str(args.rounds), "--clients", "3", "--min-clients", "3",
            "--local-steps", str(args.local_steps), "--lr", str(args.lr), "--batch-size", str(args.batch_size),
            "--block-size", str(args.block_size), "--eval-fraction", str(eval_fraction), "--seed", str(seed),
            "--wait-clients", "60", "--aggregation", args.aggregation,
            "--server-lr", str(args.server_lr), "--server-momentum", str(args.server_momentum), "--out", str(out_dir), "--json",
        ]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1800)
        fed_wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"fl run failed: {done.stderr}\n{coord.log()}")
        result = json.loads(done.stdout)
    finally:
        for p in procs:
            p.stop()

    # 2. Centralized: the union of the clients' train blocks, the same total number of steps.
    datas = client_data(dirs, args.block_size, eval_fraction, seed)
    union = LocalData(
        train=torch.cat([d.train for d in datas]), eval=torch.cat([d.eval for d in datas]),
        texts=sum(d.texts for d in datas),
    )
    base = lora_mod.load_base_model(MODEL)
    central = LocalTrainer(lora_mod.wrap(base, spec, seed, str(MODEL)), union, "cpu")
    glob0 = lora_mod.initial_adapter(MODEL, spec, seed)
    total_steps = args.rounds * len(CLIENTS) * args.local_steps
    t0 = time.perf_counter()
    central_run = central.train_round(
        glob0, RoundConfig(round=1, local_steps=total_steps, lr=args.lr, batch_size=args.batch_size, seed=seed)
    )
    central_wall = time.perf_counter() - t0
    # The same number of *sequential* steps as one client takes over the run (rounds x local
    # steps): what FedAvg's averaged rounds amount to with IID data.
    sequential = args.rounds * args.local_steps
    central_seq = central.train_round(
        glob0, RoundConfig(round=1, local_steps=sequential, lr=args.lr, batch_size=args.batch_size, seed=seed)
    )
    fed_adapter = read_adapter(out_dir)
    losses = {
        "base": central.evaluate(glob0),
        "federated": central.evaluate(fed_adapter),
        "centralized": central.evaluate(central_run.tensors),
        "centralized_sequential_steps": central.evaluate(central_seq.tensors),
    }

    # 3. Bytes, per round and client.
    adapter_bytes, model_bytes = result["adapter_bytes"], result["model_bytes"]
    up = [c["bytes_received"] for r in result["rounds"] for c in r["clients"] if c["status"] == "ok"]
    down = [c["bytes_sent"] for r in result["rounds"] for c in r["clients"]]
    report: dict[str, Any] = {
        "config": {
            "model": MODEL.name, "clients": len(CLIENTS), "rounds": args.rounds, "local_steps": args.local_steps,
            "lr": args.lr, "batch_size": args.batch_size, "block_size": args.block_size, "lora": spec.to_meta(),
            "train_blocks_per_client": [int(d.train.shape[0]) for d in datas],
            "eval_blocks": int(union.eval.shape[0]), "central_steps": total_steps,
            "central_sequential_steps": sequential, "aggregation": args.aggregation, "threads": args.threads,
        },
        "bytes": {
            "adapter": adapter_bytes,
            "model": model_bytes,
            "client_upload_per_round": max(up),
            "client_upload_per_round_over_model": round(max(up) / model_bytes, 5),
            "client_upload_overhead_bytes": max(up) - adapter_bytes,
            "coordinator_send_per_client_per_round": max(down),
            "per_round_total_sent": [r["bytes_sent"] for r in result["rounds"]],
            "per_round_total_received": [r["bytes_received"] for r in result["rounds"]],
        },
        "rounds": [
            {"round": r["round"], "seconds": r["seconds"], "eval_loss": r["eval_loss"], "train_loss": r["train_loss"],
             "clients_answered": r["clients_answered"]}
            for r in result["rounds"]
        ],
        "eval_loss": {
            **{k: round(v, 4) for k, v in losses.items()},
            "aggregated_initial": result["initial_eval_loss"],
            "federated_over_centralized": round(losses["federated"] / losses["centralized"], 4),
            "federated_gain_over_base": round(losses["base"] - losses["federated"], 4),
            "centralized_gain_over_base": round(losses["base"] - losses["centralized"], 4),
        },
        "engine": {
            "base": round(engine_loss(None, union.eval), 4),
            "with_federated_adapter": round(engine_loss(out_dir, union.eval), 4),
        },
        "wall_s": {"federated_cli": round(fed_wall, 2), "centralized_train": round(central_wall, 2),
                   "mean_round": round(sum(r["seconds"] for r in result["rounds"]) / len(result["rounds"]), 3)},
        "plot": result.get("plot"),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
