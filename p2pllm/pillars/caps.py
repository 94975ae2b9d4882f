"""The resource caps the pillars' roles enforce (issue 12; the config keys are DaemonConfig's,
documented in protocol.md 4.5): the typed refusal, the checks, and how much KV
memory the daemon's budget still has room for.

A cap refusal is ``ProtocolError(OVER_LIMIT, "<what> over the cap <n> (config key <key>)")``;
it refuses one request and leaves nothing behind, the role keeps serving its other sessions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from p2pllm.plan.layers import free_bytes
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode

if TYPE_CHECKING:
    from p2pllm.config import DaemonConfig
    from p2pllm.daemon.roles import Cluster
    from p2pllm.engine.kv_cache import KVBudget

__all__ = ["check_payload", "check_session_tokens", "check_sessions", "check_train_tokens", "kv_room",
           "over_limit", "set_kv_limit"]


def over_limit(what: str, cap: int, key: str) -> ProtocolError:
    """The refusal for a request past a cap: ``<what> over the cap <cap> (config key <key>)``."""
    return ProtocolError(ErrorCode.OVER_LIMIT, f"{what} over the cap {cap} (config key {key})")


def check_sessions(config: DaemonConfig, open_now: int, role: str) -> None:
    """Refuse a new session when ``open_now`` sessions of this role are already open."""
    cap = config.max_sessions_per_role
    if open_now >= cap:
        raise over_limit(f"session {open_now + 1} of this {role}", cap, "max_sessions_per_role")


def check_session_tokens(config: DaemonConfig, tokens: int, what: str) -> None:
    """Refuse a session asking for more than max_session_tokens (only when that is set: with
    0 the model's context is the limit, and each role clamps or refuses as it always did)."""
    cap = config.max_session_tokens
    if cap > 0 and tokens > cap:
        raise over_limit(f"{what} of {tokens} tokens", cap, "max_session_tokens")


def check_train_tokens(config: DaemonConfig, batch: int, seq: int, what: str) -> None:
    """Refuse a training step of ``batch`` x ``seq`` tokens past max_train_tokens."""
    cap = config.max_train_tokens
    if batch * seq > cap:
        raise over_limit(f"{what}: batch {batch} x sequence {seq} = {batch * seq} tokens", cap,
                         "max_train_tokens")


def check_payload(config: DaemonConfig, nbytes: int, what: str) -> None:
    """Refuse a job whose frames would not fit one frame's payload (max_payload)."""
    if nbytes > config.max_payload:
        raise over_limit(f"{what} of {nbytes} bytes", config.max_payload, "max_payload")


def kv_room(cluster: Cluster | None) -> int | None:
    """Bytes this daemon's memory budget still has room for (what its own caps say: budget
    minus what its roles hold, at most the free memory); None when the cluster does not say
    (a role run without a daemon, in tests)."""
    for node in cluster.nodes() if cluster is not None else ():
        caps = node.get("caps") if node.get("self") else None
        if isinstance(caps, dict) and "mem_budget" in caps:
            return free_bytes(caps)
    return None


def set_kv_limit(budget: KVBudget, cluster: Cluster | None) -> None:
    """Let ``budget`` grow by what the daemon's memory budget has room for now."""
    room = kv_room(cluster)
    budget.limit = None if room is None else budget.used + room
