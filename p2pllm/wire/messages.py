"""Message types, flags and error codes of the p2pllm wire protocol.

Every number here is part of the protocol: see protocol.md, which changes in the same commit.
Ranges: 0x00xx core, 0x01xx speculative, 0x02xx split inference, 0x03xx federated,
0x04xx split training, 0x05xx jobs submitted by a CLI to its local daemon, 0x06xx weights
(models travelling peer to peer).
"""

from __future__ import annotations

from enum import IntEnum, IntFlag


class MsgType(IntEnum):
    # -- core -------------------------------------------------------------------------------
    ERROR = 0x0001  # response only: {"code": int, "message": str}
    HELLO = 0x0002  # handshake (request and response)
    AUTH = 0x0003  # HMAC proof of the shared secret
    PING = 0x0004  # keepalive request: {"t": float}
    PONG = 0x0005  # keepalive response: echoes "t"
    ACK = 0x0006  # generic success response
    CANCEL = 0x0007  # one-way: cancel the handler of request id meta["request_id"]
    GOODBYE = 0x0008  # one-way: the sender is shutting down
    CAPS_UPDATE = 0x0009  # one-way: {"caps": map}, the sender's capabilities changed
    ASSIGN = 0x0010  # {"job", "role", "params", "coordinator"} -> ACK | ERROR(REFUSED)
    RELEASE = 0x0011  # {"job"} -> ACK
    JOB_MEMBERS = 0x0012  # {"job", "members"}: the coordinator's new member list -> ACK
    STATUS = 0x0020  # -> STATUS response: the state snapshot
    SUBSCRIBE = 0x0021  # streamed STATUS snapshots until cancelled
    LINK_PROBE = 0x0022  # a payload echoed back to measure throughput
    JOBS = 0x0023  # -> list of jobs
    JOB_STOP = 0x0024  # {"job"} -> ACK
    ROLE_CALL = 0x0030  # reserved

    # -- speculative decoding ---------------------------------------------------------------
    SPEC_OPEN = 0x0100
    SPEC_VERIFY = 0x0101
    SPEC_CLOSE = 0x0102
    SPEC_DRAFT_OPEN = 0x0110
    SPEC_DRAFT_RUN = 0x0111
    SPEC_DRAFT_CLOSE = 0x0112

    # -- split inference --------------------------------------------------------------------
    SHARD_OPEN = 0x0200
    SHARD_FORWARD = 0x0201
    SHARD_RESULT = 0x0202
    SHARD_CLOSE = 0x0203

    # -- federated LoRA ---------------------------------------------------------------------
    FL_TRAIN = 0x0300
    FL_EVAL = 0x0301

    # -- split training ---------------------------------------------------------------------
    TRAIN_FORWARD = 0x0400
    TRAIN_BACKWARD = 0x0401
    TRAIN_STEP = 0x0402
    TRAIN_SAVE = 0x0403
    TRAIN_EVAL = 0x0404
    TRAIN_BATCH = 0x0405  # coordinator -> stage: run one step's micro-batches
    TRAIN_TIED = 0x0406  # last -> first stage: swap gradients of a tied embedding/head
    TRAIN_DATA = 0x0407  # coordinator -> stage 0: the dataset's content a CLI sent

    # -- jobs a CLI submits to its local daemon --------------------------------------------
    GENERATE = 0x0500  # {"mode": "spec"|"split"|..., ...} streamed tokens, final result
    FL_RUN = 0x0501
    TRAIN_RUN = 0x0502
    WEIGHTS_PULL = 0x0503  # ctl -> its daemon: fetch a model (a slice) from peers, progress streamed

    # -- weights: a model's manifest and pieces, served to peers -----------------------------
    WEIGHTS_MANIFEST = 0x0600  # {"model"} -> {"model", "digest", "manifest"}
    WEIGHTS_READ = 0x0601  # {"model", "digest", "pieces"} -> {"pieces", "lengths"} + raw bytes

    # tensor parallelism (protocol.md section 14)
    TP_RUN = 0x0700  # coordinator -> every rank: one generation, streamed (TP_TOKEN partials on rank 0)
    TP_TOKEN = 0x0701  # partial response on rank 0's TP_RUN stream: {token, step}


class Flags(IntFlag):
    NONE = 0
    RESPONSE = 0x0001  # this frame answers request_id
    STREAM = 0x0002  # a partial response: more frames for this request id follow
    ONEWAY = 0x0004  # no response is expected


class ErrorCode(IntEnum):
    INTERNAL = 1
    BAD_MAGIC = 2
    BAD_VERSION = 3
    FRAME_TOO_LARGE = 4
    BAD_META = 5
    UNKNOWN_TYPE = 6
    UNAUTHENTICATED = 7
    AUTH_FAILED = 8
    UNKNOWN_JOB = 9
    UNKNOWN_SESSION = 10
    REFUSED = 11
    BAD_REQUEST = 12
    BAD_TENSOR = 13
    TIMEOUT = 14
    PEER_DOWN = 15
    CANCELLED = 16
    NOT_FOUND = 17
    DUPLICATE = 18
    SHUTTING_DOWN = 19
    FORBIDDEN = 20  # not allowed: a path outside the roots, a sender that is not the job's coordinator
    OVER_LIMIT = 21  # over a resource cap (sessions, tokens, bytes, subscriptions)
