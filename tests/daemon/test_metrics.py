"""render_metrics (pure) parses as Prometheus text and carries every documented name; the
--metrics address rule (loopback unless a secret)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from p2pllm.config import ConfigError, DaemonConfig
from p2pllm.daemon.metrics import FAMILIES, render_metrics

README = Path(__file__).resolve().parents[2] / "README.md"


def snapshot() -> dict:
    """A STATUS-shaped snapshot with one of everything render_metrics reads."""
    worker = {"busy_s": 1.25, "idle_s": 3.5, "items": 7, "queued": 1, "busy": 0.3, "running": True}
    return {
        "node": {"node_id": "n1", "name": 'host "one"\\x', "mem_free": 1 << 30,
                 "mem_used_by_roles": 12345,
                 "roles": [{"job": "j1", "rid": "shard-0", "role": "shard", "metrics": {"worker": worker}},
                           {"job": "j2", "rid": "v", "role": "verifier", "metrics": {}}]},
        "peers": [{"node_id": "p1", "name": "b", "state": "up", "rtt_ms": 2.5,
                   "throughput_mbps": 100.0, "bytes_in": 1000, "bytes_out": 3000},
                  {"node_id": "p2", "name": "c\nd", "state": "down", "rtt_ms": None,
                   "bytes_in": 24, "bytes_out": 0}],
        "jobs": [{"job": "j1", "pillar": "split", "state": "running",
                  "metrics": {"tokens": 40, "shard_busy": {"shard-0": 0.5, "shard-1": 0.25}}},
                 {"job": "j2", "pillar": "spec", "state": "done",
                  "metrics": {"tokens": 12, "rounds": 4, "draft_s": 0.5, "verify_s": 0.75,
                              "network_s": 0.125}}],
        "time": 0.0,
    }


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_render_parses_and_carries_every_family_with_its_figures() -> None:
    text = render_metrics(snapshot())
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name, (typ, _) in FAMILIES.items():  # the parser drops a counter's _total
        key = name.removesuffix("_total") if typ == "counter" else name
        assert key in fams and fams[key].type == typ, name
    s = samples(text)
    role = frozenset({"job": "j1", "rid": "shard-0", "role": "shard"}.items())
    assert s["p2pllm_role_busy_seconds_total", role] == 1.25
    assert s["p2pllm_role_idle_seconds_total", role] == 3.5
    assert s["p2pllm_role_busy_ratio", role] == 0.3
    assert s["p2pllm_role_items_total", role] == 7
    assert not any(k[0].startswith("p2pllm_role_") and ("rid", "v") in k[1] for k in s)  # no worker
    assert s["p2pllm_shard_busy_ratio", frozenset({"job": "j1", "rid": "shard-1"}.items())] == 0.25
    j2 = frozenset({"job": "j2"}.items())
    assert (s["p2pllm_spec_rounds_total", j2], s["p2pllm_spec_draft_seconds_total", j2],
            s["p2pllm_spec_verify_seconds_total", j2], s["p2pllm_spec_network_seconds_total", j2]) \
        == (4, 0.5, 0.75, 0.125)
    assert s["p2pllm_jobs", frozenset({("state", "running")})] == 1
    assert s["p2pllm_jobs", frozenset({("state", "failed")})] == 0
    assert s["p2pllm_job_state", frozenset({"job": "j2", "pillar": "spec", "state": "done"}.items())] == 1
    p1 = frozenset({"peer": "p1", "name": "b"}.items())
    assert s["p2pllm_peer_rtt_seconds", p1] == 0.0025
    assert s["p2pllm_peer_throughput_bytes_per_second", p1] == 1e8
    assert s["p2pllm_peers", frozenset({("state", "up")})] == 1
    assert s["p2pllm_peer_up", frozenset({"peer": "p2", "name": "c\nd"}.items())] == 0  # escaped
    assert s["p2pllm_received_bytes_total", frozenset()] == 1024
    assert s["p2pllm_sent_bytes_total", frozenset()] == 3000
    assert s["p2pllm_roles_memory_bytes", frozenset()] == 12345
    assert s["p2pllm_node_info", frozenset({"node": "n1", "name": 'host "one"\\x'}.items())] == 1


def test_render_of_an_empty_snapshot_still_parses() -> None:
    text = render_metrics({"node": {}, "peers": [], "jobs": []})
    s = samples(text)
    assert s["p2pllm_jobs", frozenset({("state", "running")})] == 0
    assert not any(k[0] == "p2pllm_role_busy_seconds_total" for k in s)


def test_every_family_is_documented_in_the_readme() -> None:
    documented = set(re.findall(r"`(p2pllm_[a-z_]+)`", README.read_text()))
    assert set(FAMILIES) <= documented, sorted(set(FAMILIES) - documented)


@pytest.mark.parametrize("value,where", [
    (None, None), ("off", None), ("9464", ("127.0.0.1", 9464)), ("0", ("127.0.0.1", 0)),
    ("127.0.0.2:80", ("127.0.0.2", 80)), ("[::1]:9464", ("::1", 9464)), ("localhost:0", ("localhost", 0)),
])
def test_metrics_address(value: str | None, where: tuple[str, int] | None) -> None:
    assert DaemonConfig(metrics=value).metrics_address() == where


@pytest.mark.parametrize("value", ["0.0.0.0:9464", ":9464", "[::]:1", "192.0.2.1:9"])
def test_a_non_loopback_metrics_bind_needs_a_secret(value: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs a shared secret"):
        DaemonConfig(metrics=value)
    secret = tmp_path / "s"
    secret.write_text("x" * 64)
    DaemonConfig(metrics=value, secret_file=str(secret), host="0.0.0.0")


@pytest.mark.parametrize("value", ["x", "1:2:3", "127.0.0.1:", "127.0.0.1:65536", "-1"])
def test_a_bad_metrics_address_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match="--metrics"):
        DaemonConfig(metrics=value)
