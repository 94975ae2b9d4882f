"""Dashboard rendering from fixed snapshots, at 80 and 160 columns."""

from __future__ import annotations

import pytest
from rich.console import Console

from p2pllm.cli.dashboard import History, render, sparkline

SNAP = {
    "node": {
        "name": "alpha", "node_id": "a1" * 16, "address": "127.0.0.1:7411", "state": "up",
        "device": "cpu", "mem_free": 20 * 2**30, "mem_total": 24 * 2**30, "mem_used_by_roles": 512 * 2**20,
        "compute_score": 42.5, "models": [{"name": "tinystories-656k"}],
        "roles": [{"job": "split-1", "rid": "shard-0", "role": "shard", "summary": "layers 0-1"}],
    },
    "peers": [
        {
            "name": "bravo", "node_id": "b2" * 16, "address": "127.0.0.1:7412", "state": "up",
            "device": "cuda", "mem_free": 8 * 2**30, "mem_used_by_roles": 0, "compute_score": 900.0,
            "rtt_ms": 0.42, "throughput_mbps": 1234.0, "bytes_in": 5 * 2**20, "bytes_out": 3 * 2**10,
            "roles": [{"job": "spec-2", "rid": "verifier", "role": "verifier", "summary": "target 110M"}],
            "models": [],
        },
        {
            "name": "charlie", "node_id": "c3" * 16, "address": "127.0.0.1:7413", "state": "down",
            "device": "mps", "rtt_ms": None, "roles": [], "models": [],
        },
    ],
    "jobs": [
        {
            "job": "spec-2", "pillar": "spec", "state": "running", "started": 2.0,
            "members": [{"node_id": "b2" * 16, "rid": "verifier", "role": "verifier", "summary": ""},
                        {"node_id": "a1" * 16, "rid": "drafter", "role": "drafter", "summary": ""}],
            "metrics": {"tokens_per_s": 55.5, "acceptance_rate": 0.71, "tokens_per_round": 3.2},
        },
        {
            "job": "split-1", "pillar": "split", "state": "running", "started": 1.0,
            "members": [{"node_id": "a1" * 16, "rid": "shard-0", "role": "shard", "summary": "layers 0-1"}],
            "metrics": {"tokens_per_s": 12.0, "shard_busy": {"shard-0": 0.8, "shard-1": 0.35}},
        },
        {
            "job": "fl-3", "pillar": "fl", "state": "done", "started": 0.5, "members": [],
            "metrics": {"round": 3, "clients_answered": 3, "eval_loss": 2.25},
        },
        {
            "job": "train-4", "pillar": "train", "state": "failed", "started": 0.1, "members": [],
            "metrics": {"step": 7, "loss": 3.5, "bubble": 0.2},
        },
    ],
}


def draw(width: int, snaps: int = 3) -> str:
    history = History()
    for i in range(snaps):
        snap = {**SNAP, "jobs": [{**j, "metrics": {**j["metrics"], "tokens_per_s": 10.0 * (i + 1)}} if j["pillar"] == "spec" else j for j in SNAP["jobs"]]}
        history.update(snap)
    console = Console(record=True, width=width, height=24, color_system=None)
    console.print(render(snap, history, width))
    return console.export_text()


@pytest.mark.parametrize("width", [80, 160])
def test_dashboard_shows_peers_links_jobs_and_metrics(width: int) -> None:
    raw = draw(width)
    assert all(len(line) <= width for line in raw.splitlines())
    out = " ".join(raw.split())  # cells may wrap at 80 columns
    for needle in ("alpha *", "bravo", "charlie", "down", "cuda", "shard[layers 0-1]", "verifier",
                   "0.42", "1234", "5.0M", "spec-2", "split-1", "fl-3", "train-4",
                   "accept 71%", "tok/round 3.2", "busy shard-0:80%", "round 3", "eval loss 2.25",
                   "loss 3.5", "bubble 20%", "failed", "net in 5.0M"):
        assert needle in out, f"{needle!r} missing at width {width}:\n{raw}"
    if width >= 120:
        assert "127.0.0.1:7412" in out and "tinystories-656k" in out
        assert sparkline([10.0, 20.0, 30.0]) in out


def test_80_columns_fits_24_rows() -> None:
    assert len(draw(80).rstrip("\n").splitlines()) <= 24


def test_sparkline_scales_to_max() -> None:
    assert sparkline([0, 1, 2, 4]) == "▁▃▅█"
    assert sparkline([]) == ""
    assert sparkline([0, 0]) == "▁▁"


def test_measured_bubble_with_the_theory_beside_it_and_role_worker_busy() -> None:
    train = {"job": "train-5", "pillar": "train", "state": "running", "started": 3.0, "members": [],
             "metrics": {"step": 2, "loss": 3.1, "bubble": 0.62, "bubble_theory": 0.5}}
    node = {**SNAP["node"], "roles": [{"job": "split-1", "rid": "shard-0", "role": "shard",
                                       "summary": "layers 0-1",
                                       "metrics": {"worker": {"busy": 0.37, "busy_s": 1.5}}}]}
    snap = {**SNAP, "node": node, "jobs": [train]}
    console = Console(record=True, width=160, height=24, color_system=None)
    console.print(render(snap, History(), 160))
    out = " ".join(console.export_text().split())
    assert "bubble 62% (theory 50%)" in out
    assert "shard[layers 0-1] busy 37%" in out


async def test_split_shard_busy_from_the_pipeline_reaches_the_jobs_table() -> None:
    """The figures the split coordinator publishes (each shard's reported worker busy
    fraction) land in the job's metrics through the state reducer and render live; before
    any shard reported one there is no busy figure (and no empty one)."""
    from types import SimpleNamespace

    from p2pllm.daemon import state as ev
    from p2pllm.pillars.split.pipeline import Pipeline, SplitRequest, Stage

    s = ev.apply(ev.State(node=ev.NodeInfo("alpha", "a1" * 16, "", {})),
                 ev.JobStarted("split-9", "split", "a1" * 16, 1.0))

    class Job:
        id = "split-9"

        def update(self, **metrics: object) -> None:
            nonlocal s
            s = ev.apply(s, ev.JobUpdated(self.id, metrics))

    stages = [Stage(i, "a1" * 16, "alpha", f"shard-{i}", 2 * i, 2 * i + 2, 0, "m") for i in (0, 1)]
    pipe = Pipeline(SimpleNamespace(host=None), ("k",), None, stages,  # type: ignore[arg-type]
                    SplitRequest(model="m"))
    pipe.job = Job()  # type: ignore[assignment]

    def busy_text() -> str:
        snap = {**SNAP, "jobs": ev.snapshot(s, 2.0)["jobs"]}
        console = Console(record=True, width=160, height=24, color_system=None)
        console.print(render(snap, History(), 160))
        line = next(x for x in console.export_text().splitlines() if "split-9" in x)
        return " ".join(line.split())

    pipe.publish()
    assert "shard_busy" not in s.jobs["split-9"]["metrics"] and "busy" not in busy_text()
    pipe.note_busy(0, {"session": "x", "busy": 0.4267})  # shard 0 opening a session
    pipe.note_busy(1, {"busy": True})  # not a fraction: ignored
    pipe.publish()
    assert s.jobs["split-9"]["metrics"]["shard_busy"] == {"shard-0": 0.4267}
    assert "busy shard-0:43%" in busy_text()
    pipe.note_busy(1, {"steps": 30, "busy": 1.0})  # shard 1's stats closing it
    pipe.note_busy(0, {"steps": 30, "busy": 0.05})
    pipe.publish()
    assert "busy shard-0:5% shard-1:100%" in busy_text()
