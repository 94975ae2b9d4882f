"""`p2pllm ctl ...`: status, peers, ping, jobs, stop."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from p2pllm.cli.client import open_daemon, run_daemon_call
from p2pllm.cli.dashboard import job_metrics_text, links_table, peers_table, role_text
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
    result, rc = run_daemon_call(_run(args), f"ctl {args.ctl_command}")
    return rc if result is None else result


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
                snap = (await conn.request(MsgType.STATUS, {}, timeout=10)).meta
                render_jobs(Console(), {**meta, "node": snap["node"], "peers": snap["peers"]})
            return 0
        if cmd == "stop":
            meta = (await conn.request(MsgType.JOB_STOP, {"job": args.job}, timeout=60)).meta
            print(f"stopped {meta['stopped']}")
            return 0
        raise AssertionError(cmd)
    finally:
        conn.close()


def render_status(console: Console, snap: dict[str, Any]) -> None:
    """This node, its peers and links, then jobs: the dashboard's tables, printed once."""
    # Every column (node id, address, models too), folded to the terminal's width.
    console.print(peers_table(snap, True))
    console.print(links_table(snap, True))
    if snap.get("jobs"):
        render_jobs(console, snap)


def render_jobs(console: Console, meta: dict[str, Any]) -> None:
    names: dict[str, str] = {}
    if "node" in meta:
        names[meta["node"]["node_id"]] = meta["node"]["name"]
        names.update({p["node_id"]: p["name"] for p in meta.get("peers", [])})
    table = Table(title="jobs", box=None, title_justify="left", title_style="bold", expand=True)
    for col in ("job", "pillar", "coordinator", "state", "started", "members", "key metric"):
        table.add_column(col, overflow="fold")
    for j in meta.get("jobs", []):
        members = ", ".join(
            f"{names.get(m['node_id'], m['node_id'][:8])}:{m['role']}" for m in j.get("members", [])
        )
        started = time.strftime("%H:%M:%S", time.localtime(j["started"])) if j.get("started") else "-"
        coord = j.get("coordinator") or ""
        table.add_row(
            j["job"], j["pillar"], names.get(coord, coord[:8]), j["state"], started,
            Text(members or "-"), Text(job_metrics_text(j)),
        )
    console.print(table)
    if meta.get("roles"):
        held = ", ".join(role_text(r, job=True) for r in meta["roles"])
        console.print(Text(f"roles held here: {held}"))
