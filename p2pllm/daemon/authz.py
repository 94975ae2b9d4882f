"""Authorization (protocol.md 4.4): which connection kind may send which message type, and who
may act on a job's roles. Pure: no sockets, no daemon; the daemon's dispatch, RoleHost and
JobControl call it.

Connection kinds (HELLO ``kind``, protocol.md 6):

- ``"ctl"``: a CLI of this host's operator. It may send only client requests
  (:data:`CLIENT_REQUESTS`): status, jobs, stop, and the requests that start a job (or a
  fetch of model pieces, WEIGHTS_PULL) here; not WEIGHTS_MANIFEST/READ, served to peers.
- ``"peer"``: another daemon. Anything but the requests that start a job on behalf of a local
  operator (:data:`OPERATOR_ONLY`); its JOB_STOP must be the forwarded form (checked by
  JobControl, which knows the job).
- ``"self"``: this daemon's in-process connection to itself; never a socket (a socket that
  claims to be ``self``, or this node's id, is refused everything).

Jobs: the first ASSIGN of a job on a node makes its sender the job's coordinator there
(:class:`Grant`); its ASSIGNs (and JOB_MEMBERS) name the nodes that may send the job's roles
frames. Only the coordinator may ASSIGN more roles of that job, RELEASE them or change the
member list; the coordinator and the named members may send the roles frames.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from p2pllm.wire.messages import MsgType

__all__ = [
    "CLIENT_REQUESTS",
    "KINDS",
    "OPERATOR_ONLY",
    "Grant",
    "kind_refusal",
]

# Requests that start a job with this daemon as its coordinator (or a fetch of model pieces
# into its models cache, WEIGHTS_PULL), for its local operator.
OPERATOR_ONLY = frozenset({MsgType.GENERATE, MsgType.FL_RUN, MsgType.TRAIN_RUN, MsgType.WEIGHTS_PULL})
# What a "ctl" connection may send (PING is answered by the wire layer, listed for the table).
CLIENT_REQUESTS = frozenset({
    MsgType.STATUS, MsgType.SUBSCRIBE, MsgType.JOBS, MsgType.JOB_STOP, MsgType.LINK_PROBE,
    MsgType.PING, *OPERATOR_ONLY,
})
KINDS = ("peer", "ctl", "self")


def kind_refusal(kind: str, msg_type: MsgType, *, local: bool) -> str | None:
    """Why a connection of ``kind`` may not send ``msg_type`` (None: it may). ``local``: the
    connection is this daemon's in-process one (the only one that may be ``"self"``)."""
    if local:
        return None if kind == "self" else f"the in-process connection has kind {kind!r}"
    if kind == "self":
        return "a connection from outside this process cannot be this node's own"
    if kind == "ctl":
        if msg_type in CLIENT_REQUESTS:
            return None
        return (f"a ctl client may send only client requests "
                f"({', '.join(sorted(t.name for t in CLIENT_REQUESTS))}), not {msg_type.name}")
    if kind == "peer":
        if msg_type in OPERATOR_ONLY:
            return (f"{msg_type.name} starts a job (or a fetch) for this host's operator: only a "
                    f"ctl client of this daemon may send it, not a peer")
        return None
    return f"unknown connection kind {kind!r}"


@dataclass
class Grant:
    """Who may act on one job's roles held on this node."""

    coordinator: str  # node id that sent the job's first ASSIGN here
    members: frozenset[str] = field(default_factory=frozenset)  # node ids it named

    def may_send(self, node_id: str) -> bool:
        """May ``node_id`` send frames to this job's roles?"""
        return node_id == self.coordinator or node_id in self.members

    def name(self, members: Iterable[str]) -> None:
        """The coordinator's latest member list replaces the previous one."""
        self.members = frozenset(members)
