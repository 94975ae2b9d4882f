"""ASSIGN, RELEASE and JOB_STOP go through their bodies (p2pllm/daemon/messages.py): a real
daemon in this process answers a malformed envelope with BAD_REQUEST naming the body and the
field, keeps serving, and still hosts, releases and stops jobs for well-formed ones."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from p2pllm.cli.client import open_daemon
from p2pllm.config import DaemonConfig
from p2pllm.daemon.daemon import Daemon
from p2pllm.wire.connection import RemoteError
from p2pllm.wire.messages import ErrorCode, MsgType
from tests.conftest import open_peer


@pytest.fixture
async def daemon(tmp_path: Any) -> Any:
    config = DaemonConfig(name="solo", host="127.0.0.1", port=0, mdns=False, state_dir=str(tmp_path),
                          threads=1, compute_bench_seconds=0.01, test_roles=True)
    d = Daemon(config)
    task = asyncio.create_task(d.run())
    await asyncio.wait_for(d.wait_ready(), 60)
    yield d
    d.stop()
    await asyncio.wait_for(task, 30)


BAD = [
    (MsgType.ASSIGN, {"job": 5, "role": "echo"}, "ASSIGN: job must be a string"),
    (MsgType.ASSIGN, {"job": "", "role": "echo"}, "ASSIGN: job must be a string of 1..256"),
    (MsgType.ASSIGN, {"job": "j"}, "ASSIGN: role is required"),
    (MsgType.ASSIGN, {"job": "j", "role": "echo", "params": [1]}, "ASSIGN: params must be a map"),
    (MsgType.ASSIGN, {"job": "j", "role": "echo", "rid": 7}, "ASSIGN: rid must be a string"),
    (MsgType.RELEASE, {"rid": "echo"}, "RELEASE: job is required"),
    (MsgType.RELEASE, {"job": "j", "rid": ["echo"]}, "RELEASE: rid must be a string"),
    (MsgType.JOB_STOP, {}, "JOB_STOP: job is required"),
    (MsgType.JOB_STOP, {"job": "j", "forwarded": "yes"}, "JOB_STOP: forwarded must be a boolean"),
]


async def test_bad_envelopes_are_typed_errors_and_good_ones_still_work(daemon: Daemon) -> None:
    # ASSIGN and RELEASE come from a peer (the test is the job's coordinator), the operator's
    # JOB_STOP from a ctl client (protocol.md 4.4)
    client = await open_peer(f"127.0.0.1:{daemon.port}")
    operator = await open_daemon(f"127.0.0.1:{daemon.port}")
    try:
        for msg_type, meta, words in BAD:
            with pytest.raises(RemoteError) as err:
                await client.request(msg_type, meta, timeout=10)
            assert err.value.code == ErrorCode.BAD_REQUEST, (msg_type, meta)
            assert words in err.value.message, (words, err.value.message)
        assert not daemon.hosting.roles  # nothing was hosted by a bad ASSIGN
        # well-formed: nil rid is the role's name, params default to {}
        ack = await client.request(MsgType.ASSIGN, {"job": "j1", "role": "echo", "rid": None},
                                   timeout=10)
        assert ack.meta == {"job": "j1", "rid": "echo"}
        got = await client.request(MsgType.ROLE_CALL, {"job": "j1", "rid": "echo"}, timeout=10)
        assert got.meta["params"] == {}
        await client.request(MsgType.ASSIGN, {"job": "j1", "role": "echo", "rid": "e2",
                                              "params": {"x": 1}, "pillar": "test"}, timeout=10)
        released = await client.request(MsgType.RELEASE, {"job": "j1", "rid": "e2"}, timeout=10)
        assert released.meta == {"released": ["e2"]}
        stopped = await operator.request(MsgType.JOB_STOP, {"job": "j1"}, timeout=10)
        assert stopped.meta == {"stopped": "j1", "where": "member"}
        assert not daemon.hosting.roles
        with pytest.raises(RemoteError) as err:
            await operator.request(MsgType.JOB_STOP, {"job": "nope", "forwarded": True}, timeout=10)
        assert err.value.code == ErrorCode.UNKNOWN_JOB
    finally:
        client.close()
        operator.close()
