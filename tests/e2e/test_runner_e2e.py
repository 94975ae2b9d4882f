"""Every pillar's job goes through the JobRunner: real daemons that refuse a role, and a shard
SIGKILLed mid-generation.

- split: a shard refuses (its advertised model went missing) -> the runner excludes it and
  re-plans; three daemons, three shards, one killed -> the two survivors finish (one holding
  two ranges) with the local greedy output; without retries the error names the lost shard;
- split training: a stage refuses -> the same runner path;
- speculative: the verifier refuses -> the same runner path;
- federated: a client refuses -> the same runner path.

"The same path" is observable: each job's metrics carry the runner's record (its policy, the
refusals it planned around, the members it lost).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from p2pllm.cli.client import open_daemon
from p2pllm.daemon.runner import POLICY
from p2pllm.engine.generate import generate_ids
from p2pllm.engine.loader import load_slice
from p2pllm.wire.connection import RemoteError
from p2pllm.wire.messages import ErrorCode, MsgType
from tests.conftest import DaemonProc, shared_model, wait_for

FAST = ("--no-mdns", "--keepalive-timeout", "2")
PROMPT_IDS = [1, 403, 407, 261, 378]
# Long generations (up to the model's 512 positions), killed after 10 tokens: the kill lands
# while the session runs.
GB = 1 << 30


def budget(root: Path, name: str, gb: int) -> str:
    cfg = root / f"{name}.yaml"
    cfg.write_text(f"memory_budget: {gb * GB}\nkeepalive_interval: 0.3\nkeepalive_timeout: 2\n")
    return str(cfg)


def models_with(root: Path, name: str, model: Path) -> Path:
    """A models dir holding a copy of ``model`` (a copy: deleting it takes it away)."""
    d = root / f"{name}-models"
    d.mkdir()
    shutil.copytree(model, d / model.name)
    return d


def start_three(daemons: Any, root: Path, model: Path) -> list[DaemonProc]:
    """a, b, c with budgets 3, 2, 1 GB (so plans are deterministic), each peered with the
    ones started before it."""
    procs: list[DaemonProc] = []
    for n, gb in (("a", 3), ("b", 2), ("c", 1)):
        peers = [x for d in procs for x in ("--peer", d.address)]
        procs.append(daemons(n, *FAST, "--config", budget(root, n, gb), *peers,
                             "--models-dir", str(models_with(root, n, model))))
    return procs


async def meshed(procs: list[DaemonProc]) -> None:
    async def check() -> bool:
        for d in procs:
            conn = await open_daemon(d.address)
            try:
                snap = (await conn.request(MsgType.STATUS, {}, timeout=10)).meta
            finally:
                conn.close()
            if sum(p["state"] == "up" for p in snap["peers"]) < len(procs) - 1:
                return False
        return True

    await wait_for(check, timeout=30, what="every daemon connected to every other")


async def jobs_of(d: DaemonProc, pillar: str) -> list[dict[str, Any]]:
    conn = await open_daemon(d.address)
    try:
        jobs = (await conn.request(MsgType.JOBS, {"local": True}, timeout=10)).meta["jobs"]
    finally:
        conn.close()
    return [j for j in jobs if j["pillar"] == pillar]


def refusals(job: dict[str, Any]) -> list[tuple[str, str]]:
    runner = job["metrics"]["runner"]
    assert runner["policy"] == POLICY
    return [(r["name"], r["role"]) for r in runner["refusals"]]


async def split(d: DaemonProc, *, kill_at: int = 0, kill: Any = None,
                **meta: Any) -> tuple[list[int], dict[str, Any]]:
    """GENERATE mode split; ``kill(job)`` is called once ``kill_at`` tokens have arrived."""
    conn = await open_daemon(d.address)
    streamed: list[int] = []
    try:
        body = {"mode": "split", "keep_alive": 0, "model": "stories-260k",
                "prompt_ids": PROMPT_IDS, **meta}
        async for frame in conn.stream(MsgType.GENERATE, body, idle_timeout=120):
            if not frame.is_partial:
                return streamed, frame.meta
            streamed += frame.meta["token_ids"]
            if kill is not None and len(streamed) >= kill_at:
                running = [j for j in await jobs_of(d, "split") if j["state"] == "running"]
                await kill(running[-1])
                kill = None
    finally:
        conn.close()
    raise AssertionError("no final answer")


# -- split inference ------------------------------------------------------------------------------


async def test_split_re_plans_when_a_shard_refuses_then_a_lost_shard_is_named(
        daemons: Any, tmp_path: Path) -> None:
    model = shared_model("stories-260k")
    want = generate_ids(load_slice(model), PROMPT_IDS, max_tokens=500).token_ids
    a, b, c = start_three(daemons, tmp_path, model)
    await meshed([a, b, c])
    # b advertises the model (scanned at start) but no longer has it: ASSIGN is refused
    shutil.rmtree(tmp_path / "b-models" / model.name)
    _, res = await split(a, shards=2, max_tokens=40)
    assert res["token_ids"] == want[:40]
    # the coordinator a holds the last range: planned b, a; re-planned c, a
    assert [s["name"] for s in res["shards"]] == ["c", "a"]
    (job,) = [j for j in await jobs_of(a, "split") if j["job"] == res["job"]]
    assert refusals(job) == [("b", "shard")]
    assert "not on this node" in job["metrics"]["runner"]["refusals"][0]["reason"]
    assert job["metrics"]["runner"]["plans"] == 2

    # no retries: the session fails naming the lost shard, and so does the job
    async def kill_c(job: dict[str, Any]) -> None:
        c.kill()

    with pytest.raises(RemoteError) as err:
        await split(a, shards=2, max_tokens=500, retries=0, kill_at=10, kill=kill_c)
    assert err.value.code == ErrorCode.PEER_DOWN
    assert "shard 0 (layers" in err.value.message and "on c" in err.value.message
    async def failed_jobs() -> list[dict[str, Any]]:
        return [j for j in await jobs_of(a, "split") if j["state"] == "failed"]

    # the session's error reaches the client before the job's record says failed
    failed = await wait_for(failed_jobs, timeout=20, what="the split job marked failed")
    assert "lost shard 0 (layers" in failed[-1]["error"]
    assert "on c" in failed[-1]["error"] and "rid shard0" in failed[-1]["error"]


async def test_three_shards_one_killed_the_two_survivors_finish_equal_to_local_greedy(
        daemons: Any, tmp_path: Path) -> None:
    model = shared_model("stories-260k")
    want = generate_ids(load_slice(model), PROMPT_IDS, max_tokens=500).token_ids
    a, b, c = start_three(daemons, tmp_path, model)
    await meshed([a, b, c])
    victims: list[str] = []

    async def kill_middle(job: dict[str, Any]) -> None:  # planned b, c, a (a coordinates)
        (middle,) = [m for m in job["members"] if m["rid"] == "shard1"]
        assert middle["node_id"] == c.node_id
        victims.append(middle["node_id"])
        c.kill()

    streamed, res = await split(a, shards=3, max_tokens=500, retries=1, kill_at=10,
                                kill=kill_middle)
    assert victims == [c.node_id]
    assert streamed == res["token_ids"] == want
    assert res["retries"] == 1
    names = [s["name"] for s in res["shards"]]
    assert names == ["b", "b", "a"], names  # one survivor holds two consecutive ranges
    assert res["shards"][0]["layers"][0] == 0 and res["shards"][-1]["layers"][1] == 5
    (job,) = [j for j in await jobs_of(a, "split") if j["job"] == res["job"]]
    lost = job["metrics"]["runner"]["lost"]
    assert [(x["name"], x["rid"]) for x in lost] == [("c", "shard1")]
    assert job["metrics"]["runner"]["replays"] == 1


# -- the other pillars: a refusal goes through the same runner path ---------------------------------


@pytest.fixture(scope="module")
def refusing(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """a: the coordinator (model, FL data); b: advertises the model and FL data, both deleted
    after it started (its ASSIGNs are refused); p: pinned to shard roles."""
    model = shared_model("stories-260k")
    root = tmp_path_factory.mktemp("refusing")
    text = " ".join(f"Once upon a time there was a little {w} who liked to play." for w in
                    ("girl", "boy", "dog", "cat", "bird", "fish") * 40)
    procs: list[DaemonProc] = []
    for name, extra in (("a", ()), ("b", ()), ("p", ("--role", "shard"))):
        data = root / f"{name}-data"
        data.mkdir()
        (data / "stories.txt").write_text(text)
        peers = [x for d in procs for x in ("--peer", d.address)]
        args = [*FAST, *peers, *extra, "--models-dir", str(models_with(root, name, model)),
                "--data-dir", str(data), "--state-dir", str(root / f"{name}-state")]
        procs.append(DaemonProc(name, args, root).wait_ready())
    asyncio.run(meshed(procs))
    shutil.rmtree(root / "b-models" / model.name)
    (root / "b-data" / "stories.txt").unlink()
    yield {d.name: d for d in procs} | {"root": root}
    for d in procs:
        d.stop()


async def request(d: DaemonProc, msg_type: MsgType, meta: dict[str, Any]) -> dict[str, Any]:
    conn = await open_daemon(d.address)
    try:
        async for frame in conn.stream(msg_type, meta, idle_timeout=300):
            if not frame.is_partial:
                return frame.meta
    finally:
        conn.close()
    raise AssertionError("no final answer")


async def last_job(d: DaemonProc, pillar: str) -> dict[str, Any]:
    jobs = await jobs_of(d, pillar)
    assert jobs, pillar
    return jobs[-1]


async def test_a_verifier_refusal_goes_through_the_runner(refusing: Any) -> None:
    a = refusing["a"]
    with pytest.raises(RemoteError) as err:
        await request(a, MsgType.GENERATE, {
            "mode": "spec", "model": "stories-260k", "draft_model": "stories-260k",
            "prompt_ids": PROMPT_IDS, "max_tokens": 4, "verifier": "b"})
    assert err.value.code == ErrorCode.REFUSED
    assert POLICY in err.value.message and "b refused verifier" in err.value.message
    assert "not on this host" in err.value.message
    job = await last_job(a, "spec")
    assert job["state"] == "failed" and refusals(job) == [("b", "verifier")]


async def test_a_stage_refusal_goes_through_the_runner(refusing: Any) -> None:
    a = refusing["a"]
    data = refusing["root"] / "a-data" / "ids.safetensors"  # a dataset name in a's --data-dir
    save_file({"input_ids": torch.randint(3, 500, (400,),
                                          generator=torch.Generator().manual_seed(0))}, str(data))
    with pytest.raises(RemoteError) as err:
        await request(a, MsgType.TRAIN_RUN, {
            "model": "stories-260k", "data": data.name, "steps": 1, "batch_size": 2,
            "micro_batches": 1, "seq_len": 8, "nodes": ["a", "p"]})
    assert err.value.code == ErrorCode.REFUSED
    assert POLICY in err.value.message and "p refused train-stage" in err.value.message
    assert "pinned elsewhere" in err.value.message
    job = await last_job(a, "splittrain")
    assert job["state"] == "failed" and refusals(job) == [("p", "train-stage")]


async def test_an_fl_client_refusal_goes_through_the_runner(refusing: Any) -> None:
    a = refusing["a"]
    result = await request(a, MsgType.FL_RUN, {
        "model": "stories-260k", "rounds": 1, "local_steps": 2, "block_size": 16,
        "batch_size": 2, "lora_rank": 2, "wait_clients": 5, "min_clients": 1,
        "run_name": "refused"})
    assert result["clients"] == ["a"] and len(result["rounds"]) == 1
    job = await last_job(a, "fl")
    assert job["state"] == "done" and refusals(job) == [("b", "fl-client")]
    assert "no .txt or .jsonl" in job["metrics"]["runner"]["refusals"][0]["reason"]
