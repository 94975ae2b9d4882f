"""`p2pllm ctl ...`: status, peers, ping, jobs, stop."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from rich.console import Console
from rich.text import Text

from p2pllm.cli.client import open_daemon, run_daemon_call
from p2pllm.cli.dashboard import (
    INDENT,
    job_fetches,
    job_metrics_text,
    links_table,
    node_lines,
    role_text,
    table_rows,
    wrap_items,
)
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
    """This node and its peers, links, then jobs, laid out for ``console.width`` (80 when piped)."""
    for line in status_lines(snap, console.width):
        console.print(line)
    console.print(links_table(snap, True))
    if snap.get("jobs"):
        render_jobs(console, snap)


def render_jobs(console: Console, meta: dict[str, Any]) -> None:
    for line in jobs_lines(meta, console.width):
        console.print(line)


# -- layout: pure functions of a snapshot and a width (the helpers are the dashboard's) -------


def _names(meta: dict[str, Any]) -> dict[str, str]:
    names: dict[str, str] = {}
    if "node" in meta:
        names[meta["node"]["node_id"]] = meta["node"]["name"]
        names.update({p["node_id"]: p["name"] for p in meta.get("peers", [])})
    return names


def status_lines(snap: dict[str, Any], width: int) -> list[Text]:
    """Every node with its id, address, models and roles (see ``node_lines``)."""
    nodes = 1 + len(snap.get("peers", []))
    up = 1 + sum(1 for p in snap.get("peers", []) if p.get("state") == "up")
    return [Text(f"nodes {nodes}, {up} up  (* this node; --json for scripts)", style="bold"),
            *node_lines(snap, width, detail=True)]


def jobs_lines(meta: dict[str, Any], width: int) -> list[Text]:
    """Every job: id, pillar, state, start and coordinator on one line, members and live
    figures under it; then the roles this daemon holds."""
    names = _names(meta)
    jobs = meta.get("jobs", [])
    out = [Text(f"jobs {len(jobs)}" if jobs else "jobs: none", style="bold")]
    fields = []
    for j in jobs:
        started = time.strftime("%H:%M:%S", time.localtime(j["started"])) if j.get("started") else "-"
        coord = j.get("coordinator") or ""
        fields.append([j["job"], j["pillar"], j["state"], f"started {started}",
                       f"by {names.get(coord, coord[:8] or '-')}"])
    for j, head in zip(jobs, table_rows(fields, width), strict=True):
        members = [f"{names.get(m['node_id'], m['node_id'][:8])}:{m['role']}"
                   + (f"[{m['summary']}]" if m.get("summary") else "") for m in j.get("members", [])]
        lines = list(head)
        lines += wrap_items(f"{' ' * INDENT}members ({len(members)}):", members or ["-"], width,
                            indent=INDENT + 2)
        lines += wrap_items(f"{' ' * INDENT}live:", job_metrics_text(j).split("  "), width, "  ",
                            indent=INDENT + 2)
        if fetching := job_fetches(meta, j["job"]):
            lines += wrap_items(f"{' ' * INDENT}fetching:", fetching, width, indent=INDENT + 2)
        if j.get("error"):
            lines += wrap_items(f"{' ' * INDENT}error:", str(j["error"]).split(), width, " ",
                                indent=INDENT + 2)
        texts = [Text(x) for x in lines]
        texts[0].stylize("bold", 0, len(j["job"]))
        out += texts
    if pulls := job_fetches(meta, None):
        out += [Text(x) for x in wrap_items("fetching:", pulls, width)]
    if meta.get("roles"):
        out += [Text(x) for x in wrap_items("roles held here:",
                                            [role_text(r, job=True) for r in meta["roles"]], width)]
    return out
