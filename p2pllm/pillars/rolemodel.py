"""The folder a role loads its model from: this node's own copy, or the pieces it needs fetched
from the nodes that hold the model whole (issue 16, protocol.md 4.6 and 13).

Roles (shard, train stage, drafter, verifier, fl-client) get ``sources`` in their ASSIGN
params when the planner placed them on a node that lacks the model. :func:`model_refusal` is
their cheap ``refuse()`` check; :func:`role_model_path` is what ``on_start`` awaits:

- with sources and a daemon that fetches (``RoleContext.fetch_model``): the daemon's weights
  service (its roots first, then a cached slice holding the pieces, then a fetch);
- otherwise the model inside this node's roots (:class:`~p2pllm.daemon.modelrefs.ModelRoots`;
  a hub download, with --allow-hub, in a thread).

NOT_FOUND (no such model here) and PEER_DOWN (the fetch could not complete: the message names
the model, what is missing and each source with why it was dropped) become :class:`Refused`,
so the job fails with that reason or is re-planned around this node. No torch here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pllm.daemon.modelrefs import ModelRoots
from p2pllm.daemon.roles import Refused, RoleContext
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode

if TYPE_CHECKING:
    from p2pllm.config import DaemonConfig
    from p2pllm.weights.slices import Need

__all__ = ["model_refusal", "need_layers", "need_whole", "role_model_path", "sources_param"]


MAX_SOURCES = 64


def sources_param(params: Mapping[str, Any]) -> tuple[str, ...]:
    """The ``sources`` of ASSIGN params that no schema parses (drafter, verifier): absent or
    nil is none; else a list of at most MAX_SOURCES node ids (1..256 characters), or Refused."""
    v = params.get("sources")
    if v is None:
        return ()
    if not isinstance(v, list | tuple) or len(v) > MAX_SOURCES or not all(
            isinstance(s, str) and 1 <= len(s) <= 256 for s in v):
        raise Refused(f"sources must be a list of at most {MAX_SOURCES} node ids")
    return tuple(v)


def model_refusal(config: DaemonConfig, model: str, sources: Sequence[str]) -> str | None:
    """Why this node cannot take a role for ``model``, or None: it is inside the roots, it is a
    hub id this node may download, or other nodes hold it (``sources``: fetched on start).
    FORBIDDEN (raised) for a path outside this node's roots."""
    roots = ModelRoots.of(config)
    if roots.find(model) is not None or roots.may_fetch(model) or sources:
        return None
    return f"model {model!r} is not on this node (looked under {roots.describe()})"


def need_layers(start: int, end: int, num_layers: int) -> Need:
    """The pieces of layers [start, end): the embedding on the first, the norm and head on
    the last (what ``engine.loader.load_slice`` reads for that slice)."""
    from p2pllm.weights.slices import Need

    return Need.for_layers(start, end, num_layers)


def need_whole() -> Need:
    from p2pllm.weights.slices import Need

    return Need.whole()


async def role_model_path(ctx: RoleContext, model: str, need: Need | None,
                          sources: Sequence[str]) -> Path:
    """Where the role loads ``model`` from (see the module's doc); Refused when it cannot."""
    fetch = getattr(ctx, "fetch_model", None)
    try:
        if sources and fetch is not None:
            path: Path = await fetch(model, need, tuple(sources))
            return path
        return (await ModelRoots.of(ctx.config).aresolve(model)).path
    except ProtocolError as exc:
        if exc.code in (ErrorCode.NOT_FOUND, ErrorCode.PEER_DOWN):
            raise Refused(exc.message) from None
        raise
