"""`p2pllm ctl ...`: status, peers, ping, jobs, stop."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from p2pllm.cli.client import DaemonUnavailable, open_daemon
from p2pllm.config import ConfigError
from p2pllm.wire.connection import ConnectionClosed, RemoteError
from p2pllm.wire.messages import MsgType


def add_daemon_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--daemon", metavar="HOST:PORT", help="daemon to ask (default 127.0.0.1:7411 or $P2PLLM_DAEMON)")
    p.add_argument("--secret-file", help="shared secret file, if the cluster uses one")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="ctl_command", required=True, metavar="CTL_COMMAND")
    s = sub.add_parser("status", help="this node and every known peer")
    add_daemon_arguments(s)
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s = sub.add_parser("peers", help="known peers, one per line")
    add_daemon_arguments(s)
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("ping", help="round-trip time from the daemon to a peer")
    add_daemon_arguments(s)
    s.add_argument("peer", help="peer name, node id (prefix) or address")
    s.add_argument("--count", type=int, default=4)
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("jobs", help="jobs this daemon coordinates or takes part in")
    add_daemon_arguments(s)
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("stop", help="stop a job and release its roles on every member")
    add_daemon_arguments(s)
    s.add_argument("job")


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except (DaemonUnavailable, ConfigError) as exc:
        print(f"p2pllm: {exc}", file=sys.stderr)
        return 2
    except RemoteError as exc:
        print(f"p2pllm: the daemon answered: {exc}", file=sys.stderr)
        return 1
    except (ConnectionClosed, TimeoutError) as exc:
        print(f"p2pllm: lost the daemon: {exc}", file=sys.stderr)
        return 1


async def _run(args: argparse.Namespace) -> int:
    conn = await open_daemon(args.daemon, args.secret_file)
    try:
        cmd = args.ctl_command
        if cmd in ("status", "peers"):
            snap = (await conn.request(MsgType.STATUS, {}, timeout=10)).meta
            if args.json:
                print(json.dumps(snap if cmd == "status" else snap["peers"], indent=2, default=str))
            elif cmd == "status":
                render_status(Console(), snap)
            else:
                for p in snap["peers"]:
                    print(f"{p['name']}\t{p['node_id']}\t{p['address']}\t{p['state']}")
            return 0
        if cmd == "ping":
            frame = await conn.request(
                MsgType.LINK_PROBE, {"target": args.peer, "count": args.count}, timeout=30
            )
            if args.json:
                print(json.dumps(frame.meta))
            else:
                m = frame.meta
                rtts = ", ".join(f"{r:.3f}" for r in m["rtt_ms"])
                print(f"{m['name']} ({m['node_id'][:8]}) at {m['address']}: rtt ms {rtts}")
            return 0
        if cmd == "jobs":
            meta = (await conn.request(MsgType.JOBS, {}, timeout=10)).meta
            if args.json:
                print(json.dumps(meta, indent=2, default=str))
            else:
                render_jobs(Console(), meta)
            return 0
        if cmd == "stop":
            meta = (await conn.request(MsgType.JOB_STOP, {"job": args.job}, timeout=60)).meta
            print(f"stopped {meta['stopped']}")
            return 0
        raise AssertionError(cmd)
    finally:
        conn.close()


def _mem(n: Any) -> str:
    if not isinstance(n, int | float):
        return "-"
    return f"{n / 2**30:.1f}G"


def _roles(roles: list[dict[str, Any]]) -> str:
    return ", ".join(
        f"{r['role']}@{r['job']}" + (f" [{r['summary']}]" if r.get("summary") else "") for r in roles
    ) or "-"


def render_status(console: Console, snap: dict[str, Any]) -> None:
    node = snap["node"]
    table = Table(title=f"p2pllm — {node['name']} ({node['node_id'][:8]}) at {node['address']}")
    for col in ("name", "node id", "address", "state", "device", "mem free/total", "score", "models", "roles", "rtt ms"):
        table.add_column(col)
    rows = [(node, True)] + [(p, False) for p in snap["peers"]]
    for p, is_self in rows:
        models = ", ".join(m["name"] for m in p.get("models", [])) or "-"
        rtt = "self" if is_self else ("-" if p.get("rtt_ms") is None else f"{p['rtt_ms']:.2f}")
        table.add_row(
            p["name"] + (" *" if is_self else ""),
            p["node_id"][:8],
            p["address"],
            p["state"],
            str(p.get("device", "-")),
            f"{_mem(p.get('mem_free'))}/{_mem(p.get('mem_total'))}",
            str(p.get("compute_score", "-")),
            models,
            _roles(p.get("roles", [])),
            rtt,
        )
    console.print(table)
    if snap.get("jobs"):
        render_jobs(console, {"jobs": snap["jobs"]})


def render_jobs(console: Console, meta: dict[str, Any]) -> None:
    table = Table(title="jobs")
    for col in ("job", "pillar", "state", "members", "metrics"):
        table.add_column(col)
    for j in meta.get("jobs", []):
        members = ", ".join(f"{m['role']}:{m['node_id'][:8]}" for m in j.get("members", []))
        metrics = ", ".join(f"{k}={v}" for k, v in list(j.get("metrics", {}).items())[:4])
        table.add_row(j["job"], j["pillar"], j["state"], members or "-", metrics or "-")
    console.print(table)
    if meta.get("roles"):
        console.print("roles held here: " + _roles(meta["roles"]))
