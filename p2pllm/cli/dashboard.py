"""`p2pllm dash`: a rich live view of the cluster, fed by state snapshots.

`render(snapshot, history)` is a pure function of a STATUS snapshot (and the sparkline history
kept by the caller); the live loop subscribes to snapshots (SUBSCRIBE) and never reaches into
roles. It fits an 80x24 terminal and uses a wider one for more detail: one line per node and
per job with the essentials, its lists (models, roles, members, figures) wrapped under it
between items, so names are never cut and no cell folds to a few characters a line.

Size: over 400 lines because the line layout (``wrap_items``, ``table_rows``, ``node_lines``)
lives here with the figures it lays out, and ``ctl status``/``ctl jobs`` print the same lines.
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


def sparkline(values: list[float], width: int = 20, top: float | None = None) -> str:
    """The last ``width`` values as blocks scaled to ``top`` (their max when not given; a
    fraction passes ``top=1`` so that 10% reads low however flat the series)."""
    vals = [v for v in values if v is not None][-width:]
    if not vals:
        return ""
    hi = max(vals) if top is None else top
    if hi <= 0:
        return SPARK[0] * len(vals)
    return "".join(SPARK[max(0, min(len(SPARK) - 1, int(v / hi * (len(SPARK) - 1) + 0.5)))] for v in vals)


def _real(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


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


def node_fetches(p: dict[str, Any]) -> list[dict[str, Any]]:
    """A node's running fetches of model pieces (its caps' ``fetches``; a peer's are its
    word: entries that are not maps with a model name are left out)."""
    got = p.get("fetches")
    return [f for f in got if isinstance(f, dict) and isinstance(f.get("model"), str)] \
        if isinstance(got, list) else []


def fetch_text(f: dict[str, Any]) -> str:
    """``model done/total pct from source``: one fetch in progress."""
    done, total = _real(f.get("done_bytes")), _real(f.get("total_bytes"))
    pct = f" {done / total:.0%}" if done is not None and total else ""
    src = f" from {f['source']}" if isinstance(f.get("source"), str) and f["source"] else ""
    return f"{f['model']} {_bytes(done)}/{_bytes(total)}{pct}{src}"


def job_fetches(snap: dict[str, Any], job: str | None) -> list[str]:
    """``node: fetch`` of every running fetch in the snapshot's nodes for ``job`` (None: those
    of no job listed, e.g. `p2pllm models fetch`'s pulls)."""
    nodes = ([snap["node"]] if "node" in snap else []) + list(snap.get("peers", []))
    jobs = {j.get("job") for j in snap.get("jobs", [])}
    return [f"{p.get('name', '?')}: {fetch_text(f)}" for p in nodes for f in node_fetches(p)
            if (f.get("job") == job if job is not None else f.get("job") not in jobs)]


class History:
    """Series for sparklines, fed one snapshot at a time: per job its tok/s (or loss); per
    link (peer node id) its measured RTT and throughput; per role (node id, job, rid) its
    worker's busy fraction; per split job and shard the busy fraction the shard reported."""

    def __init__(self) -> None:
        self.series: dict[str, deque[float]] = {}
        self.trends: dict[tuple[str, ...], deque[float]] = {}

    def _add(self, key: tuple[str, ...], v: Any) -> None:
        if (x := _real(v)) is not None:
            self.trends.setdefault(key, deque(maxlen=HISTORY)).append(x)

    def update(self, snap: dict[str, Any]) -> None:
        for job in snap.get("jobs", []):
            m = live_metrics(job)
            v = m.get("tokens_per_s")
            if v is None:
                v = m.get("loss", m.get("eval_loss"))
            if isinstance(v, int | float):
                self.series.setdefault(job["job"], deque(maxlen=HISTORY)).append(float(v))
            busy = m.get("shard_busy")
            for rid, b in (busy.items() if isinstance(busy, dict) else ()):
                self._add(("shard", job["job"], str(rid)), b)
        for p in snap.get("peers", []):
            self._add(("rtt", p["node_id"]), p.get("rtt_ms"))
            self._add(("mbps", p["node_id"]), p.get("throughput_mbps"))
        for p in [snap["node"], *snap.get("peers", [])]:
            for r in p.get("roles", []):
                self._add(("busy", p["node_id"], str(r.get("job")), str(r.get("rid"))), worker_busy(r))

    def get(self, job: str) -> list[float]:
        return list(self.series.get(job, ()))

    def trend(self, *key: str) -> list[float]:
        """A link's ("rtt"|"mbps", node id), a role's ("busy", node id, job, rid) or a split
        shard's ("shard", job, rid) series, oldest first."""
        return list(self.trends.get(key, ()))


# -- line layout: one line per node with the essentials, its lists wrapped under it item by
# item, so that names are never cut and no cell folds to a few characters a line.

INDENT = 4
WIDE = 100  # wider than this, a node's id and address join its first line


def wrap_items(head: str, items: list[str], width: int, sep: str = ", ",
               indent: int = INDENT) -> list[str]:
    """``head`` then ``items`` joined by ``sep``, broken between items so that no line is over
    ``width``; continuation lines are indented by ``indent``; only an item wider than a whole
    line is folded."""
    width = max(width, indent + 20)
    pad, joiner, tail = " " * indent, sep[len(sep.rstrip()):], sep.rstrip()
    lines: list[str] = []
    cur, empty = head, True
    for i, item in enumerate(items):
        piece = item + (tail if i < len(items) - 1 else "")
        gap = (" " if cur.strip() else "") if empty else joiner
        if cur.strip() and len(cur) + len(gap) + len(piece) > width:
            lines.append(cur)
            cur = pad + piece
        else:
            cur += gap + piece
        empty = False
        while len(cur) > width:
            lines.append(cur[:width])
            cur = pad + cur[width:]
    lines.append(cur)
    return [line.rstrip() for line in lines]


def table_rows(rows: list[list[str]], width: int) -> list[list[str]]:
    """Each row's fields as aligned columns on one line, or wrapped when that line is too wide."""
    cols = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))] if rows else []
    out = []
    for r in rows:
        line = "  ".join(f.ljust(w) for f, w in zip(r, cols, strict=True)).rstrip()
        out.append([line] if len(line) <= width else wrap_items("", r, width, sep="  "))
    return out


def node_lines(snap: dict[str, Any], width: int, detail: bool,
               history: History | None = None) -> list[Text]:
    """Every node: name, state, device, memory and score on its first line (the node id and
    address too when wider than WIDE), then its roles (with ``history``, each role's busy
    sparkline after its busy figure); with ``detail`` also its id and address (under the first
    line when narrow) and its models."""
    wide = width > WIDE
    nodes = [(snap["node"], True)] + [(p, False) for p in snap.get("peers", [])]
    fields = []
    for p, me in nodes:
        f = [p["name"] + (" *" if me else ""), str(p.get("state", "?")), str(p.get("device", "-")),
             f"mem {_mem(p.get('mem_used_by_roles'))}/{_mem(p.get('mem_free'))}",
             f"score {_num(p.get('compute_score'), '{:.1f}')}"]
        fields.append([*f, p["node_id"][:12], p.get("address") or "-"] if wide else f)
    out: list[Text] = []
    pad = " " * INDENT
    for (p, _), head in zip(nodes, table_rows(fields, width), strict=True):
        lines = list(head)
        if detail and not wide:
            lines += wrap_items(pad, [p["node_id"][:12], p.get("address") or "-"], width, "  ")
        models = [m["name"] for m in p.get("models", [])]
        if detail or wide:
            lines += wrap_items(f"{pad}models ({len(models)}):", models or ["-"], width,
                                indent=INDENT + 2)
        roles = [role_text(r, job=detail) for r in p.get("roles", [])]
        if history is not None:
            sparks = [sparkline(history.trend("busy", p["node_id"], str(r.get("job")), str(r.get("rid"))),
                                SPARK_W, top=1.0) for r in p.get("roles", [])]
            roles = [f"{t} {s}" if s else t for t, s in zip(roles, sparks, strict=True)]
        if detail or roles:
            lines += wrap_items(f"{pad}roles ({len(roles)}):", roles or ["-"], width,
                                indent=INDENT + 2)
        fetches = [fetch_text(f) for f in node_fetches(p)]
        if fetches:
            lines += wrap_items(f"{pad}fetching ({len(fetches)}):", fetches, width,
                                indent=INDENT + 2)
        texts = [Text(x) for x in lines]
        texts[0].stylize("bold", 0, len(p["name"]))
        state = str(p.get("state", "?"))
        at = texts[0].plain.find(f"  {state}", len(p["name"]))
        if at >= 0:
            texts[0].stylize({"up": "green", "down": "red"}.get(state, "yellow"), at + 2, at + 2 + len(state))
        out += texts
    return out


SPARK_W = 8  # blocks per link/role/shard sparkline: the last 8 snapshots
JOBS_MIN = 60  # wide: the jobs sit right of the links when that leaves them this many columns


def links_table(snap: dict[str, Any], wide: bool, expand: bool = True,
                history: History | None = None) -> Table:
    """Each link's measured RTT and throughput (with ``history``, each followed by its
    sparkline over the last SPARK_W snapshots) and its bytes in and out."""
    peers = snap.get("peers", [])
    spark = {(k, p["node_id"]): sparkline(history.trend(k, p["node_id"]), SPARK_W)
             for p in peers for k in ("rtt", "mbps")} if history is not None else {}
    cols = [k for k in ("rtt", "mbps") if any(spark.get((k, p["node_id"])) for p in peers)]
    t = Table(title="links", box=None, expand=expand, title_justify="left", pad_edge=False, title_style="bold")
    t.add_column("peer", no_wrap=True)
    t.add_column("rtt ms", justify="right", no_wrap=True)
    if "rtt" in cols:
        t.add_column("", no_wrap=True, min_width=SPARK_W)
    t.add_column("MB/s", justify="right", no_wrap=True)
    if "mbps" in cols:
        t.add_column("", no_wrap=True, min_width=SPARK_W)
    t.add_column("in", justify="right", no_wrap=True)
    t.add_column("out", justify="right", no_wrap=True)
    for p in peers:
        rtt = [_num(p.get("rtt_ms"), "{:.2f}")] + ([spark[("rtt", p["node_id"])]] if "rtt" in cols else [])
        mbps = ([_num(p.get("throughput_mbps"), "{:.0f}")]
                + ([spark[("mbps", p["node_id"])]] if "mbps" in cols else []))
        t.add_row(p["name"], *rtt, *mbps, _bytes(p.get("bytes_in")), _bytes(p.get("bytes_out")))
    return t


def live_metrics(job: dict[str, Any]) -> dict[str, Any]:
    """A job's metrics with the live figures its pillar publishes under other names filled
    in: a split job's tok/s is its latest session's, its sessions those done (+ open); a
    spec job's tokens per round is its mean; fl rounds and train steps read "n/total"."""
    m = dict(job.get("metrics") or {})
    pillar = job.get("pillar")
    if pillar == "split":
        recent = [r for r in m.get("recent_sessions") or [] if isinstance(r, dict)]
        if "tokens_per_s" not in m and recent and isinstance(recent[-1].get("tokens_per_s"), int | float):
            m["tokens_per_s"] = recent[-1]["tokens_per_s"]
        if "sessions" not in m and ("sessions_active" in m or "sessions_done" in m):
            active = m.get("sessions_active") or 0
            m["sessions"] = f"{m.get('sessions_done', 0)}" + (f" (+{active} open)" if active else "")
    elif pillar == "spec":
        if "tokens_per_round" not in m and isinstance(m.get("mean_tokens_per_round"), int | float):
            m["tokens_per_round"] = m["mean_tokens_per_round"]
    total = {"fl": ("round", "rounds"), "train": ("step", "steps_total"),
             "splittrain": ("step", "steps_total")}.get(str(pillar))
    if total and isinstance(m.get(total[0]), int) and isinstance(m.get(total[1]), int):
        m[total[0]] = f"{m[total[0]]}/{m[total[1]]}"
    return m


def job_metrics_text(job: dict[str, Any]) -> str:
    """The key live figures of one job, by pillar."""
    m = live_metrics(job)
    pillar = job.get("pillar")
    keys: tuple[tuple[str, str], ...]
    if pillar == "spec":
        keys = (("tokens_per_s", "tok/s"), ("tokens", "tokens"), ("rounds", "rounds"),
                ("acceptance_rate", "accept"), ("tokens_per_round", "tok/round"), ("draft_tokens", "γ"))
    elif pillar == "split":
        keys = (("tokens_per_s", "tok/s"), ("sessions", "sessions"), ("shard_busy", "busy"),
                ("tokens", "tokens"))
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
        if key in m and m[key] is not None:
            v = m[key]
            if isinstance(v, dict):
                v = " ".join(f"{k}:{_num(x, '{:.0%}') if isinstance(x, float) and x <= 1 else _num(x)}" for k, x in v.items())
            elif isinstance(v, float) and key in ("acceptance_rate", "bubble", "bubble_theory"):
                v = f"{v:.0%}"
            else:
                v = _num(v)
            parts.append(f"{label} {v})" if label.startswith("(") else f"{label} {v}")
    return "  ".join(parts) or "-"


def job_lines(snap: dict[str, Any], history: History, width: int, trend: bool) -> list[Text]:
    """The latest jobs (running first): id, state and live figures (and the trend) on one line,
    wrapped between figures; its members under it."""
    names = {snap["node"]["node_id"]: snap["node"]["name"]}
    names.update({p["node_id"]: p["name"] for p in snap.get("peers", [])})
    jobs = sorted(snap.get("jobs", []), key=lambda j: (j["state"] != "running", -j.get("started", 0)))[:6]
    out = [Text("jobs", style="bold")] + ([] if jobs else [Text("-")])
    jw = max((len(j["job"]) for j in jobs), default=0)
    sw = max((len(j["state"]) for j in jobs), default=0)
    for j in jobs:
        head = f"{j['job'].ljust(jw)}  {j['state'].ljust(sw)} "
        figures = job_metrics_text(j).split("  ")
        spark = sparkline(history.get(j["job"])) if trend else ""
        busy = (live_metrics(j).get("shard_busy") or {}) if trend else {}
        shards = [f"{rid} {s}" for rid in (busy if isinstance(busy, dict) else {})
                  if (s := sparkline(history.trend("shard", j["job"], str(rid)), SPARK_W, top=1.0))]
        if shards:  # each shard's busy trend, one figure (kept whole by the wrap)
            figures.append("busy trend " + " ".join(shards))
        lines = wrap_items(head, figures + ([spark] if spark else []), width, "  ",
                           indent=min(len(head) + 1, width // 2))
        members = [f"{names.get(m['node_id'], m['node_id'][:6])}:{m['role']}"
                   + (f"[{m['summary']}]" if m.get("summary") else "") for m in j.get("members", [])]
        if members:
            lines += wrap_items(" " * INDENT + "on", members, width, indent=INDENT + 2)
        if fetching := job_fetches(snap, j["job"]):
            lines += wrap_items(" " * INDENT + "fetching", fetching, width, indent=INDENT + 2)
        texts = [Text(x) for x in lines]
        style = {"running": "green", "failed": "red", "stopped": "yellow"}.get(j["state"], "")
        if style:
            texts[0].stylize(style, jw + 2, jw + 2 + len(j["state"]))
        out += texts
    if pulls := job_fetches(snap, None):
        out += [Text(x) for x in wrap_items("fetching", pulls, width, indent=INDENT)]
    return out


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
    parts: list[RenderableType] = [header, Text("peers", style="bold"),
                                   *node_lines(snap, width, detail=False, history=history)]
    links = links_table(snap, wide, expand=False, history=history) if wide else None
    gap = 3
    rest = width - Console(width=width).measure(links).maximum - gap if links is not None else 0
    if links is not None and rest < JOBS_MIN:  # long names and sparklines: links above the jobs
        parts += [links, *job_lines(snap, history, width, trend=True)]
    elif links is not None:
        grid = Table.grid(expand=True, padding=(0, gap))
        grid.add_column()  # the links at their natural width, the jobs take the rest
        grid.add_column(ratio=1)
        grid.add_row(links, Group(*job_lines(snap, history, rest, trend=True)))
        parts.append(grid)
    else:
        parts += [links_table(snap, wide, history=history), *job_lines(snap, history, width, trend=False)]
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


__all__ = ["History", "fetch_text", "job_fetches", "node_fetches", "render", "role_text", "run",
           "run_dashboard_inline", "sparkline", "worker_busy"]
