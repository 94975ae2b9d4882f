"""Bodies of the core daemon messages that act on jobs (protocol.md section 4.3): ASSIGN,
RELEASE, JOB_MEMBERS and JOB_STOP, which peers send (who may: section 4.4). Each role's ASSIGN
``params`` are checked by that role's own body (``ASSIGN shard``, ``ASSIGN fl-client``, ...) in
its pillar's ``messages.py``; here only the envelope. No torch here: the daemon's core and
``ctl`` import it."""

from __future__ import annotations

from p2pllm.wire.schema import REQUIRED, Body, Bool, List, Map, Str

__all__ = ["ASSIGN", "JOB_MEMBERS", "JOB_STOP", "RELEASE"]

ID = 256  # characters of a job id, a role's rid or a role name, at most
MAX_MEMBERS = 1024  # node ids in a job's member list, at most


def _job() -> Str:
    return Str("job", 1, ID, doc="the job")


def _members(doc: str, default: object) -> List:
    return List("members", of=Str("", 1, ID), max_len=MAX_MEMBERS, default=default, doc=doc)


ASSIGN = Body("ASSIGN", [
    _job(),
    Str("rid", 1, ID, default=None, doc="the role's id in the job; nil: the role's name"),
    Str("role", 1, ID, doc="the role to host (drafter, verifier, shard, fl-client, ...)"),
    Map("params", default={}, doc="checked by the role's table (ASSIGN shard, ...)"),
    Str("pillar", max_len=ID, default=None, doc="the job's pillar, for status"),
    _members("node ids that may send the job's roles frames besides the coordinator", ()),
], doc="ASSIGN: host a role of a job")

RELEASE = Body("RELEASE", [
    _job(),
    Str("rid", 1, ID, default=None, doc="one role; nil: every role of the job here"),
], doc="RELEASE: stop roles of a job")

JOB_MEMBERS = Body("JOB_MEMBERS", [
    _job(),
    _members("the job's member node ids now (replaces the list the ASSIGNs gave)", REQUIRED),
], doc="JOB_MEMBERS: the coordinator's new member list of a job (after a re-plan)")

JOB_STOP = Body("JOB_STOP", [
    _job(),
    Bool("forwarded", default=False, doc="sent on by a node that does not coordinate the job"),
], doc="JOB_STOP: stop a job wherever it is coordinated")
