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
from hypothesis import settings

# Property tests draw their examples from a seed fixed per test (derandomize), so a run passes
# or fails the same way every time; HYPOTHESIS_PROFILE=explore draws fresh examples each run
# (what to do when hunting for new counterexamples).
settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

REPO = Path(__file__).resolve().parents[1]
# The shared checkout beside the repository holds real models with README reference ids. It is
# optional: P2PLLM_SHARED points the tests elsewhere (P2PLLM_SHARED=/nonexistent runs the suite
# the way a fresh clone without it does). Tests that need a real model but not a particular
# one ask for real_model(name) and run on a bundled stand-in when it is absent; only the tests
# of a shared model's own reference ids (shared_model) skip, with SHARED_SKIP as the reason.
SHARED = Path(os.environ.get("P2PLLM_SHARED") or REPO.parent / "shared").resolve()
SHARED_MODELS = SHARED / "models"
BUNDLED_MODELS = REPO / "p2pllm" / "models"
BUNDLED = BUNDLED_MODELS / "shakespeare"  # target: 4 layers, vocab 2048, tied embeddings
BUNDLED_DRAFT = BUNDLED_MODELS / "shakespeare-draft"  # its draft: same tokenizer, 2 layers
# Every skip for a missing shared model starts with this; in CI it is the only allowed skip
# reason, and only while the shared checkout is absent (see pytest_runtest_makereport).
SHARED_SKIP = "needs the shared checkout"


def has_shared_model(name: str) -> bool:
    return (SHARED_MODELS / name / "config.json").is_file()


def shared_model(name: str) -> Path:
    """The path of a shared model; skips (with SHARED_SKIP) when it is absent."""
    path = SHARED_MODELS / name
    if not (path / "config.json").is_file():
        pytest.skip(f"{SHARED_SKIP}: shared model {path} is not present")
    return path


# The bundled stand-in of each shared model, for tests that need a real trained model of about
# that shape but not its reference ids: shakespeare-draft is, like tinystories-656k, 2 layers of
# 128 with a 2048-token BPE vocabulary; shakespeare has 4 layers for splitting (stories-260k: 5).
STAND_INS = {"tinystories-656k": BUNDLED_DRAFT, "stories-260k": BUNDLED}


def bench_module(name: str) -> Any:
    """bench/<name>.py imported as a module (bench/ is not a package), once per session."""
    import importlib.util

    key = f"bench_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod
    spec.loader.exec_module(mod)
    return mod


def real_model(name: str) -> Path:
    """The shared model ``name`` when the shared checkout has it, else its bundled stand-in
    (STAND_INS): a test that asks for it runs either way, never skips."""
    return SHARED_MODELS / name if has_shared_model(name) else STAND_INS[name]


def models_dir_args(*dirs: Path | str) -> list[str]:
    """``--models-dir`` flags for ``dirs`` and for the folders their top-level links point
    into: a daemon reads models only inside its roots (issue 12), so a link out of them is
    refused unless its target's folder is a root too (the bundled models always are)."""
    roots: list[str] = []

    def add(d: Path) -> None:
        if str(d) not in roots and not str(d.resolve()).startswith(str(BUNDLED_MODELS.resolve())):
            roots.append(str(d))

    for d in map(Path, dirs):
        add(d)
        for link in sorted(d.iterdir()) if d.is_dir() else ():
            if link.is_symlink():
                add(link.resolve().parent)
    return [x for r in roots for x in ("--models-dir", r)]


def model_arg(path: Path) -> list[str]:
    """``--models-dir`` flags for a daemon that is asked for the model at ``path`` (its
    folder; nothing for a bundled model): a path a request names must lie inside a root."""
    return models_dir_args(path.parent) if path.parent.resolve() != BUNDLED_MODELS.resolve() else []


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build the native kernels once, up front (~1 min the first time on a machine): the
    daemons the tests start then load the cached build instead of each compiling it inside
    a test's time limit."""
    from p2pllm.engine import native

    t0 = time.monotonic()
    built = native.kernels() is not None
    if time.monotonic() - t0 > 5:
        print(f"\nnative kernels {'built' if built else 'NOT built'} in "
              f"{time.monotonic() - t0:.0f} s", file=sys.stderr)


def _allowed_skip(reason: str) -> bool:
    """In CI a skip is expected only for a shared model while the whole shared checkout is
    absent; a missing model inside a present checkout, or any other reason, is a failure."""
    return SHARED_SKIP in reason and not SHARED_MODELS.is_dir()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """With CI=true an unexpected skip fails the test instead of passing silently."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") != "true" or not report.skipped or hasattr(report, "wasxfail"):
        return
    _fail_unexpected_skip(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """The same for a whole module skipped while it is collected."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped:
        _fail_unexpected_skip(report)


def _fail_unexpected_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    if not _allowed_skip(reason):
        report.outcome = "failed"
        report.longrepr = f"unexpected skip in CI (CI=true): {reason}"


class DaemonProc:
    """A p2pllmd child process. `port` and `node_id` are read from its --print-port line."""

    def __init__(self, name: str, args: list[str], log_dir: Path, threads: int = 1) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "w")
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
        if "--state-dir" not in args:  # never the user's ~/.local/state (fetched models land there)
            args = [*args, "--state-dir", str(log_dir / f"{name}-state")]
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


async def open_peer(address: str, secret_file: str | None = None, name: str = "test-peer") -> Any:
    """A handshaken Connection to a daemon as kind "peer" (a test acting as another daemon: a
    hand-made coordinator; protocol.md 4.4 lets only peers ASSIGN and send role frames).
    Requests the daemon sends it (keepalive aside) are answered with an empty ACK."""
    import uuid

    from p2pllm.cli.client import read_secret
    from p2pllm.config import parse_hostport
    from p2pllm.net.auth import client_handshake
    from p2pllm.wire.connection import connect
    from p2pllm.wire.frame import Limits

    async def ack(conn: Any, req: Any) -> None:
        return None

    host, port = parse_hostport(address)
    conn = await connect(host, port, ack, limits=Limits(max_payload=1 << 32), name=name, timeout=10)
    try:
        await client_handshake(conn, node_id=f"{name}-{uuid.uuid4().hex[:12]}", name=name, kind="peer",
                               port=0, secret=read_secret(secret_file))
    except BaseException:
        conn.close()
        raise
    return conn


@pytest.fixture
async def peer() -> AsyncIterator[Any]:
    """Factory: await peer(port) -> a Connection to that daemon as kind "peer" (open_peer),
    closed at teardown (its daemon then releases the roles it assigned)."""
    conns = []

    async def open_(port: int, secret_file: str | None = None):
        conn = await open_peer(f"127.0.0.1:{port}", secret_file)
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
