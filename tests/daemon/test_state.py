"""The state reducer's job members: released and lost members leave the live list and go to
the job's history with why."""

from __future__ import annotations

from p2pllm.daemon import state as ev


def started() -> ev.State:
    s = ev.State(node=ev.NodeInfo("n-a", "a", "", {}))
    s = ev.apply(s, ev.JobStarted("split-1", "split", "n-a", 1.0))
    for node, rid in (("n-a", "shard-0"), ("n-b", "shard-1"), ("n-c", "shard-2")):
        s = ev.apply(s, ev.JobMember("split-1", node, rid, "shard", f"{rid} layers"))
    return s


def live(s: ev.State) -> list[tuple[str, str]]:
    return [(m["node_id"], m["rid"]) for m in s.jobs["split-1"]["members"]]


def test_a_lost_member_leaves_the_live_list_and_is_kept_in_the_history() -> None:
    s = ev.apply(started(), ev.JobMemberLeft("split-1", "n-b", "shard-1", "lost"))
    assert live(s) == [("n-a", "shard-0"), ("n-c", "shard-2")]
    assert s.jobs["split-1"]["left"] == [
        {"node_id": "n-b", "rid": "shard-1", "role": "shard", "summary": "shard-1 layers",
         "reason": "lost"}]
    # the replay places shard-1 on a survivor: live again there, the loss still in the history
    s = ev.apply(s, ev.JobMember("split-1", "n-a", "shard-1", "shard", "replayed"))
    assert live(s) == [("n-a", "shard-0"), ("n-c", "shard-2"), ("n-a", "shard-1")]
    assert [m["node_id"] for m in s.jobs["split-1"]["left"]] == ["n-b"]
    (job,) = ev.snapshot(s, 2.0)["jobs"]
    assert len(job["members"]) == 3 and len(job["left"]) == 1


def test_released_members_leave_in_order_and_unknown_ones_change_nothing() -> None:
    s = started()
    for node, rid in (("n-c", "shard-2"), ("n-a", "shard-0"), ("n-b", "shard-1")):
        s = ev.apply(s, ev.JobMemberLeft("split-1", node, rid, "released"))
    assert live(s) == []
    assert [(m["rid"], m["reason"]) for m in s.jobs["split-1"]["left"]] == [
        ("shard-2", "released"), ("shard-0", "released"), ("shard-1", "released")]
    same = ev.apply(s, ev.JobMemberLeft("split-1", "n-z", "shard-9", "lost"))
    assert same is s
    assert ev.apply(s, ev.JobMemberLeft("no-such-job", "n-a", "shard-0", "lost")) is s


def test_the_same_rid_on_two_nodes_leaves_only_the_one_named() -> None:
    s = ev.apply(started(), ev.JobMember("split-1", "n-c", "shard-1", "shard", ""))
    s = ev.apply(s, ev.JobMemberLeft("split-1", "n-b", "shard-1", "lost"))
    assert live(s) == [("n-a", "shard-0"), ("n-c", "shard-2"), ("n-c", "shard-1")]
