"""Experiment logs (issue 17 item 4): `--log-to DIR` and `--wandb PROJECT` on `fl run`,
`train split` and `bench matrix`.

A :class:`RunLog` makes ``DIR/<run-id>/`` with ``config.json`` (the run's kind, id, start time
and config), ``metrics.jsonl`` (one JSON object a line, flushed as it is written, each with
``t``, the Unix time it was logged: a train step, an FL round, a matrix cell, and the other
events the daemon streams) and, when the run ends, ``summary.json`` (the final result, or the
error). With ``--wandb PROJECT`` the same config, the numeric fields of each line and the
summary go to Weights & Biases too: ``wandb`` is imported only then (it is not a dependency),
runs offline (``WANDB_MODE=offline``) unless the user set WANDB_MODE, and keeps its files
under the run's folder (wandb makes ``DIR/<run-id>/wandb/``).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TextIO, TypeVar

T = TypeVar("T")


class RunLogError(Exception):
    """The log cannot be started (a missing wandb, --wandb without --log-to, an unwritable DIR)."""


def add_log_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-to", metavar="DIR", default=None,
                   help="write the run's config and per-step/round metrics as JSONL under "
                        "DIR/<run-id>/")
    p.add_argument("--wandb", metavar="PROJECT", default=None,
                   help="also send them to Weights & Biases project PROJECT (needs "
                        "`pip install wandb` and --log-to; offline unless WANDB_MODE is set)")


def open_runlog(args: argparse.Namespace, kind: str, config: dict[str, Any]) -> RunLog | None:
    """The run's log from ``--log-to``/``--wandb`` (None without --log-to)."""
    log_to, project = getattr(args, "log_to", None), getattr(args, "wandb", None)
    if log_to is None:
        if project is not None:
            raise RunLogError("--wandb needs --log-to DIR (wandb's files go under it)")
        return None
    return RunLog(log_to, kind, config, wandb_project=project)


def _jsonable(value: Any) -> str:
    return json.dumps(value, default=str, separators=(",", ":"))


def scalars(rec: dict[str, Any], prefix: str = "") -> dict[str, float | int | bool | str]:
    """The numbers, booleans and strings of ``rec``, nested dicts flattened with "/" (what a
    wandb chart can show; lists and None are left out)."""
    out: dict[str, float | int | bool | str] = {}
    for k, v in rec.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= scalars(v, key + "/")
        elif isinstance(v, bool | int | float | str):
            out[key] = v
    return out


class _WandbSink:
    def __init__(self, project: str, run_id: str, kind: str, config: dict[str, Any],
                 folder: Path) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise RunLogError(f"--wandb needs the wandb package: pip install wandb ({exc})"
                              ) from exc
        os.environ.setdefault("WANDB_MODE", "offline")
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=run_id, id=run_id, job_type=kind,
                              config=config, dir=str(folder))

    def log(self, rec: dict[str, Any], step: int | None) -> None:
        data = scalars(rec)
        if step is None:
            self.run.log(data)
        else:
            self.run.log(data, step=step)

    def finish(self, summary: dict[str, Any], failed: bool) -> None:
        for k, v in scalars(summary).items():
            self.run.summary[k] = v
        self.run.finish(exit_code=1 if failed else 0)


async def noting_errors(coro: Coroutine[Any, Any, T], log: RunLog | None) -> T:
    """Await ``coro``; an exception it raises is kept as ``log.error`` (for summary.json)
    and raised on."""
    try:
        return await coro
    except BaseException as exc:
        if log is not None:
            log.error = f"{type(exc).__name__}: {exc}"
        raise


class RunLog:
    """``RunLog(dir, kind, config)``: one run's folder under ``dir`` (see the module doc)."""

    def __init__(self, root: str | Path, kind: str, config: dict[str, Any], *,
                 wandb_project: str | None = None, run_id: str | None = None) -> None:
        self.kind = kind
        self.run_id = run_id or (f"{kind}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-"
                                 f"{secrets.token_hex(3)}")
        self.path = Path(root).expanduser() / self.run_id
        try:
            self.path.mkdir(parents=True, exist_ok=False)
            (self.path / "config.json").write_text(json.dumps(
                {"kind": kind, "run_id": self.run_id, "started": time.time(), "config": config},
                default=str, indent=1) + "\n")
            self._fh: TextIO | None = open(self.path / "metrics.jsonl", "w")
        except OSError as exc:
            raise RunLogError(f"--log-to: {exc}") from exc
        self._wandb: _WandbSink | None = None
        self.lines = 0
        self.error: str | None = None
        if wandb_project is not None:
            try:
                self._wandb = _WandbSink(wandb_project, self.run_id, kind, config, self.path)
            except BaseException:
                self.close()
                raise

    def log(self, rec: dict[str, Any], step: int | None = None) -> None:
        """One line of metrics.jsonl (``t`` added), written and flushed now; wandb gets its
        scalars at ``step``."""
        if self._fh is None:
            raise RunLogError("the run log is closed")
        self._fh.write(_jsonable({"t": time.time(), **rec}) + "\n")
        self._fh.flush()
        self.lines += 1
        if self._wandb is not None:
            self._wandb.log(rec, step)

    def finish(self, summary: dict[str, Any] | None = None, error: str | None = None) -> None:
        """Write summary.json (the result, or the error) and close; idempotent."""
        if self._fh is None:
            return
        body = {"ended": time.time(), "ok": error is None, "error": error, "lines": self.lines,
                "result": summary}
        (self.path / "summary.json").write_text(json.dumps(body, default=str, indent=1) + "\n")
        wandb, self._wandb = self._wandb, None
        self.close()
        if wandb is not None:
            wandb.finish(summary or {}, error is not None)

    def close(self) -> None:
        """Close without a summary (wandb, if open, is told the run failed)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        wandb, self._wandb = self._wandb, None
        if wandb is not None:
            wandb.finish({}, True)
