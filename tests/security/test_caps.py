"""Resource caps (issue 12, item 6) on real daemon processes with small caps from a config
file: a client past each cap gets ERROR OVER_LIMIT (or, for a frame over max_payload, the
wire's FRAME_TOO_LARGE and a closed connection), the sessions already open complete with the
model's own tokens, a refused session leaves nothing behind (the cap's slots come back), and
a legitimate client is served afterwards.

Caps under test (DaemonConfig, SECURITY.md): max_sessions_per_role, max_session_tokens,
max_train_tokens, max_payload, max_subscriptions_per_conn, max_subscriptions,
max_probe_bytes, max_probe_rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from p2pllm.engine.generate import generate_ids
from p2pllm.engine.loader import load_slice
from p2pllm.engine.sampling import SamplingParams
from p2pllm.pillars.federated import lora as lora_mod
from p2pllm.pillars.federated.lora import LoraSpec
from p2pllm.pillars.federated.messages import ClientParams
from p2pllm.pillars.speculative.messages import OpenRequest, VerifyWindow
from p2pllm.wire.connection import Connection, ConnectionClosed, RemoteError
from p2pllm.wire.messages import ErrorCode, MsgType
from p2pllm.wire.tensors import tensor_meta, unpack_tensors
from tests.conftest import BUNDLED, BUNDLED_DRAFT, BUNDLED_MODELS, wait_for
from tests.security.conftest import TIMEOUT, assert_still_serves, hostile, log_problems

torch.set_num_threads(1)

CAPS = {
    "max_sessions_per_role": 2,
    "max_session_tokens": 64,
    "max_train_tokens": 256,
    "max_payload": 4 << 20,
    "max_subscriptions_per_conn": 2,
    "max_subscriptions": 3,
    "max_probe_bytes": 64 << 10,
    "max_probe_rate": 4.0,
}
PROMPT = list(range(5, 25))  # 20 tokens of the bundled models' 2048-token vocabulary
TEXT = ("When forty winters shall besiege thy brow, and dig deep trenches in thy beauty's "
        "field, thy youth's proud livery so gazed on now will be a tattered weed. ") * 40


def start(daemons: Any, tmp_path: Path, *flags: str) -> Any:
    path = tmp_path / "caps.yaml"
    path.write_text(yaml.safe_dump(CAPS))
    return daemons("capped", "--no-mdns", "--config", str(path), "--models-dir",
                   str(BUNDLED_MODELS), *flags)


async def refused(coro: Any, key: str, cap: int | float) -> RemoteError:
    """Await ``coro``; it must fail with OVER_LIMIT naming the cap and its config key."""
    with pytest.raises(RemoteError) as err:
        await asyncio.wait_for(coro, TIMEOUT)
    assert err.value.code == ErrorCode.OVER_LIMIT, err.value
    assert f"over the cap {cap:g} (config key {key})" in err.value.message, err.value.message
    return err.value


async def role_metrics(conn: Connection, job: str, rid: str) -> dict[str, Any]:
    status = await conn.request(MsgType.STATUS, {}, timeout=TIMEOUT)
    for r in status.meta["node"]["roles"]:
        if r["job"] == job and r["rid"] == rid:
            return dict(r.get("metrics") or {})
    return {}


async def assign(conn: Connection, job: str, rid: str, role: str, params: dict[str, Any]) -> Any:
    meta = {"job": job, "rid": rid, "role": role, "params": params}
    return await conn.request(MsgType.ASSIGN, meta, timeout=120)


# -- sessions per role and tokens per session: verifier and shard -------------------------


async def test_verifier_and_shard_sessions_and_tokens_are_capped(daemons, tmp_path: Path) -> None:
    d = start(daemons, tmp_path)
    ref = generate_ids(load_slice(BUNDLED), PROMPT, max_tokens=30, stop_ids=[]).token_ids
    peer = await hostile(d.port, None, "peer")
    try:
        await _spec(peer, ref)
        await _split(peer, d.node_id, ref)
        await assert_still_serves(d.port)
    finally:
        peer.close()
    assert not log_problems(d.log())


async def _spec(peer: Connection, ref: list[int]) -> None:
    job = "caps-spec"
    await assign(peer, job, "verifier", "verifier", {"model": BUNDLED.name})

    async def open_(max_tokens: int) -> int:
        meta, _ = OpenRequest(tuple(PROMPT), max_tokens, SamplingParams(), 0).to_meta(job)
        reply = await peer.request(MsgType.SPEC_OPEN, meta, timeout=TIMEOUT)
        return int(reply.meta["session"])

    async def run(session: int, n: int) -> list[int]:
        """Verify the target's own tokens in windows of 4: all accepted, the bonus = ref."""
        got: list[int] = []
        while len(got) < n:
            window = tuple(ref[len(got):len(got) + 4])
            meta, _ = VerifyWindow(session, len(PROMPT) + len(got), window).to_meta(job)
            r = await peer.request(MsgType.SPEC_VERIFY, meta, timeout=TIMEOUT)
            assert r.meta["n"] == len(window)
            got += [*window, r.meta["next"]]
        return got

    a = await open_(40)  # 20 + 40 = 60 tokens <= 64
    await refused(open_(45), "max_session_tokens", 64)  # 20 + 45 = 65
    b = await open_(40)
    await refused(open_(10), "max_sessions_per_role", 2)  # a third session
    got = await asyncio.gather(run(a, 25), run(b, 25))
    assert got[0] == got[1] == ref[:25]
    for s in (a, b):
        await peer.request(MsgType.SPEC_CLOSE, {"job": job, "session": s}, timeout=TIMEOUT)
    await wait_for(lambda: _kv_freed(peer, job), timeout=10, what="the verifier's KV freed")
    c, e = await open_(30), await open_(30)  # the refused sessions left no slot taken
    assert (await run(c, 10)) == ref[:10]
    for s in (c, e):
        await peer.request(MsgType.SPEC_CLOSE, {"job": job, "session": s}, timeout=TIMEOUT)
    await peer.request(MsgType.RELEASE, {"job": job}, timeout=TIMEOUT)


async def _kv_freed(peer: Connection, job: str) -> bool:
    m = await role_metrics(peer, job, "verifier")
    return m.get("engine_sessions") == 0 and m.get("kv_bytes") == 0


async def _split(peer: Connection, node_id: str, ref: list[int]) -> None:
    job = "caps-split"
    n = 4  # the bundled target's layers
    await assign(peer, job, "shard0", "shard", {
        "model": BUNDLED.name, "start": 0, "end": n, "num_layers": n,
        "first": {"node": node_id, "rid": "shard0"}, "max_sessions": 8, "session_idle_s": 30})

    def open_(session: str, max_new: int) -> Any:
        return peer.stream(MsgType.SHARD_OPEN, {
            "job": job, "rid": "shard0", "session": session, "max_len": len(PROMPT) + max_new,
            "prompt_len": len(PROMPT), "max_new": max_new})

    async def first(stream: Any) -> Any:
        return await asyncio.wait_for(anext(stream), TIMEOUT)

    async def run(session: str, stream: Any) -> list[int]:
        meta, payload = tensor_meta({"ids": torch.tensor(PROMPT)}, {
            "job": job, "rid": "shard0", "session": session, "pos": 0, "sample": True})
        await peer.request(MsgType.SHARD_FORWARD, meta, payload, timeout=TIMEOUT)
        frames = [f async for f in stream]
        assert frames[-1].msg_type == MsgType.SHARD_CLOSE, frames[-1]
        return [f.meta["token"] for f in frames if f.is_partial]

    s1, s2 = open_("s1", 30), open_("s2", 30)
    assert (await first(s1)).is_partial and (await first(s2)).is_partial
    await refused(first(open_("s3", 10)), "max_sessions_per_role", 2)
    got = await asyncio.gather(run("s1", s1), run("s2", s2))
    assert got[0] == got[1] == ref[:30]
    await refused(first(open_("s4", 45)), "max_session_tokens", 64)  # 20 + 45 positions
    await wait_for(lambda: _shard_idle(peer, job), timeout=10, what="the shard's sessions freed")
    s5, s6 = open_("s5", 8), open_("s6", 8)  # both slots are free again
    assert (await first(s5)).is_partial and (await first(s6)).is_partial
    assert await run("s5", s5) == ref[:8] and await run("s6", s6) == ref[:8]
    # four sessions were opened (s1, s2, s5, s6); the refused ones never were
    await wait_for(lambda: _shard_opened(peer, job, 4), timeout=10, what="the shard's counts")
    await peer.request(MsgType.RELEASE, {"job": job}, timeout=TIMEOUT)


async def _shard_idle(peer: Connection, job: str) -> bool:
    m = await role_metrics(peer, job, "shard0")
    return m.get("sessions_open") == 0


async def _shard_opened(peer: Connection, job: str, n: int) -> bool:
    m = await role_metrics(peer, job, "shard0")
    return m.get("sessions_total") == n and m.get("sessions_open") == 0


# -- batch x sequence of training ----------------------------------------------------------


async def test_training_batch_times_sequence_is_capped(daemons, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "sonnets.txt").write_text(TEXT)
    d = start(daemons, tmp_path, "--data-dir", str(data))
    # the global adapter, built before connecting (a blocked loop would miss keepalives)
    glob = lora_mod.initial_adapter(BUNDLED_DRAFT, LoraSpec(), seed=0)
    peer = await hostile(d.port, None, "peer")
    try:
        stage = {"model": BUNDLED.name, "layers": [0, 4], "index": 0, "num_stages": 1,
                 "data": "sonnets.txt", "seq_len": 64, "steps": 1}
        await refused(assign(peer, "caps-train", "stage0", "train-stage",
                             stage | {"batch_size": 8}), "max_train_tokens", 256)  # 512 tokens
        held = await role_metrics(peer, "caps-train", "stage0")
        assert held == {}  # nothing was left assigned
        ack = await assign(peer, "caps-train", "stage0", "train-stage", stage | {"batch_size": 4})
        assert ack.msg_type == MsgType.ACK  # 256 tokens: at the cap, taken
        await peer.request(MsgType.RELEASE, {"job": "caps-train"}, timeout=TIMEOUT)

        job = "caps-fl"
        params = ClientParams(BUNDLED_DRAFT.name, BUNDLED_DRAFT.name, LoraSpec(), 64, 0.2, 0)
        await assign(peer, job, "fl-client", "fl-client", params.to_meta())

        def train(batch: int) -> Any:
            meta, payload = tensor_meta(glob, {"job": job, "rid": "fl-client", "round": 1,
                                               "local_steps": 1, "lr": 1e-3,
                                               "batch_size": batch, "seed": 0})
            return peer.request(MsgType.FL_TRAIN, meta, payload, timeout=120)

        await refused(train(8), "max_train_tokens", 256)  # 8 x 64 = 512 tokens
        reply = await train(4)  # 256 tokens: trained, the adapter comes back
        assert reply.msg_type == MsgType.FL_TRAIN and reply.meta["steps"] == 1
        back = unpack_tensors(reply.meta["tensors"], reply.payload)
        assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in glob.items()}
        await peer.request(MsgType.RELEASE, {"job": job}, timeout=TIMEOUT)
        await assert_still_serves(d.port)
    finally:
        peer.close()


# -- bytes per request, subscriptions, probes -----------------------------------------------


async def test_payload_subscriptions_and_probes_are_capped(daemons, tmp_path: Path) -> None:
    d = start(daemons, tmp_path)
    one, two = await hostile(d.port, None, "ctl"), await hostile(d.port, None, "ctl")
    try:
        # SUBSCRIBE: 2 streams per connection, 3 per daemon
        subs = [one.stream(MsgType.SUBSCRIBE, {"interval": 0.1}) for _ in range(2)]
        for s in subs:
            assert (await asyncio.wait_for(anext(s), TIMEOUT)).is_partial
        await refused(anext(one.stream(MsgType.SUBSCRIBE, {"interval": 0.1})),
                      "max_subscriptions_per_conn", 2)
        third = two.stream(MsgType.SUBSCRIBE, {"interval": 0.1})
        assert (await asyncio.wait_for(anext(third), TIMEOUT)).is_partial
        await refused(anext(two.stream(MsgType.SUBSCRIBE, {"interval": 0.1})),
                      "max_subscriptions", 3)
        assert (await asyncio.wait_for(anext(subs[0]), TIMEOUT)).is_partial  # still streaming
        await subs[1].aclose()  # cancelled: its slot comes back
        fourth = await wait_for(lambda: _subscribe(two), timeout=10, what="a freed slot")
        for s in (subs[0], third, fourth):
            await s.aclose()

        # LINK_PROBE: at most 64 KiB echoed, 4 per second per connection
        await asyncio.sleep(1.0)  # refill the bucket the SUBSCRIBE checks did not touch
        await refused(one.request(MsgType.LINK_PROBE, {}, [bytes(65 << 10)], timeout=TIMEOUT),
                      "max_probe_bytes", 64 << 10)
        await asyncio.sleep(1.0)
        payload = bytes(range(256)) * 256  # 64 KiB: at the cap, echoed
        first = await one.request(MsgType.LINK_PROBE, {}, [payload], timeout=TIMEOUT)
        assert bytes(first.payload) == payload
        await asyncio.sleep(1.0)  # a full bucket: 4 probes
        t0 = time.monotonic()
        burst = await asyncio.gather(*(one.request(MsgType.LINK_PROBE, {}, timeout=TIMEOUT)
                                       for _ in range(12)), return_exceptions=True)
        elapsed = time.monotonic() - t0
        over = [e for e in burst if isinstance(e, RemoteError)]
        assert all(e.code == ErrorCode.OVER_LIMIT and "config key max_probe_rate" in e.message
                   for e in over), burst
        served = 12 - len(over)
        assert 4 <= served <= 4 + int(elapsed * 4) + 1, (served, elapsed)
        pong = await two.request(MsgType.LINK_PROBE, {}, [payload], timeout=TIMEOUT)
        assert bytes(pong.payload) == payload  # another connection has its own bucket
        await asyncio.sleep(1.0)
        again = await one.request(MsgType.LINK_PROBE, {}, [payload], timeout=TIMEOUT)
        assert bytes(again.payload) == payload  # the bucket refills

        # bytes per request: a frame over max_payload is refused by the wire before any body
        # byte is read (FRAME_TOO_LARGE), and that connection closes; the others go on
        t0 = time.monotonic()
        with pytest.raises((RemoteError, ConnectionClosed)) as err:
            await one.request(MsgType.LINK_PROBE, {}, [bytes((4 << 20) + 1)], timeout=TIMEOUT)
        if isinstance(err.value, RemoteError):
            assert err.value.code == ErrorCode.FRAME_TOO_LARGE
        assert time.monotonic() - t0 < TIMEOUT
        await wait_for(lambda: one.closed, timeout=TIMEOUT, what="the connection to close")
        status = await two.request(MsgType.STATUS, {}, timeout=TIMEOUT)
        assert status.msg_type == MsgType.STATUS
        await assert_still_serves(d.port)
    finally:
        one.close()
        two.close()
    assert not log_problems(d.log())


async def _subscribe(conn: Connection) -> Any:
    """A SUBSCRIBE stream whose first snapshot came, or None when it was refused."""
    stream = conn.stream(MsgType.SUBSCRIBE, {"interval": 0.1})
    with contextlib.suppress(RemoteError):
        assert (await asyncio.wait_for(anext(stream), TIMEOUT)).is_partial
        return stream
    return None


# -- drafter runs (in process: two real runs overlap only by luck on a tiny model) ----------


async def test_drafter_runs_past_the_caps_are_refused_before_drafting() -> None:
    from p2pllm.config import DaemonConfig
    from p2pllm.daemon.roles import RoleContext
    from p2pllm.pillars.speculative.messages import DraftRun
    from p2pllm.pillars.speculative.roles import DrafterRole
    from p2pllm.wire.connection import Request
    from p2pllm.wire.frame import Frame, ProtocolError

    cfg = DaemonConfig(max_sessions_per_role=1, max_session_tokens=64)
    ctx = RoleContext("j", "drafter", "coord", "me", cfg, None, lambda m: None)  # type: ignore[arg-type]
    role = DrafterRole(ctx, {"model": BUNDLED_DRAFT.name})
    role.loaded = object()  # type: ignore[assignment]  # as if started; never drafted with

    def run(max_tokens: int) -> Request:
        meta = DraftRun(tuple(PROMPT), max_tokens, SamplingParams(), 0, None, "v").to_meta("j")
        return Request(None, Frame(MsgType.SPEC_DRAFT_RUN, 0, 1, meta))  # type: ignore[arg-type]

    role.active = 1  # one run in progress
    with pytest.raises(ProtocolError) as err:
        await role.on_run(run(10))
    assert err.value.code == ErrorCode.OVER_LIMIT
    assert "over the cap 1 (config key max_sessions_per_role)" in err.value.message
    role.active = 0
    with pytest.raises(ProtocolError) as err:
        await role.on_run(run(45))  # 20 + 45 tokens
    assert err.value.code == ErrorCode.OVER_LIMIT
    assert "over the cap 64 (config key max_session_tokens)" in err.value.message
    assert role.active == 0 and role.runs == 0  # nothing started
