"""The JobRunner over a fake cluster: refusals re-plan, the bound, kept members, lost members,
and every role released however the job ends."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from p2pllm.config import DaemonConfig
from p2pllm.daemon import state as ev
from p2pllm.daemon.cluster import find_node
from p2pllm.daemon.jobs import Job, JobHost
from p2pllm.daemon.runner import MAX_REPLANS, POLICY, Exclusions, JobRunner, Lost, MemberLost, Slot
from p2pllm.plan.partition import PlanError
from p2pllm.wire.connection import ConnectionClosed, RemoteError
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode, MsgType


class FakeCluster:
    """Nodes that answer ASSIGN as told, and remember what they hold."""

    def __init__(self, names: Sequence[str]) -> None:
        self.node_id = "n-a"
        self.name = "a"
        self.names = list(names)
        self.refuse: dict[tuple[str, str], tuple[int, str]] = {}  # (node, kind) -> (code, why)
        self.down: set[str] = set()
        self.held: dict[str, set[str]] = {f"n-{n}": set() for n in names}
        self.assigns: list[tuple[str, str]] = []

    def nodes(self) -> list[dict[str, Any]]:
        return [{"node_id": f"n-{n}", "name": n, "caps": {}, "self": n == "a"}
                for n in self.names if f"n-{n}" not in self.down]

    async def request(self, node_id: str, msg_type: MsgType, meta: dict[str, Any],
                      payload: Any = (), *, timeout: float | None = None) -> Any:
        await asyncio.sleep(0)
        if node_id in self.down:
            raise ConnectionClosed(f"{node_id} is down")
        if msg_type == MsgType.ASSIGN:
            self.assigns.append((node_id, meta["rid"]))
            hit = self.refuse.get((node_id, meta["role"]))
            if hit is not None:
                raise RemoteError(*hit)
            self.held[node_id].add(meta["rid"])
        elif msg_type == MsgType.RELEASE:
            self.held[node_id].discard(meta["rid"])
        return None

    def holding(self) -> dict[str, set[str]]:
        return {k: v for k, v in self.held.items() if v}


class Ring:
    """A toy pillar: ``count`` slots of kind "part", one per node in name order, each slot's
    params naming its successor (so a changed neighbour changes the slot); replays while
    ``replays`` is positive."""

    def __init__(self, count: int, *, replays: int = 0, share: bool = False) -> None:
        self.count = count
        self.replays = replays
        self.share = share  # after a loss a node may take several parts
        self.runs = 0
        self.fail_with: list[BaseException] = []
        self.plans: list[list[str]] = []

    def plan(self, nodes: Sequence[Mapping[str, Any]], excluded: Exclusions) -> list[Slot]:
        ok = [n for n in nodes if excluded.allows(n["node_id"], "part")]
        if not ok:
            raise PlanError("no node takes a part: " + "; ".join(excluded.reasons()))
        if len(ok) < self.count and not (self.share and excluded.lost):
            raise PlanError(f"{self.count} parts need {self.count} nodes, {len(ok)} can take one")
        hosts = [ok[i * len(ok) // self.count] for i in range(self.count)] if len(ok) < self.count \
            else ok[:self.count]
        self.plans.append([h["name"] for h in hosts])
        return [Slot(f"part{i}", "part", h["node_id"],
                     {"next": hosts[(i + 1) % self.count]["node_id"]}, summary=f"part {i}",
                     label=f"part {i} on {h['name']}")
                for i, h in enumerate(hosts)]

    async def run(self, job: Job, members: Mapping[tuple[str, str], Slot]) -> list[str]:
        self.runs += 1
        if self.fail_with:
            raise self.fail_with.pop(0)
        return sorted(f"{s.rid}@{s.node_id}" for s in members.values())

    def replay(self, lost: Lost) -> bool:
        self.replays -= 1
        return self.replays >= 0


def host_for(cluster: FakeCluster) -> tuple[JobHost, dict[str, Any]]:
    state = {"s": ev.State(node=ev.NodeInfo("n-a", "a", "", {}))}

    def emit(e: ev.Event) -> None:
        state["s"] = ev.apply(state["s"], e)

    return JobHost(cluster, DaemonConfig(), emit, {}), state


def job_record(state: dict[str, Any]) -> dict[str, Any]:
    (job,) = ev.snapshot(state["s"], 0.0)["jobs"]
    return job


async def run_ring(cluster: FakeCluster, pillar: Ring, **kw: Any) -> tuple[Any, JobRunner]:
    host, _ = host_for(cluster)
    async with host.job("ring", {}) as job:
        runner = JobRunner(job, pillar, what="ring", **kw)
        return await runner.run(), runner


async def test_a_refusal_excludes_that_node_and_role_and_re_plans() -> None:
    c = FakeCluster(["a", "b", "c", "d"])
    c.refuse[("n-b", "part")] = (ErrorCode.REFUSED, "no memory")
    host, state = host_for(c)
    async with host.job("ring", {}) as job:
        runner = JobRunner(job, Ring(2), what="ring")
        got = await runner.run()
    assert got == ["part0@n-a", "part1@n-c"]
    assert runner.excluded.refused == {("n-b", "part"): "b refused part: no memory"}
    metrics = job_record(state)["metrics"]["runner"]
    assert metrics["policy"] == POLICY and metrics["plans"] == 2
    assert [(r["name"], r["role"], r["reason"]) for r in metrics["refusals"]] == [
        ("b", "part", "no memory")]
    assert c.holding() == {}  # released at the end


async def test_refusals_past_the_bound_fail_listing_every_reason() -> None:
    names = [chr(ord("a") + i) for i in range(MAX_REPLANS + 3)]
    c = FakeCluster(names)
    for n in names[1:]:
        c.refuse[(f"n-{n}", "part")] = (ErrorCode.REFUSED, f"{n} is full")
    with pytest.raises(ProtocolError) as err:
        await run_ring(c, Ring(2))
    assert err.value.code == ErrorCode.REFUSED
    assert f"after {MAX_REPLANS} re-plans" in err.value.message and POLICY in err.value.message
    for n in names[1:MAX_REPLANS + 2]:  # one new refusal per plan, all of them listed
        assert f"{n} refused part: {n} is full" in err.value.message
    # the first plan and MAX_REPLANS more, no further; part0's successor changes every time
    assert len(c.assigns) == 2 * (MAX_REPLANS + 1)
    assert f"{names[MAX_REPLANS + 2]} refused" not in err.value.message
    assert c.holding() == {}


async def test_a_planner_that_runs_out_of_nodes_names_the_refusals() -> None:
    c = FakeCluster(["a", "b"])
    c.refuse[("n-b", "part")] = (ErrorCode.REFUSED, "pinned elsewhere")
    with pytest.raises(ProtocolError) as err:
        await run_ring(c, Ring(2))
    assert err.value.code == ErrorCode.REFUSED
    assert "re-planned without the nodes that refused" in err.value.message
    assert "b refused part: pinned elsewhere" in err.value.message
    assert "2 parts need 2 nodes" in err.value.message
    assert c.holding() == {}


async def test_other_errors_fail_at_once_without_re_planning() -> None:
    c = FakeCluster(["a", "b", "c"])
    c.refuse[("n-b", "part")] = (ErrorCode.NOT_FOUND, "dataset /x does not exist")
    pillar = Ring(2)
    with pytest.raises(ProtocolError) as err:
        await run_ring(c, pillar)
    assert err.value.code == ErrorCode.NOT_FOUND
    assert err.value.message == "ring: part 1 on b: dataset /x does not exist"
    assert pillar.plans == [["a", "b"]] and pillar.runs == 0
    assert c.holding() == {}


async def test_an_unreachable_node_is_planned_around_like_a_refusal() -> None:
    c = FakeCluster(["a", "b", "c"])
    c.down.add("n-b")
    c.names = ["a", "b", "c"]
    c.nodes = lambda: [{"node_id": f"n-{n}", "name": n, "caps": {}, "self": n == "a"}  # type: ignore[method-assign]
                       for n in ("a", "b", "c")]  # still listed: its link is not down yet
    got, runner = await run_ring(c, Ring(2))
    assert got == ["part0@n-a", "part1@n-c"]
    assert "unreachable" in runner.excluded.refused[("n-b", "part")]


async def test_members_whose_slot_is_unchanged_are_kept_not_reloaded() -> None:
    c = FakeCluster(["a", "b", "c", "d"])
    c.refuse[("n-c", "part")] = (ErrorCode.REFUSED, "busy")
    pillar = Ring(3)
    got, runner = await run_ring(c, pillar)
    # plan 1: a, b, c (c refuses); plan 2: a, b, d: part0 on a changed (its next is still b:
    # kept), part1 on b changed (next c -> d: reloaded), part2 moved to d
    assert pillar.plans == [["a", "b", "c"], ["a", "b", "d"]]
    assert c.assigns.count(("n-a", "part0")) == 1
    assert c.assigns.count(("n-b", "part1")) == 2
    assert runner.kept == 1 and got == ["part0@n-a", "part1@n-b", "part2@n-d"]
    assert c.holding() == {}


async def test_a_lost_member_is_replayed_on_the_survivors_one_taking_two_parts() -> None:
    c = FakeCluster(["a", "b", "c"])
    pillar = Ring(3, replays=1, share=True)
    pillar.fail_with = [MemberLost("part1", "connection closed", node_id="n-b")]

    async def kill_then_run(job: Job, members: Mapping[tuple[str, str], Slot]) -> list[str]:
        if pillar.fail_with:
            c.down.add("n-b")
        return await Ring.run(pillar, job, members)

    pillar.run = kill_then_run  # type: ignore[method-assign]
    host, state = host_for(c)
    async with host.job("ring", {}) as job:
        runner = JobRunner(job, pillar, what="ring")
        got = await runner.run()
        # (b is dead: it cannot be released, and holds nothing once it restarts)
        assert c.holding() == {"n-a": {"part0", "part1"}, "n-b": {"part1"}, "n-c": {"part2"}}
        # the dead member left the job's live list (ctl jobs / the dashboard), noted as lost;
        # part0, re-placed with a new slot, was released and assigned again
        record = job_record(state)
        assert sorted((m["node_id"], m["rid"]) for m in record["members"]) == [
            ("n-a", "part0"), ("n-a", "part1"), ("n-c", "part2")]
        assert [(m["node_id"], m["rid"], m["reason"]) for m in record["left"]] == [
            ("n-b", "part1", "lost"), ("n-a", "part0", "released")]
    assert pillar.plans == [["a", "b", "c"], ["a", "a", "c"]]
    assert got == ["part0@n-a", "part1@n-a", "part2@n-c"] and runner.replays == 1
    lost = job_record(state)["metrics"]["runner"]["lost"]
    assert [(x["name"], x["rid"]) for x in lost] == [("b", "part1")]
    assert c.holding() == {"n-b": {"part1"}}
    # all released when the job ended; the finished job's record keeps who held its roles
    assert sorted((m["node_id"], m["rid"]) for m in job_record(state)["members"]) == [
        ("n-a", "part0"), ("n-a", "part1"), ("n-c", "part2")]
    assert [m["rid"] for m in job_record(state)["left"]] == ["part1", "part0"]


async def test_a_lost_member_without_replay_fails_naming_it() -> None:
    c = FakeCluster(["a", "b", "c"])
    pillar = Ring(3)
    pillar.fail_with = [MemberLost("part1", "the node died", node_id="n-b")]
    with pytest.raises(ProtocolError) as err:
        await run_ring(c, pillar)
    assert err.value.code == ErrorCode.PEER_DOWN
    assert err.value.message == ("ring: lost part 1 on b (b n-b, rid part1, holding part 1): "
                                 "the node died")
    assert c.holding() == {}


async def test_a_replay_the_survivors_cannot_take_names_the_lost_member() -> None:
    c = FakeCluster(["a", "b", "c"])
    pillar = Ring(3, replays=5)  # no sharing: 3 parts need 3 nodes
    pillar.fail_with = [MemberLost("part2", "connection closed", node_id="n-c")]
    with pytest.raises(ProtocolError) as err:
        await run_ring(c, pillar)
    assert err.value.code == ErrorCode.PEER_DOWN
    assert "lost part 2 on c" in err.value.message
    assert "the survivors cannot take over: 3 parts need 3 nodes" in err.value.message
    assert c.holding() == {}


async def test_every_role_is_released_when_the_job_fails_or_is_cancelled() -> None:
    c = FakeCluster(["a", "b"])
    pillar = Ring(2)
    pillar.fail_with = [RuntimeError("boom")]
    with pytest.raises(RuntimeError):
        await run_ring(c, pillar)
    assert c.holding() == {}

    started = asyncio.Event()

    async def forever(job: Job, members: Mapping[tuple[str, str], Slot]) -> None:
        started.set()
        await asyncio.Event().wait()

    pillar.run = forever  # type: ignore[method-assign]
    task = asyncio.create_task(run_ring(c, pillar))
    await started.wait()
    assert c.holding() == {"n-a": {"part0"}, "n-b": {"part1"}}
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert c.holding() == {}


async def test_a_plan_on_an_excluded_node_is_a_planner_bug() -> None:
    c = FakeCluster(["a", "b", "c"])
    c.refuse[("n-b", "part")] = (ErrorCode.REFUSED, "no")

    class Stubborn(Ring):
        def plan(self, nodes: Sequence[Mapping[str, Any]], excluded: Exclusions) -> list[Slot]:
            return Ring.plan(self, nodes, Exclusions())

    with pytest.raises(ProtocolError) as err:
        await run_ring(c, Stubborn(2))
    assert err.value.code == ErrorCode.INTERNAL and "excluded node" in err.value.message


def test_find_node_by_id_name_prefix_and_its_errors() -> None:
    nodes = [{"node_id": "abc123", "name": "x", "address": "h:1"},
             {"node_id": "abd456", "name": "y", "address": "h:2"}]
    assert find_node(nodes, "abc123")["name"] == "x"
    assert find_node(nodes, "h:2")["name"] == "y"
    assert find_node(nodes, "y")["node_id"] == "abd456"
    assert find_node(nodes, "abd")["name"] == "y"
    with pytest.raises(PlanError, match="several") as e:
        find_node(nodes, "ab")
    assert e.value.code == ErrorCode.BAD_REQUEST
    with pytest.raises(PlanError, match="no node 'z'") as e:
        find_node(nodes, "z")
    assert e.value.code == ErrorCode.NOT_FOUND


def test_the_peer_table_finds_peers_with_the_same_query() -> None:
    from p2pllm.daemon.peers import PeerLink, PeerTable

    class Open:
        closed = False

    table = PeerTable("me", DaemonConfig(), lambda e: None, lambda n, m: None)
    for nid, name, addr in (("abc123", "x", "h:1"), ("abd456", "y", "h:2"), ("zzz", "gone", "h:3")):
        table.links[nid] = PeerLink(nid, name, addr, conn=Open() if name != "gone" else None)  # type: ignore[arg-type]
    assert table.find("y").node_id == "abd456" and table.find("h:1").name == "x"
    with pytest.raises(ProtocolError) as err:
        table.find("ab")
    assert err.value.code == ErrorCode.BAD_REQUEST and "several" in err.value.message
    with pytest.raises(ProtocolError) as err:
        table.find("gone")  # not connected
    assert err.value.code == ErrorCode.NOT_FOUND
