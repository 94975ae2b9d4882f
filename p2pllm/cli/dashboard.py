"""`p2pllm dash`: a rich live view of the cluster, fed by state snapshots.

`render(snapshot, history)` is a pure function of a STATUS snapshot (and the sparkline history
kept by the caller); the live loop subscribes to snapshots (SUBSCRIBE) and never reaches into
roles. It fits an 80x24 terminal (tables collapse their least important columns) and uses a
wider one for more columns.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections import deque
from collections.abc import Iterator
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

SPARK = "▁▂▃▄▅▆▇█"
HISTORY = 40


def sparkline(values: list[float], width: int = 20) -> str:
    vals = [v for v in values if v is not None][-width:]
    if not vals:
        return ""
    hi = max(vals)
    if hi <= 0:
        return SPARK[0] * len(vals)
    return "".join(SPARK[min(len(SPARK) - 1, int(v / hi * (len(SPARK) - 1) + 0.5))] for v in vals)


def _mem(n: Any) -> str:
    if not isinstance(n, int | float):
        return "-"
    if n >= 2**30:
        return f"{n / 2**30:.1f}G"
    return f"{n / 2**20:.0f}M"


def _bytes(n: Any) -> str:
    if not isinstance(n, int | float):
        return "-"
    for unit, scale in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{int(n)}B"


def _num(v: Any, fmt: str = "{:.3g}") -> str:
    if isinstance(v, bool) or v is None:
        return "-"
    if isinstance(v, int | float):
        return fmt.format(v)
    return str(v)


def worker_busy(role: dict[str, Any]) -> float | None:
    """The busy fraction of a role's worker thread (recent window), if the role reported it."""
    busy = (role.get("metrics") or {}).get("worker", {}).get("busy")
    return float(busy) if isinstance(busy, int | float) and not isinstance(busy, bool) else None


def role_text(r: dict[str, Any], job: bool = False) -> str:
    """``kind[summary]`` (``@job``), and ``busy N%`` when its worker's figures are known."""
    s = r.get("role", "?")
    if r.get("summary"):
        s += f"[{r['summary']}]"
    if job and r.get("job"):
        s += f"@{r['job']}"
    busy = worker_busy(r)
    if busy is not None:
        s += f" busy {busy:.0%}"
    return s


def _roles_text(roles: list[dict[str, Any]]) -> str:
    return ", ".join(role_text(r) for r in roles) or "-"


class History:
    """Per-job series for sparklines, fed one snapshot at a time."""

    def __init__(self) -> None:
        self.series: dict[str, deque[float]] = {}

    def update(self, snap: dict[str, Any]) -> None:
        for job in snap.get("jobs", []):
            m = job.get("metrics", {})
            v = m.get("tokens_per_s")
            if v is None:
                v = m.get("loss", m.get("eval_loss"))
            if isinstance(v, int | float):
                self.series.setdefault(job["job"], deque(maxlen=HISTORY)).append(float(v))

    def get(self, job: str) -> list[float]:
        return list(self.series.get(job, ()))


def peers_table(snap: dict[str, Any], wide: bool) -> Table:
    t = Table(title="peers", box=None, expand=True, title_justify="left", pad_edge=False, title_style="bold")
    t.add_column("name", no_wrap=True, ratio=2)
    t.add_column("state", no_wrap=True)
    t.add_column("dev", no_wrap=True)
    t.add_column("mem used/free", no_wrap=True)
    t.add_column("score", no_wrap=True, justify="right")
    t.add_column("roles", ratio=3, overflow="fold")
    if wide:
        t.add_column("node id", no_wrap=True)
        t.add_column("address", no_wrap=True)
        t.add_column("models", ratio=2, overflow="fold")
    node = snap["node"]
    rows = [(node, True)] + [(p, False) for p in snap.get("peers", [])]
    for p, me in rows:
        state = p.get("state", "?")
        style = {"up": "green", "down": "red"}.get(state, "yellow")
        cells: list[RenderableType] = [
            Text(p["name"] + (" *" if me else "")),
            Text(state, style=style),
            str(p.get("device", "-")),
            f"{_mem(p.get('mem_used_by_roles'))}/{_mem(p.get('mem_free'))}",
            _num(p.get("compute_score"), "{:.1f}"),
            Text(_roles_text(p.get("roles", []))),
        ]
        if wide:
            cells += [
                p["node_id"][:12],
                p.get("address", "-"),
                Text(", ".join(m["name"] for m in p.get("models", [])) or "-"),
            ]
        t.add_row(*cells)
    return t


def links_table(snap: dict[str, Any], wide: bool) -> Table:
    t = Table(title="links", box=None, expand=True, title_justify="left", pad_edge=False, title_style="bold")
    t.add_column("peer", no_wrap=True)
    t.add_column("rtt ms", justify="right", no_wrap=True)
    t.add_column("MB/s", justify="right", no_wrap=True)
    t.add_column("in", justify="right", no_wrap=True)
    t.add_column("out", justify="right", no_wrap=True)
    for p in snap.get("peers", []):
        t.add_row(
            p["name"],
            _num(p.get("rtt_ms"), "{:.2f}"),
            _num(p.get("throughput_mbps"), "{:.0f}"),
            _bytes(p.get("bytes_in")),
            _bytes(p.get("bytes_out")),
        )
    return t


def job_metrics_text(job: dict[str, Any]) -> str:
    """The key live figures of one job, by pillar."""
    m = job.get("metrics", {})
    pillar = job.get("pillar")
    keys: tuple[tuple[str, str], ...]
    if pillar == "spec":
        keys = (("tokens_per_s", "tok/s"), ("acceptance_rate", "accept"), ("tokens_per_round", "tok/round"), ("draft_tokens", "γ"))
    elif pillar == "split":
        keys = (("tokens_per_s", "tok/s"), ("sessions", "sessions"), ("shard_busy", "busy"))
    elif pillar == "fl":
        keys = (("round", "round"), ("clients_answered", "clients"), ("eval_loss", "eval loss"), ("train_loss", "train loss"))
    elif pillar in ("train", "splittrain"):
        # bubble: measured on the stages' workers; bubble_theory: (K-1)/(M+K-1), shown beside it
        keys = (("step", "step"), ("loss", "loss"), ("bubble", "bubble"),
                ("bubble_theory", "(theory"), ("step_seconds", "s/step"))
    else:
        keys = tuple((k, k) for k in list(m)[:4])
    parts = []
    for key, label in keys:
        if key in m:
            v = m[key]
            if isinstance(v, dict):
                v = " ".join(f"{k}:{_num(x, '{:.0%}') if isinstance(x, float) and x <= 1 else _num(x)}" for k, x in v.items())
            elif isinstance(v, float) and key in ("acceptance_rate", "bubble", "bubble_theory"):
                v = f"{v:.0%}"
            else:
                v = _num(v)
            parts.append(f"{label} {v})" if label.startswith("(") else f"{label} {v}")
    return "  ".join(parts) or "-"


def jobs_table(snap: dict[str, Any], history: History, wide: bool) -> Table:
    t = Table(title="jobs", box=None, expand=True, title_justify="left", pad_edge=False, title_style="bold")
    t.add_column("job", no_wrap=True)
    t.add_column("state", no_wrap=True)
    t.add_column("members", ratio=2, overflow="fold")
    t.add_column("live", ratio=3, overflow="fold")
    if wide:
        t.add_column("trend", no_wrap=True)
    names = {snap["node"]["node_id"]: snap["node"]["name"]}
    names.update({p["node_id"]: p["name"] for p in snap.get("peers", [])})
    jobs = sorted(snap.get("jobs", []), key=lambda j: (j["state"] != "running", -j.get("started", 0)))
    for j in jobs[:6]:
        members = ", ".join(
            f"{names.get(m['node_id'], m['node_id'][:6])}:{m['role']}"
            + (f"[{m['summary']}]" if m.get("summary") else "")
            for m in j.get("members", [])
        )
        style = {"running": "green", "failed": "red", "stopped": "yellow"}.get(j["state"], "")
        cells: list[RenderableType] = [
            j["job"],
            Text(j["state"], style=style),
            Text(members or "-"),
            Text(job_metrics_text(j)),
        ]
        if wide:
            cells.append(sparkline(history.get(j["job"])))
        t.add_row(*cells)
    return t


def render(snap: dict[str, Any], history: History | None = None, width: int = 80) -> RenderableType:
    """The whole dashboard for one snapshot (pure)."""
    history = history or History()
    wide = width >= 120
    node = snap["node"]
    total_in = sum(p.get("bytes_in") or 0 for p in snap.get("peers", []))
    total_out = sum(p.get("bytes_out") or 0 for p in snap.get("peers", []))
    up = sum(1 for p in snap.get("peers", []) if p.get("state") == "up")
    header = Text.assemble(
        ("p2pllm ", "bold"),
        (f"{node['name']} ", "bold cyan"),
        f"({node['node_id'][:8]}) {node.get('address', '')}  ",
        f"peers up {up}/{len(snap.get('peers', []))}  ",
        f"net in {_bytes(total_in)} out {_bytes(total_out)}",
        ("  q quits" if wide else "", "dim"),
    )
    parts: list[RenderableType] = [header, peers_table(snap, wide)]
    if wide:
        grid = Table.grid(expand=True, padding=(0, 3))
        grid.add_column(ratio=1)
        grid.add_column(ratio=2)
        grid.add_row(links_table(snap, wide), jobs_table(snap, history, wide))
        parts.append(grid)
    else:
        parts += [links_table(snap, wide), jobs_table(snap, history, wide)]
    return Group(*parts)


# -- live loop ------------------------------------------------------------------------------


@contextlib.contextmanager
def _cbreak() -> Iterator[bool]:
    """Put stdin in cbreak mode (keys arrive unbuffered) when it is a terminal; restore after."""
    if not sys.stdin.isatty():
        yield False
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


async def _live(snapshots: Any, console: Console, refresh: float) -> None:
    """Render snapshots from an async iterator until it ends or `q` is pressed."""
    history = History()
    quit_ = asyncio.Event()
    loop = asyncio.get_running_loop()
    with _cbreak() as keys, Live(console=console, screen=True, auto_refresh=False, transient=False) as live:
        if keys:

            def on_key() -> None:
                ch = os.read(sys.stdin.fileno(), 1)
                if ch in (b"q", b"Q", b"\x03"):
                    quit_.set()

            loop.add_reader(sys.stdin.fileno(), on_key)
        try:
            async for snap in snapshots:
                history.update(snap)
                live.update(render(snap, history, console.width), refresh=True)
                if quit_.is_set():
                    break
        finally:
            if keys:
                loop.remove_reader(sys.stdin.fileno())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--daemon", metavar="HOST:PORT", help="daemon to watch (default 127.0.0.1:7411)")
    p.add_argument("--secret-file", help="shared secret file, if the cluster uses one")
    p.add_argument("--interval", type=float, default=0.25, help="seconds between refreshes (default 0.25)")
    p.add_argument("--once", action="store_true", help="print one frame and exit (no live view)")


def run(args: argparse.Namespace) -> int:
    from p2pllm.cli.client import DaemonUnavailable, open_daemon
    from p2pllm.wire.connection import ConnectionClosed, RemoteError
    from p2pllm.wire.messages import MsgType

    console = Console()

    async def main() -> None:
        conn = await open_daemon(args.daemon, args.secret_file)
        try:
            if args.once:
                snap = (await conn.request(MsgType.STATUS, {}, timeout=10)).meta
                console.print(render(snap, None, console.width))
                return

            async def snaps() -> Any:
                async for frame in conn.stream(MsgType.SUBSCRIBE, {"interval": args.interval}):
                    yield frame.meta

            await _live(snaps(), console, args.interval)
        finally:
            conn.close()

    try:
        asyncio.run(main())
    except (DaemonUnavailable, RemoteError) as exc:
        print(f"p2pllm: {exc}", file=sys.stderr)
        return 2
    except ConnectionClosed as exc:
        print(f"p2pllm: lost the daemon: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


async def run_dashboard_inline(daemon: Any, interval: float = 0.25) -> None:
    """`p2pllmd --dashboard`: the same view, read from the daemon in this process."""

    async def snaps() -> Any:
        while True:
            yield daemon.snapshot()
            await asyncio.sleep(interval)

    await _live(snaps(), Console(), interval)


__all__ = ["History", "render", "role_text", "run", "run_dashboard_inline", "sparkline",
           "worker_busy"]
