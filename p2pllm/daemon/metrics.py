"""Prometheus text exposition (format 0.0.4) of a daemon snapshot: a pure function.

`render_metrics(snapshot)` turns what :meth:`Daemon.metrics_snapshot` returns (the STATUS
snapshot of :mod:`.state`, plus the node's memory figures read now) into the text a
Prometheus server scrapes. No sockets here: :mod:`.httpd` serves it on GET /metrics, and the
OpenAI API (issue 13) mounts the same handler. Every figure is one the daemon measured
(RoleWorker busy time, the peer table's RTT/throughput/bytes, the jobs' reported metrics);
nothing is derived from a formula. The names are documented in README.md ("Metrics").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JOB_STATES = ("running", "done", "failed", "stopped")
PEER_STATES = ("connecting", "up", "down")

# name -> (type, help); the order of the output
FAMILIES: dict[str, tuple[str, str]] = {
    "p2pllm_node_info": ("gauge", "This daemon (always 1): node id and name as labels."),
    "p2pllm_role_busy_seconds_total": ("counter", "Seconds a role's worker spent computing."),
    "p2pllm_role_idle_seconds_total": ("counter", "Seconds a role's worker existed without work."),
    "p2pllm_role_busy_ratio": ("gauge", "Busy fraction of a role's worker over its last 10 s."),
    "p2pllm_role_items_total": ("counter", "Work items a role's worker finished."),
    "p2pllm_role_queued": ("gauge", "Work items waiting on a role's worker."),
    "p2pllm_roles_memory_bytes": ("gauge", "Bytes the roles held here use (weights, KV)."),
    "p2pllm_memory_free_bytes": ("gauge", "Free memory of the device roles run on (RAM, or the CUDA device), measured now."),
    "p2pllm_jobs": ("gauge", "Jobs this daemon coordinates (and recently finished) by state."),
    "p2pllm_job_state": ("gauge", "1 for each job this daemon coordinates, in its state."),
    "p2pllm_job_tokens_total": ("counter", "Tokens a job generated."),
    "p2pllm_shard_busy_ratio": ("gauge", "Busy fraction a split job's shard last reported."),
    "p2pllm_spec_rounds_total": ("counter", "Draft/verify rounds of a speculative job."),
    "p2pllm_spec_draft_seconds_total": ("counter", "Seconds a speculative job spent drafting."),
    "p2pllm_spec_verify_seconds_total": ("counter", "The verifier's seconds on a speculative job's rounds."),
    "p2pllm_spec_network_seconds_total": ("counter", "A speculative job's round trips minus the verifier's time."),
    "p2pllm_peers": ("gauge", "Peers in the peer table by state."),
    "p2pllm_peer_up": ("gauge", "1 when the link to a peer is up."),
    "p2pllm_peer_rtt_seconds": ("gauge", "Last keepalive round-trip time to a peer."),
    "p2pllm_peer_throughput_bytes_per_second": ("gauge", "Last probed throughput of a peer's link."),
    "p2pllm_peer_received_bytes_total": ("counter", "Bytes received on a peer's link."),
    "p2pllm_peer_sent_bytes_total": ("counter", "Bytes sent on a peer's link."),
    "p2pllm_received_bytes_total": ("counter", "Bytes received on all peer links."),
    "p2pllm_sent_bytes_total": ("counter", "Bytes sent on all peer links."),
    "p2pllm_api_requests_total": ("counter", "OpenAI API requests answered, by endpoint, model and HTTP status (499: the client went away)."),
    "p2pllm_api_prompt_tokens_total": ("counter", "Prompt tokens of the API's generations."),
    "p2pllm_api_completion_tokens_total": ("counter", "Tokens the API's generations drew."),
    "p2pllm_api_time_to_first_token_seconds": ("histogram", "Seconds from an API request's arrival to its first token."),
    "p2pllm_api_inter_token_seconds": ("histogram", "Seconds between consecutive tokens of one API generation."),
    "p2pllm_api_pending": ("gauge", "API requests admitted now (running or waiting for their model)."),
    "p2pllm_api_running": ("gauge", "API generations computing now."),
    "p2pllm_api_cancelled_total": ("counter", "API generations stopped because their client went away."),
    "p2pllm_api_batch_size": ("gauge", "Sequences in a served model's last decode forward."),
    "p2pllm_api_sequences": ("gauge", "A served model's sequences by state (running, waiting)."),
    "p2pllm_api_kv_blocks_used": ("gauge", "KV cache blocks a served model's sequences hold now."),
    "p2pllm_api_kv_blocks_total": ("gauge", "KV cache blocks of a served model's pool."),
    "p2pllm_api_preemptions_total": ("counter", "Sequences a served model's scheduler preempted (blocks ran out)."),
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

Sample = tuple[str, dict[str, str], float]


def render_metrics(snapshot: Mapping[str, Any]) -> str:
    """The snapshot as Prometheus text format 0.0.4 (HELP and TYPE for every family)."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {name: [] for name in FAMILIES}
    for name, labels, value in _samples(snapshot):
        samples[_family(name)].append((labels | {"__name__": name}, value))
    out: list[str] = []
    for family, (typ, text) in FAMILIES.items():
        out.append(f"# HELP {family} {text}")
        out.append(f"# TYPE {family} {typ}")
        for labels, value in samples[family]:
            name = labels.pop("__name__")
            out.append(f"{name}{_labels(labels)} {_value(value)}")
    return "\n".join(out) + "\n"


def _family(name: str) -> str:
    """The family a sample belongs to (a histogram's _bucket/_sum/_count are its family's)."""
    if name in FAMILIES:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and FAMILIES.get(base, ("",))[0] == "histogram":
            return base
    raise KeyError(name)


def _api_samples(api: Mapping[str, Any]) -> Iterable[Sample]:
    """The OpenAI API's figures (ApiServer.metrics() in daemon/api.py)."""
    for r in api.get("requests") or ():
        labels = {"endpoint": str(r.get("endpoint", "")), "model": str(r.get("model", "")),
                  "status": str(r.get("status", ""))}
        if (v := _num(r.get("count"))) is not None:
            yield "p2pllm_api_requests_total", labels, v
    for key, name in (("prompt_tokens", "p2pllm_api_prompt_tokens_total"),
                      ("completion_tokens", "p2pllm_api_completion_tokens_total")):
        for model, n in sorted((api.get(key) or {}).items()):
            if (v := _num(n)) is not None:
                yield name, {"model": str(model)}, v
    for key, name in (("ttft", "p2pllm_api_time_to_first_token_seconds"),
                      ("itl", "p2pllm_api_inter_token_seconds")):
        for model, h in sorted((api.get(key) or {}).items()):
            labels = {"model": str(model)}
            for le, count in h.get("buckets") or ():
                yield f"{name}_bucket", labels | {"le": _value(float(le))}, float(count)
            yield f"{name}_bucket", labels | {"le": "+Inf"}, float(h.get("count", 0))
            yield f"{name}_sum", labels, float(h.get("sum", 0.0))
            yield f"{name}_count", labels, float(h.get("count", 0))
    for key, name in (("pending", "p2pllm_api_pending"), ("running", "p2pllm_api_running"),
                      ("cancelled", "p2pllm_api_cancelled_total")):
        if (v := _num(api.get(key))) is not None:
            yield name, {}, v
    for model, m in sorted((api.get("models") or {}).items()):
        for key, name in (("batch_size", "p2pllm_api_batch_size"),
                          ("kv_blocks_used", "p2pllm_api_kv_blocks_used"),
                          ("kv_blocks_total", "p2pllm_api_kv_blocks_total"),
                          ("preemptions", "p2pllm_api_preemptions_total")):
            if (v := _num(m.get(key))) is not None:
                yield name, {"model": str(model)}, v
        for state in ("running", "waiting"):
            if (v := _num(m.get(state))) is not None:
                yield "p2pllm_api_sequences", {"model": str(model), "state": state}, v


def _samples(snap: Mapping[str, Any]) -> Iterable[Sample]:
    node = snap.get("node") or {}
    yield "p2pllm_node_info", {"node": str(node.get("node_id", "")), "name": str(node.get("name", ""))}, 1
    for role in node.get("roles") or ():
        labels = {"job": str(role.get("job", "")), "rid": str(role.get("rid", "")),
                  "role": str(role.get("role", ""))}
        worker = (role.get("metrics") or {}).get("worker")
        if not isinstance(worker, Mapping):
            continue
        for key, name in (("busy_s", "p2pllm_role_busy_seconds_total"),
                          ("idle_s", "p2pllm_role_idle_seconds_total"),
                          ("busy", "p2pllm_role_busy_ratio"), ("items", "p2pllm_role_items_total"),
                          ("queued", "p2pllm_role_queued")):
            if (v := _num(worker.get(key))) is not None:
                yield name, labels, v
    for key, name in (("mem_used_by_roles", "p2pllm_roles_memory_bytes"),
                      ("mem_free", "p2pllm_memory_free_bytes")):
        if (v := _num(node.get(key))) is not None:
            yield name, {}, v

    jobs = list(snap.get("jobs") or ())
    for state in JOB_STATES:
        yield "p2pllm_jobs", {"state": state}, sum(j.get("state") == state for j in jobs)
    for job in jobs:
        jid = str(job.get("job", ""))
        yield "p2pllm_job_state", {"job": jid, "pillar": str(job.get("pillar", "")),
                                   "state": str(job.get("state", ""))}, 1
        m = job.get("metrics") or {}
        if (v := _num(m.get("tokens"))) is not None:
            yield "p2pllm_job_tokens_total", {"job": jid}, v
        busy = m.get("shard_busy")
        if isinstance(busy, Mapping):
            for rid, frac in sorted(busy.items()):
                if (v := _num(frac)) is not None:
                    yield "p2pllm_shard_busy_ratio", {"job": jid, "rid": str(rid)}, v
        for key, name in (("rounds", "p2pllm_spec_rounds_total"),
                          ("draft_s", "p2pllm_spec_draft_seconds_total"),
                          ("verify_s", "p2pllm_spec_verify_seconds_total"),
                          ("network_s", "p2pllm_spec_network_seconds_total")):
            if (v := _num(m.get(key))) is not None:
                yield name, {"job": jid}, v

    peers = list(snap.get("peers") or ())
    for state in PEER_STATES:
        yield "p2pllm_peers", {"state": state}, sum(p.get("state") == state for p in peers)
    total_in = total_out = 0.0
    for p in peers:
        labels = {"peer": str(p.get("node_id", "")), "name": str(p.get("name", ""))}
        yield "p2pllm_peer_up", labels, 1 if p.get("state") == "up" else 0
        if (rtt := _num(p.get("rtt_ms"))) is not None:
            yield "p2pllm_peer_rtt_seconds", labels, rtt / 1000
        if (mbps := _num(p.get("throughput_mbps"))) is not None:  # 10^6 bytes/s (peers.py)
            yield "p2pllm_peer_throughput_bytes_per_second", labels, mbps * 1e6
        if (b := _num(p.get("bytes_in"))) is not None:
            total_in += b
            yield "p2pllm_peer_received_bytes_total", labels, b
        if (b := _num(p.get("bytes_out"))) is not None:
            total_out += b
            yield "p2pllm_peer_sent_bytes_total", labels, b
    yield "p2pllm_received_bytes_total", {}, total_in
    yield "p2pllm_sent_bytes_total", {}, total_out
    if isinstance(api := snap.get("api"), Mapping):
        yield from _api_samples(api)


def _num(v: Any) -> float | None:
    """A number from the snapshot, or None for a missing or non-numeric one (bool is not)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 2**53:
        return str(int(v))
    return repr(float(v))
