"""Authorization (issue 12 item 5, protocol.md 4.4): an authenticated but hostile peer cannot
act on jobs it is not part of, ctl clients and peers cannot pose as each other, and the echo
test role is off unless a daemon is started with --test-roles.

Real p2pllmd processes on 127.0.0.1 ("a" with --test-roles, "b" without, b dials a) and a
hostile peer made the way a real one is (connect + client_handshake, tests/security/conftest.py
`hostile`). Every attempt gets its typed error, the jobs it aimed at still finish with the right
output, and a legitimate client is served afterwards. The JobRunner's member lists (ASSIGN
``members``, JOB_MEMBERS after a re-plan) are checked over the fake cluster of
tests/daemon/test_runner.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from p2pllm.daemon.authz import CLIENT_REQUESTS, OPERATOR_ONLY, Grant, kind_refusal
from p2pllm.daemon.runner import JobRunner, MemberLost, Slot
from p2pllm.engine.generate import generate_ids
from p2pllm.engine.loader import load_slice
from p2pllm.engine.sampling import SamplingParams
from p2pllm.net.auth import hello_meta
from p2pllm.pillars.speculative.messages import DraftRun
from p2pllm.wire.connection import Connection, RemoteError
from p2pllm.wire.messages import ErrorCode, MsgType
from p2pllm.wire.tensors import tensor_meta
from tests.conftest import BUNDLED, BUNDLED_DRAFT, DaemonProc, open_peer, wait_for
from tests.daemon.test_runner import FakeCluster, Ring, host_for
from tests.security.conftest import TIMEOUT, assert_still_serves, hostile, log_problems

TARGET, DRAFT = BUNDLED.name, BUNDLED_DRAFT.name  # bundled models: every daemon has them
PROMPT = [1, 2, 3]

# -- the kind table and the grant, as pure functions ------------------------------------------


def test_ctl_may_send_only_client_requests() -> None:
    for t in MsgType:
        why = kind_refusal("ctl", t, local=False)
        assert (why is None) == (t in CLIENT_REQUESTS), t
    for t in (MsgType.ASSIGN, MsgType.RELEASE, MsgType.JOB_MEMBERS, MsgType.SHARD_FORWARD,
              MsgType.CAPS_UPDATE, MsgType.GOODBYE, MsgType.ROLE_CALL):
        assert "only client requests" in (kind_refusal("ctl", t, local=False) or ""), t
    assert {MsgType.STATUS, MsgType.SUBSCRIBE, MsgType.JOBS, MsgType.JOB_STOP, MsgType.LINK_PROBE,
            MsgType.PING, MsgType.GENERATE, MsgType.FL_RUN, MsgType.TRAIN_RUN,
            MsgType.WEIGHTS_PULL} == CLIENT_REQUESTS


def test_a_peer_may_send_anything_but_the_operators_job_requests() -> None:
    assert OPERATOR_ONLY == {MsgType.GENERATE, MsgType.FL_RUN, MsgType.TRAIN_RUN, MsgType.WEIGHTS_PULL}
    for t in MsgType:
        why = kind_refusal("peer", t, local=False)
        assert (why is None) == (t not in OPERATOR_ONLY), t
    assert "only a ctl client" in (kind_refusal("peer", MsgType.GENERATE, local=False) or "")


def test_self_is_only_the_in_process_connection() -> None:
    for t in MsgType:
        assert kind_refusal("self", t, local=True) is None
        assert kind_refusal("self", t, local=False) is not None  # a socket cannot be "self"
        assert kind_refusal("peer", t, local=True) is not None
    assert kind_refusal("robot", MsgType.STATUS, local=False) == "unknown connection kind 'robot'"


def test_a_grant_lets_its_coordinator_and_named_members_send() -> None:
    g = Grant("coord")
    assert g.may_send("coord") and not g.may_send("x") and not g.may_send("")
    g.name(["m1", "m2"])
    assert g.may_send("m1") and g.may_send("m2") and not g.may_send("x")
    g.name(["m2"])  # a new list replaces the old one: m1 is no longer a member
    assert not g.may_send("m1") and g.may_send("m2") and g.may_send("coord")


# -- the runner names the placement's nodes, and updates kept members after a re-plan ---------


class Recording(FakeCluster):
    def __init__(self, names: list[str]) -> None:
        super().__init__(names)
        self.sent: list[tuple[str, MsgType, dict[str, Any]]] = []

    async def request(self, node_id: str, msg_type: MsgType, meta: dict[str, Any],
                      payload: Any = (), *, timeout: float | None = None) -> Any:
        self.sent.append((node_id, msg_type, dict(meta)))
        return await super().request(node_id, msg_type, meta, payload, timeout=timeout)

    def of(self, t: MsgType) -> list[tuple[str, str | None, tuple[str, ...]]]:
        return [(n, m.get("rid"), tuple(m["members"])) for n, tt, m in self.sent if tt == t]


async def test_assigns_name_the_whole_placement_and_a_kept_member_gets_the_new_list() -> None:
    c = Recording(["a", "b", "c", "d"])
    c.refuse[("n-c", "part")] = (ErrorCode.REFUSED, "busy")
    host, _ = host_for(c)
    async with host.job("ring", {}) as job:
        await JobRunner(job, Ring(3), what="ring").run()
    first, second = ("n-a", "n-b", "n-c"), ("n-a", "n-b", "n-d")
    # plan 1 on a, b, c (c refuses); plan 2 on a, b, d: part0 on a is kept with plan 1's list
    assert c.of(MsgType.ASSIGN) == [("n-a", "part0", first), ("n-b", "part1", first),
                                    ("n-c", "part2", first), ("n-b", "part1", second),
                                    ("n-d", "part2", second)]
    assert c.of(MsgType.JOB_MEMBERS) == [("n-a", None, second)]  # b and d got it in ASSIGN


async def test_after_a_loss_the_survivors_kept_hear_that_the_lost_node_is_out() -> None:
    c = Recording(["a", "b", "c"])
    pillar = Ring(3, replays=1, share=True)
    pillar.fail_with = [MemberLost("part1", "connection closed", node_id="n-b")]

    async def kill_then_run(job: Any, members: Mapping[tuple[str, str], Slot]) -> list[str]:
        if pillar.fail_with:
            c.down.add("n-b")
        return await Ring.run(pillar, job, members)

    pillar.run = kill_then_run  # type: ignore[method-assign]
    host, _ = host_for(c)
    async with host.job("ring", {}) as job:
        got = await JobRunner(job, pillar, what="ring").run()
    assert got == ["part0@n-a", "part1@n-a", "part2@n-c"]
    # the replay places a, a, c: part2 on c is kept and told the new list without b
    assert c.of(MsgType.JOB_MEMBERS) == [("n-c", None, ("n-a", "n-c"))]
    assert [m for n, rid, m in c.of(MsgType.ASSIGN) if n == "n-a"][-1] == ("n-a", "n-c")


# -- real daemons ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProc, DaemonProc]]:
    root = tmp_path_factory.mktemp("authz")
    a = DaemonProc("a", ["--no-mdns", "--test-roles", "--state-dir", str(root / "a")], root).wait_ready()
    b = DaemonProc("b", ["--no-mdns", "--peer", a.address, "--state-dir", str(root / "b")],
                   root).wait_ready()
    yield a, b
    for d in (a, b):
        d.stop()
    for d in (a, b):  # refusals are answers, not crashes
        assert not log_problems(d.log_path.read_text()), d.name


@contextlib.asynccontextmanager
async def connections() -> AsyncIterator[list[Connection]]:
    opened: list[Connection] = []
    try:
        yield opened
    finally:
        for c in opened:
            c.close()


async def code_of(call: Any) -> int:
    with pytest.raises(RemoteError) as err:
        await call
    return err.value.code


async def first_frame(conn: Connection, t: MsgType, meta: dict[str, Any]) -> Any:
    return await anext(conn.stream(t, meta, idle_timeout=TIMEOUT))


async def linked(a: DaemonProc, b: DaemonProc) -> None:
    async def up() -> bool:
        async with connections() as cs:
            cs.append(await hostile(a.port, kind="ctl", name="check"))
            snap = (await cs[0].request(MsgType.STATUS, {}, timeout=TIMEOUT)).meta
            return any(p["node_id"] == b.node_id and p["state"] == "up" for p in snap["peers"])

    await wait_for(up, timeout=30, what="a and b linked")


async def roles(port: int, job: str) -> list[str]:
    async with connections() as cs:
        cs.append(await hostile(port, kind="ctl", name="check"))
        snap = (await cs[0].request(MsgType.STATUS, {}, timeout=TIMEOUT)).meta
    return sorted(r["rid"] for r in snap["node"]["roles"] if r["job"] == job)


async def split(conn: Connection, **meta: Any) -> dict[str, Any]:
    body = {"mode": "split", "model": TARGET, "prompt_ids": PROMPT, "max_tokens": 8, **meta}
    frames = [f async for f in conn.stream(MsgType.GENERATE, body, idle_timeout=120)]
    return dict(frames[-1].meta)


def reference(path: Path, max_tokens: int = 8) -> list[int]:
    torch.set_num_threads(1)
    return list(generate_ids(load_slice(path), PROMPT, max_tokens=max_tokens).token_ids)


async def test_connection_kinds_and_the_echo_role(pair: tuple[DaemonProc, DaemonProc]) -> None:
    a, b = pair
    echo = {"job": "authz-echo", "rid": "echo", "role": "echo", "params": {"x": 1}}
    async with connections() as cs:
        ctl = await hostile(a.port, kind="ctl", name="operator")
        evil = await hostile(a.port, kind="peer", name="evil")
        cs += [ctl, evil]
        # a ctl client may not act as a peer: ASSIGN, RELEASE, member lists, role frames
        for t, meta in ((MsgType.ASSIGN, echo), (MsgType.RELEASE, {"job": "authz-echo"}),
                        (MsgType.JOB_MEMBERS, {"job": "authz-echo", "members": []}),
                        (MsgType.ROLE_CALL, {"job": "authz-echo"}),
                        (MsgType.SHARD_FORWARD, {"job": "authz-echo", "session": "s", "pos": 0}),
                        (MsgType.CAPS_UPDATE, {"caps": {}})):
            with pytest.raises(RemoteError) as err:
                await ctl.request(t, meta, timeout=TIMEOUT)
            assert err.value.code == ErrorCode.FORBIDDEN, t
            assert "only client requests" in err.value.message and t.name in err.value.message
        assert await roles(a.port, "authz-echo") == []
        # a peer may not start jobs on behalf of a's operator
        for t, meta in ((MsgType.GENERATE, {"mode": "split", "model": TARGET, "prompt_ids": PROMPT}),
                        (MsgType.FL_RUN, {}), (MsgType.TRAIN_RUN, {})):
            assert await code_of(first_frame(evil, t, meta)) == ErrorCode.FORBIDDEN, t
        # a socket that says it is "self", or that gives a's own node id, is refused everything
        fake_self = await hostile(a.port, kind="self", name="fake-self")
        fake_a = await hostile(a.port, kind="peer", node_id=a.node_id, name="fake-a")
        cs += [fake_self, fake_a]
        for conn in (fake_self, fake_a):
            assert await code_of(conn.request(MsgType.STATUS, {}, timeout=TIMEOUT)) == ErrorCode.FORBIDDEN
        # nor become one by a second HELLO: kind and node id are fixed at the handshake
        again = hello_meta("peer-again", "again", "peer", 0, bytes(16))
        for t, meta in ((MsgType.HELLO, again), (MsgType.AUTH, {"proof": bytes(32)})):
            with pytest.raises(RemoteError) as err:
                await ctl.request(t, meta, timeout=TIMEOUT)
            assert err.value.code == ErrorCode.FORBIDDEN and "already authenticated as ctl" in err.value.message
        assert await code_of(ctl.request(MsgType.ASSIGN, echo, timeout=TIMEOUT)) == ErrorCode.FORBIDDEN
        # echo only where --test-roles turned it on
        on_b = await hostile(b.port, kind="peer", name="coordinator")
        cs.append(on_b)
        with pytest.raises(RemoteError) as err:
            await on_b.request(MsgType.ASSIGN, echo, timeout=TIMEOUT)
        assert err.value.code == ErrorCode.REFUSED and "unknown role 'echo'" in err.value.message
        assert await roles(b.port, "authz-echo") == []
        ack = await evil.request(MsgType.ASSIGN, echo, timeout=TIMEOUT)
        assert ack.meta == {"job": "authz-echo", "rid": "echo"}
        assert (await evil.request(MsgType.ROLE_CALL, {"job": "authz-echo", "data": 7},
                                   timeout=TIMEOUT)).meta["echo"] == 7
        # the operator is still served, and PING/STATUS too
        assert (await ctl.request(MsgType.STATUS, {}, timeout=TIMEOUT)).meta["node"]["name"] == "a"
    # its coordinator's link closed: a releases the role it assigned
    await wait_for(lambda: _none(roles(a.port, "authz-echo")), timeout=15, what="echo released")
    await assert_still_serves(a.port)
    await assert_still_serves(b.port)


async def _none(coro: Any) -> bool:
    return not await coro


async def test_a_non_member_cannot_touch_a_running_split_job(pair: tuple[DaemonProc, DaemonProc]) -> None:
    a, b = pair
    await linked(a, b)
    want = reference(BUNDLED)
    async with connections() as cs:
        operator = await hostile(a.port, kind="ctl", name="operator")
        cs.append(operator)
        res = await split(operator, shards=2, keep_alive=60)
        job = res["job"]
        assert res["token_ids"] == want
        held = {s["node_id"]: s["rid"] for s in res["shards"]}
        assert set(held) == {a.node_id, b.node_id}  # one shard each: b's takes a's hidden states
        evil = {d.node_id: await hostile(d.port, kind="peer", name="evil") for d in (a, b)}
        cs += list(evil.values())
        h = load_slice(BUNDLED).config.hidden_size
        for d in (a, b):
            conn, rid = evil[d.node_id], held[d.node_id]
            hidden_meta, payload = tensor_meta({"hidden": torch.zeros(3, h)},
                                               {"job": job, "rid": rid, "session": "s", "pos": 0})
            attempts = [
                conn.request(MsgType.RELEASE, {"job": job}, timeout=TIMEOUT),
                conn.request(MsgType.RELEASE, {"job": job, "rid": rid}, timeout=TIMEOUT),
                conn.request(MsgType.JOB_MEMBERS, {"job": job, "members": ["evil"]}, timeout=TIMEOUT),
                conn.request(MsgType.ASSIGN, {"job": job, "rid": "evil", "role": "shard",
                                              "params": {}}, timeout=TIMEOUT),
                first_frame(conn, MsgType.SHARD_OPEN, {"job": job, "rid": rid, "session": "s",
                                                       "max_len": 16}),
                conn.request(MsgType.SHARD_FORWARD, hidden_meta, payload, timeout=TIMEOUT),
                conn.request(MsgType.SHARD_CLOSE, {"job": job, "rid": rid, "session": "s"},
                             timeout=TIMEOUT),
                # the check comes before the type is looked up: any pillar's frames, same answer
                conn.request(MsgType.SPEC_VERIFY, {"job": job, "session": 1, "start": 0,
                                                   "tokens": [1]}, timeout=TIMEOUT),
                conn.request(MsgType.FL_TRAIN, {"job": job, "round": 1}, timeout=TIMEOUT),
                conn.request(MsgType.TRAIN_FORWARD, {"job": job, "step": 0}, timeout=TIMEOUT),
                conn.request(MsgType.TRAIN_TIED, {"job": job, "step": 0}, timeout=TIMEOUT),
                conn.request(MsgType.ROLE_CALL, {"job": job}, timeout=TIMEOUT),
                conn.request(MsgType.JOB_STOP, {"job": job}, timeout=TIMEOUT),
                conn.request(MsgType.JOB_STOP, {"job": job, "forwarded": True}, timeout=TIMEOUT),
            ]
            for i, attempt in enumerate(attempts):
                with pytest.raises(RemoteError) as err:
                    await attempt
                assert err.value.code == ErrorCode.FORBIDDEN, (d.name, i, err.value)
                assert job in err.value.message, err.value.message
            # one-way, as shards send to each other: dropped, nothing answers
            await conn.notify(MsgType.SHARD_FORWARD, hidden_meta, payload)
            # a job this node does not hold: UNKNOWN_JOB, as for anyone
            assert await code_of(conn.request(MsgType.ROLE_CALL, {"job": "no-such-job"},
                                              timeout=TIMEOUT)) == ErrorCode.UNKNOWN_JOB
            assert await roles(d.port, job) == [held[d.node_id]]
        for conn in evil.values():
            conn.close()
        # the same pipeline (shard hops b <- a -> b, tokens back to the first shard) still runs
        again = await split(operator, shards=2)
        assert again["job"] == job and again["token_ids"] == want
        # the operator of the coordinating daemon stops it; every shard is released
        stopped = await operator.request(MsgType.JOB_STOP, {"job": job}, timeout=30)
        assert stopped.meta == {"stopped": job, "where": "coordinator"}
    for d in (a, b):
        await wait_for(lambda d=d: _none(roles(d.port, job)), timeout=15, what=f"{d.name} released")
    # the operator of a member host may stop it too: b forwards the stop to a, which obeys its
    # member, and releases its own shard
    async with connections() as cs:
        operator = await hostile(a.port, kind="ctl", name="operator")
        on_b = await hostile(b.port, kind="ctl", name="operator-b")
        cs += [operator, on_b]
        job2 = (await split(operator, shards=2, keep_alive=60))["job"]
        assert job2 != job and await roles(b.port, job2)
        stopped = await on_b.request(MsgType.JOB_STOP, {"job": job2}, timeout=30)
        assert stopped.meta == {"stopped": job2, "where": "member"}

        async def state() -> str:
            jobs = (await operator.request(MsgType.JOBS, {"local": True}, timeout=TIMEOUT)).meta["jobs"]
            return next(j["state"] for j in jobs if j["job"] == job2)

        await wait_for(lambda: _is(state(), "stopped"), timeout=15, what="job stopped at a")
    for d in (a, b):
        await wait_for(lambda d=d: _none(roles(d.port, job2)), timeout=15, what=f"{d.name} released")
    await assert_still_serves(a.port)
    await assert_still_serves(b.port)


async def _is(coro: Any, value: Any) -> bool:
    return await coro == value


async def test_speculative_frames_only_from_the_members_the_coordinator_named(
        pair: tuple[DaemonProc, DaemonProc]) -> None:
    a, b = pair
    await linked(a, b)
    want = reference(BUNDLED)
    run = DraftRun(prompt=tuple(PROMPT), max_tokens=8, params=SamplingParams(), seed=0, window=2,
                   verifier=b.node_id)
    async with connections() as cs:
        # a hand-made coordinator (a peer) puts the verifier on b, naming a (the drafter's node)
        coord_b, coord_a = await open_peer(b.address), await open_peer(a.address)
        evil_b, evil_a = (await hostile(b.port, name="evil"), await hostile(a.port, name="evil"))
        cs += [coord_b, coord_a, evil_b, evil_a]
        for job, members in (("spec-named", [a.node_id]), ("spec-unnamed", [])):
            await coord_b.request(MsgType.ASSIGN, {"job": job, "rid": "verifier", "role": "verifier",
                                                   "params": {"model": TARGET}, "members": members},
                                  timeout=120)
            await coord_a.request(MsgType.ASSIGN, {"job": job, "rid": "drafter", "role": "drafter",
                                                   "params": {"model": DRAFT}}, timeout=120)
        job = "spec-named"
        opened = {"job": job, "prompt": PROMPT, "max_tokens": 4, "params": {}, "seed": 0}
        for attempt in (evil_b.request(MsgType.SPEC_OPEN, opened, timeout=TIMEOUT),
                        evil_b.request(MsgType.SPEC_VERIFY, {"job": job, "session": 1, "start": 3,
                                                             "tokens": [1]}, timeout=TIMEOUT),
                        evil_b.request(MsgType.SPEC_CLOSE, {"job": job, "session": 1}, timeout=TIMEOUT),
                        evil_b.request(MsgType.RELEASE, {"job": job}, timeout=TIMEOUT),
                        evil_a.request(MsgType.SPEC_DRAFT_RUN, run.to_meta(job), timeout=TIMEOUT),
                        evil_a.request(MsgType.RELEASE, {"job": job}, timeout=TIMEOUT)):
            assert await code_of(attempt) == ErrorCode.FORBIDDEN
        # the drafter on a (a named member) verifies on b: greedy = the target's own greedy
        result = (await coord_a.request(MsgType.SPEC_DRAFT_RUN, run.to_meta(job), timeout=120)).meta
        assert list(result["token_ids"]) == want
        # without a in the verifier's member list, the same run is refused at the verifier
        with pytest.raises(RemoteError) as err:
            await coord_a.request(MsgType.SPEC_DRAFT_RUN, run.to_meta("spec-unnamed"), timeout=120)
        assert err.value.code == ErrorCode.FORBIDDEN and "spec-unnamed" in err.value.message
        # JOB_MEMBERS from the coordinator names a: now it runs
        await coord_b.request(MsgType.JOB_MEMBERS, {"job": "spec-unnamed", "members": [a.node_id]},
                              timeout=TIMEOUT)
        again = (await coord_a.request(MsgType.SPEC_DRAFT_RUN, run.to_meta("spec-unnamed"),
                                       timeout=120)).meta
        assert list(again["token_ids"]) == want
        for j in ("spec-named", "spec-unnamed"):
            assert (await coord_b.request(MsgType.RELEASE, {"job": j}, timeout=30)).meta == {
                "released": ["verifier"]}
            await coord_a.request(MsgType.RELEASE, {"job": j}, timeout=30)
    await assert_still_serves(a.port)
    await assert_still_serves(b.port)


# -- JOB_STOP's decision table, on a stand-in daemon (every branch, no processes) -------------


class _Jobs:
    def __init__(self, running: dict[str, list[str]]) -> None:
        self.running = running  # job -> member node ids, of jobs coordinated here
        self.stopped: list[str] = []

    def get(self, job: str) -> Any:
        if job not in self.running:
            return None
        return type("J", (), {"members": [type("M", (), {"node_id": n})() for n in self.running[job]]})()

    def stop(self, job: str) -> bool:
        if job in self.running:
            self.stopped.append(job)
            return True
        return False


class _Hosting:
    def __init__(self, held: dict[str, str]) -> None:
        self.grants = {job: Grant(coord) for job, coord in held.items()}  # job -> coordinator
        self.roles = {job: {"r": object()} for job in held}
        self.released: list[str] = []

    def sender(self, conn: Any) -> str:
        return str(conn.info["node_id"])

    def coordinators(self, job: str) -> set[str]:
        return {self.grants[job].coordinator}

    async def release(self, job: str, rid: Any, reason: str) -> list[str]:
        self.released.append(job)
        return ["r"]


class _Daemon:
    node_id, name = "me", "me"

    def __init__(self, running: dict[str, list[str]], held: dict[str, str]) -> None:
        self.jobs, self.hosting = _Jobs(running), _Hosting(held)
        self.sent: list[tuple[str, MsgType, dict[str, Any]]] = []

    async def request(self, node: str, t: MsgType, meta: dict[str, Any], **kw: Any) -> Any:
        self.sent.append((node, t, meta))

    def nodes(self) -> list[dict[str, Any]]:
        return [{"node_id": "c", "name": "coord", "address": "10.0.0.3:7411"}]


async def test_job_stop_obeys_the_coordinators_operator_its_members_and_no_one_else() -> None:
    from types import SimpleNamespace

    from p2pllm.daemon.jobctl import JobControl

    def control(running: dict[str, list[str]], held: dict[str, str],
                elsewhere: tuple[dict[str, Any], ...] = ()) -> tuple[Any, _Daemon]:
        d = _Daemon(running, held)
        jc = JobControl(d)  # type: ignore[arg-type]

        async def peer_jobs() -> list[list[dict[str, Any]]]:
            return [list(elsewhere)]

        jc._peer_jobs = peer_jobs  # type: ignore[method-assign]
        return jc, d

    def req(kind: str, sender: str, **meta: Any) -> tuple[Any, Any]:
        return SimpleNamespace(info={"kind": kind, "node_id": sender}), SimpleNamespace(meta=meta)

    async def stop(jc: Any, kind: str, sender: str, **meta: Any) -> Any:
        return (await jc.on_job_stop(*req(kind, sender, **meta))).meta

    async def refused(jc: Any, kind: str, sender: str, **meta: Any) -> Any:
        with pytest.raises(Exception) as err:
            await jc.on_job_stop(*req(kind, sender, **meta))
        return err.value

    # a ctl client of the coordinating daemon: the job stops
    jc, d = control({"j": ["m"]}, {})
    assert await stop(jc, "ctl", "ctl-1", job="j") == {"stopped": "j", "where": "coordinator"}
    assert d.jobs.stopped == ["j"]
    # a ctl client of a member: forwarded once to the coordinator, the member's roles released
    jc, d = control({}, {"j": "c"})
    assert await stop(jc, "ctl", "ctl-1", job="j") == {"stopped": "j", "where": "member"}
    assert d.sent == [("c", MsgType.JOB_STOP, {"job": "j", "forwarded": True})]
    assert d.hosting.released == ["j"]
    # a ctl client of a daemon with no part in it: told where the job is coordinated
    jc, d = control({}, {}, ({"job": "j", "state": "running", "coordinator": "c"},))
    err = await refused(jc, "ctl", "ctl-1", job="j")
    assert err.code == ErrorCode.FORBIDDEN and "coord (10.0.0.3:7411)" in err.message
    assert d.sent == []
    assert (await refused(jc, "ctl", "ctl-1", job="other")).code == ErrorCode.UNKNOWN_JOB
    # peers: only the forwarded form
    jc, d = control({"j": ["m"]}, {})
    err = await refused(jc, "peer", "m", job="j")
    assert err.code == ErrorCode.FORBIDDEN and "forwarded" in err.message and d.jobs.stopped == []
    # ... at the coordinator from a member (its operator stopped it there), not from others
    assert (await refused(jc, "peer", "x", job="j", forwarded=True)).code == ErrorCode.FORBIDDEN
    assert d.jobs.stopped == []
    assert await stop(jc, "peer", "m", job="j", forwarded=True) == {"stopped": "j", "where": "coordinator"}
    # ... at a member from the coordinator, not from another member or a stranger
    jc, d = control({}, {"j": "c"})
    for who in ("m2", "x"):
        assert (await refused(jc, "peer", who, job="j", forwarded=True)).code == ErrorCode.FORBIDDEN
    assert d.hosting.released == []
    assert await stop(jc, "peer", "c", job="j", forwarded=True) == {"stopped": "j", "where": "member"}
    assert d.sent == []  # a forwarded stop is never forwarded again
    assert (await refused(jc, "peer", "c", job="nope", forwarded=True)).code == ErrorCode.UNKNOWN_JOB
