"""Bodies of the core daemon messages that act on jobs (protocol.md section 4.3): ASSIGN,
RELEASE and JOB_STOP, which any peer may send. Each role's ASSIGN ``params`` are checked by
that role's own body (``ASSIGN shard``, ``ASSIGN fl-client``, ...) in its pillar's
``messages.py``; here only the envelope. No torch here: the daemon's core and ``ctl`` import
it."""

from __future__ import annotations

from p2pllm.wire.schema import Body, Bool, Map, Str

__all__ = ["ASSIGN", "JOB_STOP", "RELEASE"]

ID = 256  # characters of a job id, a role's rid or a role name, at most


def _job() -> Str:
    return Str("job", 1, ID, doc="the job")


ASSIGN = Body("ASSIGN", [
    _job(),
    Str("rid", 1, ID, default=None, doc="the role's id in the job; nil: the role's name"),
    Str("role", 1, ID, doc="the role to host (drafter, verifier, shard, fl-client, ...)"),
    Map("params", default={}, doc="checked by the role's table (ASSIGN shard, ...)"),
    Str("pillar", max_len=ID, default=None, doc="the job's pillar, for status"),
], doc="ASSIGN: host a role of a job")

RELEASE = Body("RELEASE", [
    _job(),
    Str("rid", 1, ID, default=None, doc="one role; nil: every role of the job here"),
], doc="RELEASE: stop roles of a job")

JOB_STOP = Body("JOB_STOP", [
    _job(),
    Bool("forwarded", default=False, doc="sent on by a node that does not coordinate the job"),
], doc="JOB_STOP: stop a job wherever it is coordinated")
