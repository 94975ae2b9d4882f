"""GET /metrics of real p2pllmd processes (--metrics 127.0.0.1:0) while a split job on the
bundled shakespeare model runs over two of them: the text parses, the job and its shards show,
role busy seconds grow with work; the listener's limits (404/405, a huge or slow request is cut
off); a non-loopback --metrics without a secret exits 2."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from p2pllm.cli.client import open_daemon
from p2pllm.daemon.httpd import READ_TIMEOUT
from p2pllm.wire.messages import MsgType
from tests.conftest import REPO, DaemonProc, wait_for
from tests.e2e.test_split import all_connected, free_ports, generate

FAST = ("--no-mdns", "--keepalive-timeout", "2")


def metrics_address(d: DaemonProc) -> str:
    """The METRICS line --print-port writes after the PORT line."""
    assert d.proc.stdout is not None
    line = d.proc.stdout.readline()
    assert line.startswith("METRICS 127.0.0.1:"), line
    return line.split()[1]


def scrape(address: str) -> dict[str, list[Any]]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    out: dict[str, list[Any]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Any:
    root = tmp_path_factory.mktemp("metrics")
    ports = free_ports(2)
    procs = [DaemonProc(name, [*FAST, "--port", str(port), "--metrics", "127.0.0.1:0",
                               *(x for p in ports if p != port for x in ("--peer", f"127.0.0.1:{p}"))],
                        root)
             for name, port in zip(("a", "b"), ports, strict=True)]
    for d in procs:
        d.wait_ready()
    addrs = [metrics_address(d) for d in procs]
    asyncio.run(all_connected(procs))
    yield list(zip(procs, addrs, strict=True))
    for d in procs:
        d.stop()


def busy_of(m: dict[str, list[Any]], job: str) -> float:
    return sum(s.value for s in m.get("p2pllm_role_busy_seconds_total", []) if s.labels["job"] == job)


async def test_a_split_job_shows_and_its_busy_seconds_grow(pair) -> None:
    (a, a_addr), (b, b_addr) = pair
    before = scrape(a_addr)
    assert [s.value for s in before["p2pllm_peers"] if s.labels["state"] == "up"] == [1]
    _, res = await generate(a.port, model="shakespeare", prompt="ROMEO:", max_tokens=40,
                            shards=2, keep_alive=60)
    job = res["job"]
    assert res["generated_tokens"] == 40

    def shown() -> Any:  # role metrics are published every 0.5 s
        m = scrape(a_addr)
        return m if busy_of(m, job) > 0 and any(
            s.labels["job"] == job for s in m.get("p2pllm_shard_busy_ratio", [])) else None

    m1 = await wait_for(shown, timeout=10, what="the split job's role busy time and shard busy")
    states = {s.labels["state"] for s in m1["p2pllm_job_state"] if s.labels["job"] == job}
    assert states == {"running"}  # kept alive
    assert {s.labels["pillar"] for s in m1["p2pllm_job_state"] if s.labels["job"] == job} == {"split"}
    assert [s.value for s in m1["p2pllm_jobs"] if s.labels["state"] == "running"] == [1]
    assert all(0 <= s.value <= 1 for s in m1["p2pllm_shard_busy_ratio"])
    assert {s.labels["role"] for s in m1["p2pllm_role_busy_seconds_total"]
            if s.labels["job"] == job} == {"shard"}
    tokens1 = [s.value for s in m1["p2pllm_job_tokens_total"] if s.labels["job"] == job]
    assert tokens1 and tokens1[0] >= 40
    assert m1["p2pllm_sent_bytes_total"][0].value > 0 and m1["p2pllm_received_bytes_total"][0].value > 0
    assert m1["p2pllm_roles_memory_bytes"][0].value > 0
    # b holds the other shard: its own endpoint shows it, busy
    await wait_for(lambda: busy_of(scrape(b_addr), job) > 0, timeout=10, what="b's shard busy time")

    # more work on the same kept-alive pipeline: busy seconds grow
    _, res2 = await generate(a.port, model="shakespeare", prompt="JULIET:", max_tokens=60,
                             shards=2, keep_alive=60)
    assert res2["job"] == job
    await wait_for(lambda: busy_of(scrape(a_addr), job) > busy_of(m1, job), timeout=10,
                   what="busy seconds to grow with a second generation")
    rtts = scrape(a_addr).get("p2pllm_peer_rtt_seconds", [])
    assert len(rtts) == 1 and 0 < rtts[0].value < 1


async def test_a_spec_job_shows_its_round_times(pair) -> None:
    (a, a_addr), _ = pair
    meta = {"mode": "spec", "prompt": "ROMEO:", "model": "shakespeare",
            "draft_model": "shakespeare-draft", "max_tokens": 32}
    conn = await open_daemon(a.address)
    try:
        result: dict[str, Any] = {}
        async for frame in conn.stream(MsgType.GENERATE, meta, idle_timeout=120):
            if not frame.is_partial:
                result = frame.meta
    finally:
        conn.close()
    assert result["mode"] == "spec" and result["rounds"] > 0

    def spec_job() -> Any:
        m = scrape(a_addr)
        jobs = {s.labels["job"] for s in m.get("p2pllm_spec_rounds_total", [])
                if s.value == result["rounds"]}
        return (m, jobs) if jobs else None

    m, jobs = await wait_for(spec_job, timeout=10, what="the spec job's rounds in /metrics")
    job = jobs.pop()
    assert {s.labels["pillar"] for s in m["p2pllm_job_state"] if s.labels["job"] == job} == {"spec"}
    for name in ("p2pllm_spec_draft_seconds_total", "p2pllm_spec_verify_seconds_total"):
        assert [s.value > 0 for s in m[name] if s.labels["job"] == job] == [True], name
    net = [s.value for s in m["p2pllm_spec_network_seconds_total"] if s.labels["job"] == job]
    assert len(net) == 1 and net[0] >= 0


def raw(address: str, data: bytes, wait: float = 10.0) -> tuple[bytes, float]:
    """Send `data`, read until the server closes; (what came back, seconds it took)."""
    host, port = address.rsplit(":", 1)
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(data)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    return got, time.monotonic() - t0


def is_400(response: bytes) -> bool:
    return re.match(rb"HTTP/1\.[01] 400 ", response) is not None


def test_only_get_metrics_is_served(pair) -> None:
    _, addr = pair[0]
    for path, method, code in (("/", "GET", 404), ("/metrics/x", "GET", 404),
                               ("/metrics", "POST", 405), ("/metrics", "DELETE", 405)):
        req = urllib.request.Request(f"http://{addr}{path}", method=method, data=b"" if method == "POST" else None)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == code, (path, method)
    got, _ = raw(addr, b"GARBAGE\r\n\r\n")
    assert is_400(got), got[:80]


def test_a_huge_request_is_refused(pair) -> None:
    _, addr = pair[0]
    got, _ = raw(addr, b"GET /metrics?" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert is_400(got), got[:80]
    headers = b"".join(b"X-%d: y\r\n" % i for i in range(100))
    got, _ = raw(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert is_400(got), got[:80]
    assert scrape(addr)["p2pllm_node_info"]  # still serving


def test_a_slow_request_is_cut_off(pair) -> None:
    _, addr = pair[0]
    host, port = addr.rsplit(":", 1)
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        closed_after = None
        while time.monotonic() - t0 < 25:
            s.sendall(b"X: y\r\n")  # a header now and then (slowloris)
            try:
                s.settimeout(1.0)
                if s.recv(4096) == b"":
                    closed_after = time.monotonic() - t0
                    break
            except TimeoutError:
                continue
            except ConnectionError:
                closed_after = time.monotonic() - t0
                break
    assert closed_after is not None and READ_TIMEOUT - 1 <= closed_after <= READ_TIMEOUT + 6, closed_after


@pytest.mark.parametrize("value", ["0.0.0.0:0", ":0"])
def test_a_non_loopback_metrics_bind_without_a_secret_exits_2(value: str, tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "p2pllm.cli.p2pllmd", "--no-mdns", "--port", "0",
                        "--state-dir", str(tmp_path), "--metrics", value],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2
    assert "needs a shared secret" in r.stderr and "--secret-file" in r.stderr
