"""Daemons for a benchmark run: p2pllmd children on loopback, started and stopped by the run,
with their peak RSS read from /proc (VmHWM, reset through clear_refs), and the STATUS calls
that tell how many nodes a cluster has up."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def free_ports(n: int) -> list[int]:
    """``n`` loopback TCP ports free right now (bound, read, released: for daemons that must
    know each other's ports before they start, e.g. ``--peer`` of one another)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class StartedDaemon:
    """A p2pllmd child on loopback (port 0, read back from its --print-port line)."""

    def __init__(self, name: str, threads: int, cores: set[int] | None, flags: list[str],
                 log_dir: Path) -> None:
        self.name = name
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "p2pllm.cli.p2pllmd", "--name", name, "--host", "127.0.0.1",
               "--port", "0", "--print-port", "--no-mdns", "--threads", str(threads),
               "--log-level", "WARNING", *flags]
        self.log = open(log_dir / f"{name}.log", "w")  # closed in stop()
        pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, preexec_fn=pin)
        self.address = ""

    def wait(self, timeout: float = 120.0) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            if line.startswith("PORT "):
                self.address = f"127.0.0.1:{line.split()[1]}"
                return
            if time.monotonic() > deadline:
                break
        raise RuntimeError(f"daemon {self.name} did not start (log: {self.log.name})")

    def reset_peak(self) -> bool:
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def peak_rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()


async def status_of(address: str, secret_file: str | None) -> dict[str, Any]:
    from p2pllm.cli.client import open_daemon
    from p2pllm.wire.messages import MsgType

    conn = await open_daemon(address, secret_file)
    try:
        return (await conn.request(MsgType.STATUS, {}, timeout=10)).meta
    finally:
        conn.close()


def nodes_up(snap: dict[str, Any]) -> int:
    return 1 + sum(p.get("state") == "up" for p in snap.get("peers", []))


async def start_cluster(n: int, threads: int, flags: list[str], log_dir: Path,
                        tag: str) -> list[StartedDaemon]:
    """`n` daemons, the others peered with the first, pinned to distinct cores when n > 1 and
    the machine has enough; returns once every one sees all the others up."""
    cores = sorted(os.sched_getaffinity(0))
    ds: list[StartedDaemon] = []

    def pin(i: int) -> set[int] | None:
        if n == 1 or len(cores) < n * threads:
            return None
        return {cores[i * threads + k] for k in range(threads)}

    try:
        first = StartedDaemon(f"{tag}0", threads, pin(0), flags, log_dir)
        ds.append(first)
        first.wait()
        for i in range(1, n):
            ds.append(StartedDaemon(f"{tag}{i}", threads, pin(i),
                                    [*flags, "--peer", first.address], log_dir))
        for d in ds[1:]:
            d.wait()
        deadline = time.monotonic() + 60
        while True:
            ups = [nodes_up(await status_of(d.address, None)) for d in ds]
            if all(u == n for u in ups):
                return ds
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemons did not all connect: {ups} of {n}")
            await asyncio.sleep(0.2)
    except BaseException:
        for d in ds:
            d.stop()
        raise
