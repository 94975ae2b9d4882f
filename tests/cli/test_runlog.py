"""Experiment logs (issue 17 item 4): RunLog's folder (config.json, metrics.jsonl flushed per
line, summary.json), the wandb sink through a fake ``wandb`` module (wandb is optional and not
installed here; a skip would fail CI), `fl run`'s event handler, and real runs of
`train split --log-to` (2 steps over two daemons) and `bench matrix --log-to --wandb`."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from p2pllm.cli.fl import log_event
from p2pllm.cli.main import main
from p2pllm.lab.runlog import RunLog, RunLogError, open_runlog, scalars
from tests.conftest import BUNDLED, REPO
from tests.e2e.test_splittrain import all_up, start_cluster


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run_dir(root: Path) -> Path:
    [d] = [p for p in root.iterdir() if p.is_dir()]
    return d


class FakeRun:
    def __init__(self, calls: list[tuple[str, Any]]) -> None:
        self.calls, self.summary = calls, {}

    def log(self, data: dict[str, Any], step: int | None = None) -> None:
        self.calls.append(("log", (data, step)))

    def finish(self, exit_code: int = 0) -> None:
        self.calls.append(("finish", exit_code))


def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """A ``wandb`` module in sys.modules that records init/log/finish; returns the calls."""
    calls: list[tuple[str, Any]] = []
    mod = types.ModuleType("wandb")

    def init(**kw: Any) -> FakeRun:
        calls.append(("init", kw))
        return FakeRun(calls)

    mod.init = init  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return calls


# -- RunLog ---------------------------------------------------------------------------------------


def test_runlog_writes_config_lines_flushed_per_line_and_summary(tmp_path: Path) -> None:
    log = RunLog(tmp_path / "logs", "train-split", {"steps": 2, "lr": 1e-3})
    assert log.path.parent == tmp_path / "logs" and log.run_id.startswith("train-split-")
    cfg = json.loads((log.path / "config.json").read_text())
    assert cfg["kind"] == "train-split" and cfg["config"] == {"steps": 2, "lr": 1e-3}
    log.log({"event": "step", "step": 0, "loss": 4.5}, step=0)
    # readable before the next line or the end: flushed per line
    [first] = _lines(log.path / "metrics.jsonl")
    assert first["loss"] == 4.5 and first["step"] == 0 and first["t"] >= cfg["started"]
    log.log({"event": "step", "step": 1, "loss": 3.0, "path": Path("/x")}, step=1)
    lines = _lines(log.path / "metrics.jsonl")
    assert [x["step"] for x in lines] == [0, 1] and lines[1]["path"] == "/x"
    assert lines[0]["t"] <= lines[1]["t"]
    assert not (log.path / "summary.json").exists()
    log.finish({"losses": [4.5, 3.0]})
    summary = json.loads((log.path / "summary.json").read_text())
    assert summary["ok"] and summary["lines"] == 2 and summary["result"]["losses"] == [4.5, 3.0]
    log.finish({"other": 1})  # idempotent: the first summary stays
    assert json.loads((log.path / "summary.json").read_text())["result"] == {"losses": [4.5, 3.0]}
    with pytest.raises(RunLogError, match="closed"):
        log.log({"step": 2})
    # a second run in the same second gets its own folder
    other = RunLog(tmp_path / "logs", "train-split", {})
    assert other.path != log.path
    other.finish(None, "RemoteError: boom")
    assert json.loads((other.path / "summary.json").read_text())["error"] == "RemoteError: boom"


def test_open_runlog_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert open_runlog(argparse.Namespace(log_to=None, wandb=None), "x", {}) is None
    with pytest.raises(RunLogError, match="--wandb needs --log-to"):
        open_runlog(argparse.Namespace(log_to=None, wandb="proj"), "x", {})
    monkeypatch.setitem(sys.modules, "wandb", None)  # "not installed": import raises
    with pytest.raises(RunLogError, match="pip install wandb"):
        open_runlog(argparse.Namespace(log_to=str(tmp_path), wandb="proj"), "x", {})
    (tmp_path / "file").write_text("")
    with pytest.raises(RunLogError, match="--log-to"):
        RunLog(tmp_path / "file", "x", {})


def test_scalars_flattens_dicts_and_drops_lists() -> None:
    assert scalars({"a": 1, "b": {"c": 2.5, "d": None}, "e": [1], "f": "x", "g": True}) == {
        "a": 1, "b/c": 2.5, "f": "x", "g": True}


def test_wandb_sink_offline_under_the_log_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    calls = fake_wandb(monkeypatch)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    log = RunLog(tmp_path, "fl-run", {"rounds": 2}, wandb_project="lab")
    import os

    assert os.environ["WANDB_MODE"] == "offline"
    kind, kw = calls[0]
    assert kind == "init" and kw["project"] == "lab" and kw["config"] == {"rounds": 2}
    assert kw["dir"] == str(log.path)
    assert kw["name"] == log.run_id and kw["job_type"] == "fl-run"
    log.log({"event": "round", "round": 1, "eval_loss": 2.0, "clients": ["a"]}, step=1)
    log.finish({"final_eval_loss": 1.5})
    assert calls[1] == ("log", ({"event": "round", "round": 1, "eval_loss": 2.0}, 1))
    assert calls[2] == ("finish", 0)
    # the same line went to metrics.jsonl, and a user's WANDB_MODE is left alone
    assert _lines(log.path / "metrics.jsonl")[0]["clients"] == ["a"]
    monkeypatch.setenv("WANDB_MODE", "online")
    RunLog(tmp_path, "fl-run", {}, wandb_project="lab").close()
    assert os.environ["WANDB_MODE"] == "online" and calls[-1] == ("finish", 1)


def test_fl_events_become_round_lines(tmp_path: Path) -> None:
    log = RunLog(tmp_path, "fl-run", {})
    log_event(log, {"round": 0, "initial_eval_loss": 3.2, "clients": ["a", "b"]})
    for rnd in (1, 2):
        log_event(log, {"round": rnd, "record": {"round": rnd, "train_loss": 3.0 - rnd,
                                                 "eval_loss": 3.1 - rnd, "clients_asked": 2,
                                                 "clients_answered": 2}})
    log.finish({})
    lines = _lines(log.path / "metrics.jsonl")
    assert [x["event"] for x in lines] == ["initial_eval", "round", "round"]
    assert lines[0]["initial_eval_loss"] == 3.2
    assert [x["round"] for x in lines[1:]] == [1, 2] and lines[2]["eval_loss"] == pytest.approx(1.1)


# -- real runs ------------------------------------------------------------------------------------


async def test_train_split_log_to(daemons: Any, ctl: Any, tmp_path: Path) -> None:
    a, b = start_cluster(daemons, 2, tmp_path)
    await all_up(ctl, [a, b])
    (tmp_path / "s.txt").write_text("To be, or not to be, that is the question. " * 40)
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "p2pllm.cli.main", "train", "split", "--daemon", a.address,
           "--model", "shakespeare", "--data", str(tmp_path / "s.txt"), "--steps", "2",
           "--batch-size", "2", "--micro-batches", "1", "--seq-len", "16", "--stages", "2",
           "--json", "--log-to", str(logs)]
    proc = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True,
                                   timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    run = _run_dir(logs)
    assert json.loads((run / "config.json").read_text())["config"]["steps"] == 2
    lines = _lines(run / "metrics.jsonl")
    steps = [x for x in lines if x["event"] == "step"]
    assert [x["step"] for x in steps] == [0, 1]
    assert [x["loss"] for x in steps] == result["losses"]
    assert lines[0]["event"] == "plan" and len(lines[0]["stages"]) == 2
    assert json.loads((run / "summary.json").read_text())["result"]["losses"] == result["losses"]


def test_bench_matrix_log_to_and_wandb(daemons: Any, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_wandb(monkeypatch)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    d = daemons("solo", "--no-mdns")
    logs = tmp_path / "logs"
    rc = main(["bench", "matrix", "--daemon", d.address, "--model", str(BUNDLED),
               "--modes", "local", "--context", "8", "--batch", "1", "--new-tokens", "2",
               "--out", str(tmp_path / "out"), "--no-plots", "--log-to", str(logs),
               "--wandb", "lab"])
    assert rc == 0
    run = _run_dir(logs)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["kind"] == "bench-matrix" and cfg["config"]["config"]["contexts"] == [8]
    assert "machine" in cfg["config"] and "versions" in cfg["config"]
    [cell] = _lines(run / "metrics.jsonl")
    [rec] = _lines(tmp_path / "out" / "results.jsonl")
    assert cell["event"] == "cell" and cell["status"] == "ok" == rec["status"]
    assert cell["tokens_per_s"] == rec["tokens_per_s"] > 0 and "machine" not in cell
    assert [c[0] for c in calls] == ["init", "log", "finish"]
    assert calls[1][1][0]["tokens_per_s"] == rec["tokens_per_s"] and calls[1][1][1] == 0
    assert calls[0][1]["dir"].startswith(str(run))


def test_fl_run_cli_logs_each_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`fl run --log-to` from the CLI's parser to the log, its daemon replaced by a stream of
    the frames FL_RUN sends (a real FL cluster is tests/e2e/test_fl.py's, minutes long)."""
    import p2pllm.cli.fl as fl

    rec = {"round": 1, "clients_asked": 2, "clients_answered": 2, "train_loss": 2.0,
           "eval_loss": 2.5, "bytes_sent": 10, "bytes_received": 20, "seconds": 0.1}
    frames = [
        types.SimpleNamespace(is_partial=True, payload=b"",
                              meta={"round": 0, "initial_eval_loss": 3.0, "clients": ["a"]}),
        types.SimpleNamespace(is_partial=True, payload=b"", meta={"round": 1, "record": rec}),
        types.SimpleNamespace(is_partial=False, payload=b"",
                              meta={"rounds": [rec], "final_eval_loss": 2.5, "run_name": "r"}),
    ]
    sent: list[dict[str, Any]] = []

    class Conn:
        async def stream(self, msg_type: Any, meta: dict[str, Any]) -> Any:
            sent.append(meta)
            for f in frames:
                yield f

        def close(self) -> None:
            pass

    async def open_daemon(address: Any, secret_file: Any) -> Conn:
        return Conn()

    monkeypatch.setattr(fl, "open_daemon", open_daemon)
    logs = tmp_path / "logs"
    assert main(["fl", "run", "--model", "m", "--rounds", "1", "--log-to", str(logs)]) == 0
    assert "round 1: 2/2 clients" in capsys.readouterr().err  # still echoed
    run = _run_dir(logs)
    assert json.loads((run / "config.json").read_text())["config"] == sent[0] == {
        "model": "m", "rounds": 1}
    lines = _lines(run / "metrics.jsonl")
    assert [(x["event"], x["round"]) for x in lines] == [("initial_eval", 0), ("round", 1)]
    assert json.loads((run / "summary.json").read_text())["result"]["final_eval_loss"] == 2.5
    # The daemon goes away after the first round: the lines so far stay, the summary says why.
    frames[2:] = []

    class Gone(Conn):
        async def stream(self, msg_type: Any, meta: dict[str, Any]) -> Any:
            for f in frames:
                yield f
            raise TimeoutError("no answer in 600s")

    async def open_gone(address: Any, secret_file: Any) -> Conn:
        return Gone()

    monkeypatch.setattr(fl, "open_daemon", open_gone)
    assert main(["fl", "run", "--model", "m", "--log-to", str(tmp_path / "gone")]) == 1
    run = _run_dir(tmp_path / "gone")
    assert len(_lines(run / "metrics.jsonl")) == 2
    summary = json.loads((run / "summary.json").read_text())
    assert not summary["ok"] and summary["error"] == "TimeoutError: no answer in 600s"
