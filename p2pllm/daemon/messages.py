"""Bodies of the core daemon messages that act on jobs (protocol.md section 4.3): ASSIGN,
RELEASE, JOB_MEMBERS and JOB_STOP, which peers send (who may: section 4.4). Each role's ASSIGN
``params`` are checked by that role's own body (``ASSIGN shard``, ``ASSIGN fl-client``, ...) in
its pillar's ``messages.py``; here only the envelope. Also the weights messages (protocol.md
section 13): WEIGHTS_MANIFEST and WEIGHTS_READ between peers, WEIGHTS_PULL from a ctl client.
No torch here: the daemon's core and ``ctl`` import it."""

from __future__ import annotations

from p2pllm.wire.schema import REQUIRED, Body, Bool, Enum, Float, Int, List, Map, Str

__all__ = [
    "ASSIGN",
    "JOB_MEMBERS",
    "JOB_STOP",
    "MAX_READ_PIECES",
    "RELEASE",
    "WEIGHTS_MANIFEST",
    "WEIGHTS_MANIFEST_REPLY",
    "WEIGHTS_PULL",
    "WEIGHTS_PULL_PROGRESS",
    "WEIGHTS_PULL_REPLY",
    "WEIGHTS_READ",
    "WEIGHTS_READ_REPLY",
]

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


# -- weights (protocol.md section 13) -------------------------------------------------------------

MAX_READ_PIECES = 65536  # pieces one WEIGHTS_READ may ask for (its answer's meta stays < 1 MiB)
DIGEST = 64  # hex characters of a manifest digest (sha256)


def _model(doc: str) -> Str:
    return Str("model", 1, 4096, doc=doc)


WEIGHTS_MANIFEST = Body("WEIGHTS_MANIFEST", [
    _model("a model name resolved in the receiver's roots (4.6)"),
], doc="WEIGHTS_MANIFEST: the manifest of a model this node holds whole")

WEIGHTS_MANIFEST_REPLY = Body("WEIGHTS_MANIFEST reply", [
    _model("the name asked for"),
    Str("digest", DIGEST, DIGEST, doc="sha256 hex of the manifest's canonical msgpack"),
    Map("manifest", doc="files and pieces (13.1), checked by the receiver"),
], doc="WEIGHTS_MANIFEST's answer")

WEIGHTS_READ = Body("WEIGHTS_READ", [
    _model("a model name resolved in the receiver's roots (4.6)"),
    Str("digest", DIGEST, DIGEST, doc="the manifest the reader holds; another is BAD_REQUEST"),
    List("pieces", of=Int("", 0), min_len=1, max_len=MAX_READ_PIECES,
         doc="piece ids; their lengths sum to at most 16 MiB"),
], doc="WEIGHTS_READ: pieces of a model, by id")

WEIGHTS_READ_REPLY = Body("WEIGHTS_READ reply", [
    List("pieces", of=Int("", 0), max_len=MAX_READ_PIECES, doc="the ids asked for, in order"),
    List("lengths", of=Int("", 0), max_len=MAX_READ_PIECES,
         doc="each piece's bytes; the payload is the pieces back to back"),
], doc="WEIGHTS_READ's answer")

WEIGHTS_PULL = Body("WEIGHTS_PULL", [
    _model("a model name"),
    Str("from", 1, 256, attr="source", default=None,
        doc="a peer's name or node id; nil: every peer that lists the model"),
    Str("layers", 1, 64, default=None, doc='"A-B": layers [A, B) only; nil: the whole model'),
], doc="WEIGHTS_PULL: fetch a model (or a slice) into this daemon's models cache")

WEIGHTS_PULL_PROGRESS = Body("WEIGHTS_PULL progress", [
    Int("done_bytes", 0, doc="bytes fetched and verified"),
    Int("total_bytes", 0, doc="bytes the slice needs"),
    Str("source", max_len=4096, default="", doc="the sources in use, by name"),
], doc="WEIGHTS_PULL's partial answers")

WEIGHTS_PULL_REPLY = Body("WEIGHTS_PULL reply", [
    _model("the model"),
    Str("path", 1, 4096, doc="the folder it loads from on that host"),
    Int("bytes", 0, doc="bytes fetched by this pull (0: nothing was missing)"),
    Int("disk_bytes", 0, doc="bytes the cache entry takes on disk (st_blocks)"),
    Int("pieces", 0, doc="pieces fetched by this pull"),
    Float("seconds", 0.0, doc="wall time of the pull"),
    List("sources", of=Str("", max_len=256), max_len=1024, default=(),
         doc="the sources used, by name"),
    List("dropped", of=Str("", max_len=4096), max_len=1024, default=(),
         doc="sources dropped, each with why"),
    Enum("where", ("local", "cache"), default="cache", doc="local: a root has it (nothing fetched)"),
], doc="WEIGHTS_PULL's final answer")
