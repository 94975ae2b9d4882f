"""`ctl status`, `ctl jobs` and the dashboard at 80 and 120 columns and piped (issue 17, item 3):
every line fits, node and model names appear whole, and every running job shows live figures."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
from io import StringIO
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from p2pllm.cli.ctl import render_jobs, render_status
from p2pllm.cli.dashboard import History, job_metrics_text, render, wrap_items
from tests.conftest import REPO, wait_for

A, B, C = "a1" * 16, "b2" * 16, "c3" * 16
NAMES = ("dashboard-host-with-a-long-name", "gpu-box-in-the-basement-rack-2", "laptop-of-someone-on-wifi")
MODELS = ("tinystories-656k", "smollm2-135m-instruct", "smollm2-360m-instruct", "tinystories-33m")


@functools.cache
def _split_published() -> dict[str, Any]:
    return asyncio.run(_publish())


def _split_metrics() -> dict[str, Any]:
    """What a split pipeline publishes after three sessions (one more open), taken from a real
    Pipeline's ``publish`` so the keys are the ones the pillar sends."""
    return dict(_split_published())


async def _publish() -> dict[str, Any]:
    from p2pllm.daemon import state as ev
    from p2pllm.pillars.split.pipeline import Pipeline, SplitRequest, Stage

    s = ev.apply(ev.State(node=ev.NodeInfo(A, NAMES[0], "", {})), ev.JobStarted("split-1a2b3c4d", "split", A, 1.0))

    class Job:
        id = "split-1a2b3c4d"

        def update(self, **metrics: object) -> None:
            nonlocal s
            s = ev.apply(s, ev.JobUpdated(self.id, metrics))

    stages = [Stage(0, A, NAMES[0], "shard-0", 0, 14, 0, "m"), Stage(1, B, NAMES[1], "shard-1", 14, 32, 0, "m")]
    pipe = Pipeline(SimpleNamespace(host=None), ("k",), None, stages,  # type: ignore[arg-type]
                    SplitRequest(model="m"))
    pipe.job = Job()  # type: ignore[assignment]
    pipe.sessions_done, pipe.active, pipe.tokens_total = 3, 1, 412
    pipe.recent.append({"session": "x", "tokens": 128, "time_to_first_token_s": 0.2, "tokens_per_s": 18.4})
    pipe.note_busy(0, {"busy": 0.8})
    pipe.note_busy(1, {"busy": 0.35})
    pipe.publish()
    return dict(s.jobs["split-1a2b3c4d"]["metrics"])


def snapshot() -> dict[str, Any]:
    split_roles = [{"job": "split-1a2b3c4d", "rid": f"shard-{i}", "role": "shard",
                    "summary": f"layers {lo}-{hi} of smollm2-360m-instruct"} for i, (lo, hi) in enumerate(((0, 13), (14, 31)))]
    node = {"name": NAMES[0], "node_id": A, "address": "192.168.100.101:7411", "state": "up", "device": "cpu",
            "mem_free": 20 * 2**30, "mem_used_by_roles": 512 * 2**20, "compute_score": 42.5,
            "models": [{"name": m} for m in MODELS],
            "roles": [{**split_roles[0], "metrics": {"worker": {"busy": 0.37}}},
                      {"job": "spec-9f8e7d6c", "rid": "drafter", "role": "drafter", "summary": "draft smollm2-135m-instruct"}]}
    peers = [
        {"name": NAMES[1], "node_id": B, "address": "192.168.100.102:7411", "state": "up", "device": "cuda",
         "mem_free": 70 * 2**30, "mem_used_by_roles": 3 * 2**30, "compute_score": 900.0, "rtt_ms": 0.42,
         "throughput_mbps": 1234.0, "bytes_in": 5 * 2**20, "bytes_out": 3 * 2**10,
         "roles": [split_roles[1], {"job": "spec-9f8e7d6c", "rid": "verifier", "role": "verifier",
                                    "summary": "target smollm2-360m-instruct"}],
         "models": [{"name": m} for m in MODELS[1:3]]},
        {"name": NAMES[2], "node_id": C, "address": "192.168.100.103:7411", "state": "down", "device": "mps",
         "rtt_ms": None, "roles": [], "models": [{"name": MODELS[0]}]},
    ]
    jobs = [
        {"job": "split-1a2b3c4d", "pillar": "split", "coordinator": A, "state": "running", "started": 1.0,
         "members": [{"node_id": A, "rid": "shard-0", "role": "shard", "summary": "layers 0-13"},
                     {"node_id": B, "rid": "shard-1", "role": "shard", "summary": "layers 14-31"}],
         "metrics": _split_metrics()},
        # mid-generation: the spec coordinator has published tokens, rounds and acceptance so far
        {"job": "spec-9f8e7d6c", "pillar": "spec", "coordinator": A, "state": "running", "started": 2.0,
         "members": [{"node_id": B, "rid": "verifier", "role": "verifier", "summary": ""},
                     {"node_id": A, "rid": "drafter", "role": "drafter", "summary": ""}],
         "metrics": {"tokens": 57, "rounds": 19, "acceptance_rate": 0.71}},
    ]
    return {"node": node, "peers": peers, "jobs": jobs, "time": 3.0}


def check_readable(out: str, width: int, models: bool = True) -> None:
    lines = out.splitlines()
    assert all(len(x) <= width for x in lines), "\n".join(x for x in lines if len(x) > width)
    assert "…" not in out and "\x1b" not in out  # nothing cut, no escape codes in a pipe
    for name in NAMES:  # each node name whole at the start of its own line
        assert any(x.startswith(name) for x in lines), f"{name} not whole:\n{out}"
    for m in MODELS if models else ():
        assert any(m in x for x in lines), f"{m} not whole:\n{out}"
    # no cell folded to a few characters a line: every non-blank line carries a word of 4+
    assert all(max(map(len, x.split())) >= 4 for x in lines if x.strip()), out


def ctl_text(width: int | None) -> str:
    f = StringIO()
    console = Console(file=f) if width is None else Console(file=f, width=width)
    render_status(console, snapshot())
    render_jobs(console, {"jobs": [], "roles": snapshot()["node"]["roles"], **snapshot()})
    return f.getvalue()


@pytest.mark.parametrize("width", [80, 120])
def test_ctl_status_and_jobs_fit_with_whole_names(width: int) -> None:
    out = ctl_text(width)
    check_readable(out, width)
    joined = " ".join(out.split())
    assert "shard[layers 0-13 of smollm2-360m-instruct]@split-1a2b3c4d busy 37%" in joined
    assert "192.168.100.102:7411" in out and "b2b2b2b2b2b2" in out
    assert f"{NAMES[1]}:shard[layers 14-31]" in out  # a member whole on one line
    assert "tok/s 18.4" in out and "sessions 3 (+1 open)" in joined and "busy shard-0:80% shard-1:35%" in out
    assert "tokens 57" in out and "rounds 19" in out and "accept 71%" in out
    if width > 100:  # one line per node: name, state, device, memory, score, id, address
        line = next(x for x in out.splitlines() if x.startswith(NAMES[1]))
        assert "cuda" in line and "900.0" in line and "192.168.100.102:7411" in line


def test_ctl_piped_is_plain_80_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    out = ctl_text(None)  # a Console on a file: what `ctl status | less` gets
    check_readable(out, 80)
    # a script finds a node's state on its name's line
    line = next(x for x in out.splitlines() if x.startswith(NAMES[2]))
    assert line.split()[1:3] == ["down", "mps"]


@pytest.mark.parametrize("width", [80, 120])
def test_dashboard_fits_with_whole_names_and_live_figures_for_every_running_job(width: int) -> None:
    history = History()
    history.update(snapshot())
    console = Console(record=True, width=width, height=40, color_system=None)
    console.print(render(snapshot(), history, width))
    out = console.export_text()
    check_readable(out, width, models=width > 100)
    for job in ("split-1a2b3c4d", "spec-9f8e7d6c"):
        line = next(x for x in out.splitlines() if job in x)
        words = line[line.index(job):].split()  # at 120 the links sit left of the jobs
        assert words[1] == "running" and len(words) > 3 and words[2] != "-", line  # figures
    assert "tok/s 18.4" in out and "tokens 57" in out and "rounds 19" in out
    assert "busy shard-0:80% shard-1:35%" in out


def test_every_pillar_shows_its_live_figures() -> None:
    def text(pillar: str, **metrics: Any) -> str:
        return job_metrics_text({"pillar": pillar, "metrics": metrics})

    assert text("split", **_split_metrics()) == (
        "tok/s 18.4  sessions 3 (+1 open)  busy shard-0:80% shard-1:35%  tokens 412")
    assert text("split", sessions_active=0, sessions_done=0, tokens=0, recent_sessions=[]) == "sessions 0  tokens 0"
    assert text("spec", tokens=57, rounds=19, acceptance_rate=0.71) == "tokens 57  rounds 19  accept 71%"
    assert "tok/round 3.2" in text("spec", tokens_per_s=30.0, mean_tokens_per_round=3.2)
    assert text("fl", round=2, rounds=5, clients_answered=3, eval_loss=None) == "round 2/5  clients 3"
    assert text("splittrain", step=4, steps_total=10, loss=3.25, bubble=None) == "step 4/10  loss 3.25"


def test_wrap_items_breaks_between_items_and_folds_only_a_too_long_one() -> None:
    assert wrap_items("models:", ["aaaa", "bbbb", "cccc", "dddd"], 24) == ["models: aaaa, bbbb,", "    cccc, dddd"]
    assert wrap_items("", ["job-1", "running", "started 10:00"], 24, "  ") == ["job-1  running", "    started 10:00"]
    assert wrap_items("x:", ["y" * 30], 24) == ["x:", "    " + "y" * 20, "    " + "y" * 10]
    assert all(len(x) <= 24 for x in wrap_items("x:", ["y" * 30], 24))


async def test_ctl_status_piped_from_real_daemons(daemons, ctl) -> None:
    """Two daemons with long names; `p2pllm ctl status` through a pipe, as a script runs it."""
    a = daemons(NAMES[0], "--no-mdns", "--keepalive-timeout", "2")
    b = daemons(NAMES[1], "--no-mdns", "--peer", a.address, "--keepalive-timeout", "2")

    async def up() -> bool:
        conn = await ctl(a.port)
        from p2pllm.wire.messages import MsgType
        snap = (await conn.request(MsgType.STATUS, {}, timeout=10)).meta
        return any(p["node_id"] == b.node_id and p["state"] == "up" for p in snap["peers"])

    await wait_for(up, timeout=20, what="peer up")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}

    def cli(*args: str) -> str:
        res = subprocess.run([sys.executable, "-m", "p2pllm.cli.main", "ctl", *args, "--daemon", a.address],
                             capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
        assert res.returncode == 0, res.stderr
        return res.stdout

    snap, out = json.loads(cli("status", "--json")), cli("status")
    lines = out.splitlines()
    assert all(len(x) <= 80 for x in lines) and "…" not in out and "\x1b" not in out, out
    for name in NAMES[:2]:
        assert any(x.startswith(name) for x in lines), out
    for m in snap["node"].get("models", []):
        assert m["name"] in out, out
    assert "jobs" in cli("jobs")
