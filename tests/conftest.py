"""Shared fixtures: real daemon processes on loopback, and a CLI-side connection to them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = REPO.parent / "shared" / "models"


def shared_model(name: str) -> Path:
    path = SHARED_MODELS / name
    if not (path / "config.json").exists():
        pytest.skip(f"shared model {path} is not present")
    return path


class DaemonProc:
    """A p2pllmd child process. `port` and `node_id` are read from its --print-port line."""

    def __init__(self, name: str, args: list[str], log_dir: Path, threads: int = 1) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "w")
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
        cmd = [
            sys.executable, "-m", "p2pllm.cli.p2pllmd",
            "--name", name, "--host", "127.0.0.1", "--port", "0", "--print-port",
            "--threads", str(threads), "--log-level", "DEBUG", *args,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, env=env, text=True)
        self.port = 0
        self.node_id = ""

    def wait_ready(self, timeout: float = 60.0) -> DaemonProc:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon {self.name} exited {self.proc.returncode}:\n{self.log()}")
                continue
            if line.startswith("PORT "):
                parts = line.split()
                self.port, self.node_id = int(parts[1]), parts[3]
                return self
        raise TimeoutError(f"daemon {self.name} not ready in {timeout}s:\n{self.log()}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Any]:
    """Factory: daemons(name, *flags) starts a p2pllmd; all are stopped at teardown."""
    started: list[DaemonProc] = []

    def start(name: str, *args: str, threads: int = 1, wait: bool = True) -> DaemonProc:
        d = DaemonProc(name, list(args), tmp_path, threads)
        started.append(d)
        return d.wait_ready() if wait else d

    start.all = started  # type: ignore[attr-defined]
    yield start
    for d in started:
        d.stop()


@pytest.fixture
async def ctl() -> AsyncIterator[Any]:
    """Factory: await ctl(port) -> a handshaken Connection to that daemon (closed at teardown)."""
    from p2pllm.cli.client import open_daemon

    conns = []

    async def open_(port: int, secret_file: str | None = None):
        conn = await open_daemon(f"127.0.0.1:{port}", secret_file)
        conns.append(conn)
        return conn

    yield open_
    for c in conns:
        c.close()


async def wait_for(predicate, timeout: float = 20.0, interval: float = 0.2, what: str = "condition"):
    """Poll an async or sync predicate until it returns a truthy value, or fail with `what`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value {last!r}")
