"""Three `--role auto` daemons run all four pillars one after another, with no role flag.

Daemons a and b have both real models in their models dir; c has only stories-260k, so it
must never get a role that needs tinystories-656k. b and c have federated-learning data.
Without the shared checkout stand-ins made of the bundled model take their places, under
their names (see _model_files).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from p2pllm.engine.generate import generate
from p2pllm.engine.loader import load_slice, load_tokenizer
from p2pllm.pillars.speculative.drafts import truncate
from p2pllm.wire.messages import MsgType
from tests.conftest import BUNDLED, REPO, has_shared_model, real_model, wait_for

TINY = "tinystories-656k"
SMALL = "stories-260k"
# name -> the model's files (set by the autouse fixture below).
PATHS: dict[str, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def _model_files(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The shared models; without the shared checkout, stand-ins under their names: SMALL is
    the bundled shakespeare, TINY the first 2 of its 4 layers. TINY must not be bundled: the
    bundled pair is on every daemon, and these tests need daemons that lack TINY."""
    PATHS[SMALL] = real_model(SMALL)
    if has_shared_model(TINY):
        PATHS[TINY] = real_model(TINY)
    elif TINY not in PATHS:
        PATHS[TINY] = truncate(BUNDLED, tmp_path_factory.mktemp("stand-in") / TINY, layers=2)

STORY = (
    "Once upon a time, there was a little girl named {n}. She liked to play in the park with "
    "her dog. One day, {n} saw a big red ball under a tree. She ran to the ball and kicked it. "
    "The dog barked and ran after the ball. {n} laughed and said, \"Good dog!\" They played "
    "all day and went home happy.\n"
)


def models_dir(root: Path, names: list[str]) -> Path:
    d = root / ("models-" + "-".join(names))
    d.mkdir()
    for name in names:  # copies: a daemon refuses a link out of its roots (issue 12)
        shutil.copytree(PATHS[name], d / name)
    return d


def tiny_reference(n: int) -> list[int]:
    """TINY's greedy first n ids after "Once upon a time": the shared models README's; for the
    bundled stand-in, the engine's own in this process."""
    if has_shared_model(TINY):
        return [313, 598, 303, 1049, 1468, 267, 628, 333, 94, 1210, 263, 251][:n]
    path = PATHS[TINY]
    return generate(load_slice(path), load_tokenizer(path), "Once upon a time", None, n).token_ids


def data_dir(root: Path, name: str, kids: list[str]) -> Path:
    d = root / f"data-{name}"
    d.mkdir()
    (d / "stories.txt").write_text("".join(STORY.format(n=k) for k in kids * 6))
    return d


def cli(*args: str, daemon: str, timeout: float = 300) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "p2pllm.cli.main", *args, "--daemon", daemon, "--json"],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )
    assert out.returncode == 0, f"{args} failed:\n{out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


async def jobs(ctl, port: int) -> list[dict[str, Any]]:
    conn = await ctl(port)
    return (await conn.request(MsgType.JOBS, {}, timeout=20)).meta["jobs"]


async def roles_held(ctl, ports: list[int]) -> list[dict[str, Any]]:
    out = []
    for port in ports:
        conn = await ctl(port)
        out += (await conn.request(MsgType.STATUS, {}, timeout=20)).meta["node"]["roles"]
    return out


@pytest.fixture
async def cluster(daemons, ctl, tmp_path):
    both = models_dir(tmp_path, [TINY, SMALL])
    only_small = models_dir(tmp_path, [SMALL])
    cfg = tmp_path / "d.yaml"
    cfg.write_text("keepalive_interval: 0.5\nkeepalive_timeout: 5\n")
    common = ("--no-mdns", "--config", str(cfg), "--state-dir")
    a = daemons("a", *common, str(tmp_path / "sa"), "--models-dir", str(both))
    b = daemons("b", *common, str(tmp_path / "sb"), "--models-dir", str(both), "--peer", a.address,
                "--data-dir", str(data_dir(tmp_path, "b", ["Lily", "Mia"])))
    c = daemons("c", *common, str(tmp_path / "sc"), "--models-dir", str(only_small),
                "--peer", a.address, "--peer", b.address,
                "--data-dir", str(data_dir(tmp_path, "c", ["Tom", "Ben"])))
    ds = [a, b, c]

    async def all_up():
        for d in ds:
            conn = await ctl(d.port)
            snap = (await conn.request(MsgType.STATUS, {}, timeout=10)).meta
            if sum(p["state"] == "up" for p in snap["peers"]) != 2:
                return False
        return True

    await wait_for(all_up, timeout=30, what="three daemons connected")
    return ds


def members(job: dict[str, Any]) -> set[str]:
    return {m["node_id"] for m in job["members"]}


async def test_all_four_pillars_with_role_auto(cluster, ctl, tmp_path) -> None:
    a, b, c = cluster
    ports = [d.port for d in cluster]
    run = asyncio.to_thread

    # 1. Speculative decoding: both roles planned on nodes that have the target.
    spec = await run(cli, "generate", "--mode", "spec", "--model", TINY, "--draft-model", TINY,
                     "--max-tokens", "12", "Once upon a time", daemon=a.address)
    assert spec["generated_tokens"] >= 1 and spec["acceptance_rate"] == pytest.approx(1.0)
    # 2. Split inference over two shards: a and b (c lacks the model files).
    split = await run(cli, "generate", "--mode", "split", "--model", TINY, "--shards", "2",
                      "--max-tokens", "12", "Once upon a time", daemon=a.address)
    # The reference continuation of the shared model README (greedy).
    assert split["token_ids"][:12] == tiny_reference(12)
    # 3. Federated LoRA: clients are the nodes with data (b and c), on stories-260k.
    fl = await run(cli, "fl", "run", "--model", SMALL, "--rounds", "1", "--local-steps", "2",
                   "--min-clients", "2", "--block-size", "32", "--batch-size", "2",
                   "--round-timeout", "120", "--out", str(tmp_path / "adapter"), daemon=a.address)
    assert fl["rounds"][0]["clients_answered"] == 2
    # 4. Split training over two stages.
    data = tmp_path / "train.txt"
    data.write_text(STORY.format(n="Sue") * 40)
    train = await run(cli, "train", "split", "--model", TINY, "--data", str(data), "--stages", "2",
                      "--steps", "2", "--batch-size", "2", "--seq-len", "32", daemon=a.address)
    assert len(train["losses"]) == 2

    # Every job is recorded with its members; c never got a tinystories role; an fl job's
    # clients are exactly the nodes with data.
    # (A split pipeline stays loaded for its keep-alive, 30 s by default, then ends.)
    async def all_ended():
        listed = await jobs(ctl, a.port)
        return listed if all(j["state"] != "running" for j in listed) else None

    listed = {j["pillar"]: j for j in await wait_for(all_ended, timeout=90, interval=1, what="jobs ended")}
    assert set(listed) >= {"spec", "split", "fl", "splittrain"}, listed.keys()
    for pillar in ("spec", "split", "splittrain"):
        assert listed[pillar]["state"] == "done"
        assert c.node_id not in members(listed[pillar]), (pillar, listed[pillar]["members"])
    assert members(listed["split"]) == {a.node_id, b.node_id}
    fl_clients = {m["node_id"] for m in listed["fl"]["members"] if m["role"] == "fl-client"}
    assert fl_clients == {b.node_id, c.node_id}
    # No role is left behind anywhere.
    assert await roles_held(ctl, ports) == []


async def test_ctl_jobs_shows_roles_while_running_and_stop_releases_them(cluster, ctl, tmp_path) -> None:
    a, b, c = cluster
    ports = [d.port for d in cluster]
    data = tmp_path / "train.txt"
    data.write_text(STORY.format(n="Sue") * 40)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "p2pllm.cli.main", "train", "split", "--model", TINY, "--data", str(data),
        "--stages", "2", "--steps", "100000", "--batch-size", "2", "--seq-len", "32",
        "--daemon", a.address, "--json", cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async def running():
            for j in await jobs(ctl, b.port):  # asked of a member: the list is cluster-wide
                if j["pillar"] == "splittrain" and j["state"] == "running" and len(j["members"]) == 2:
                    return j
            return None

        job = await wait_for(running, timeout=120, what="train job running with its stages")
        held = await roles_held(ctl, ports)
        assert {(r["job"], r["role"]) for r in held} == {(job["job"], "train-stage")}
        await dashboard_in_tmux(a.address, ["a *", "b", "c", job["job"], "train-stage"])
        # The operator stops it from a member daemon (forwarded to the coordinator).
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "p2pllm.cli.main", "ctl", "stop", job["job"], "--daemon", b.address],
            capture_output=True, text=True, timeout=120, cwd=REPO,
        )
        assert out.returncode == 0, out.stderr
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode != 0 and b"stopped" in err
        await wait_for(lambda: _no_roles(ctl, ports), timeout=30, what="roles released everywhere")
        stopped = {j["job"]: j for j in await jobs(ctl, a.port)}[job["job"]]
        assert stopped["state"] == "stopped"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def dashboard_in_tmux(daemon: str, expect: list[str]) -> None:
    """Run `p2pllm dash` in a real (tmux) terminal, read the screen, quit with q."""
    if not shutil.which("tmux"):
        pytest.skip("tmux is not installed")
    session = f"p2pllm-dash-{os.getpid()}"
    env = f"PYTHONPATH={REPO}"
    cmd = f"env {env} {sys.executable} -m p2pllm.cli.main dash --daemon {daemon} --interval 0.3"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "30", cmd], check=True)
    try:
        def screen() -> str:
            return subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                  capture_output=True, text=True).stdout

        text = await wait_for(lambda: (lambda t: t if all(e in t for e in expect) else "")(screen()),
                              timeout=60, what=f"dashboard showing {expect}")
        assert "peers" in text and "jobs" in text
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=True)

        def gone() -> bool:
            return subprocess.run(["tmux", "has-session", "-t", session], capture_output=True).returncode != 0

        await wait_for(gone, timeout=20, what="dashboard to quit on q")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


async def _no_roles(ctl, ports) -> bool:
    return await roles_held(ctl, ports) == []


async def test_pinned_and_modelless_peers_are_planned_around(daemons, ctl, tmp_path) -> None:
    both = models_dir(tmp_path, [TINY])
    a = daemons("pa", "--no-mdns", "--models-dir", str(both))
    p = daemons("pp", "--no-mdns", "--models-dir", str(both), "--role", "fl-client", "--peer", a.address)
    n = daemons("pn", "--no-mdns", "--peer", a.address, "--peer", p.address)

    async def up():
        conn = await ctl(a.port)
        snap = (await conn.request(MsgType.STATUS, {}, timeout=10)).meta
        return sum(x["state"] == "up" for x in snap["peers"]) == 2

    await wait_for(up, what="peers up")
    # Three shards wanted, but p is pinned to fl-client and n has no model files: it could
    # fetch a slice from a (issue 16), which still makes two nodes; the error names both.
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "p2pllm.cli.main", "generate", "--mode", "split", "--model", TINY,
         "--shards", "3", "--max-tokens", "4", "--daemon", a.address, "Once upon a time"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert out.returncode != 0
    assert "pp" in out.stderr and "pn" in out.stderr, out.stderr
    # Planned freely, it runs on the one node that can take a shard.
    res = await asyncio.to_thread(cli, "generate", "--mode", "split", "--model", TINY,
                                  "--max-tokens", "4", "Once upon a time", daemon=a.address)
    assert res["token_ids"] == tiny_reference(4)
    listed = [j for j in await jobs(ctl, a.port) if j["pillar"] == "split" and j["members"]]
    assert listed and all(members(j) == {a.node_id} for j in listed)
    assert all(n.node_id not in members(j) and p.node_id not in members(j) for j in listed)


async def test_members_release_roles_when_the_coordinator_dies(daemons, ctl, tmp_path) -> None:
    both = models_dir(tmp_path, [TINY])
    cfg = tmp_path / "d.yaml"
    cfg.write_text("keepalive_interval: 0.3\nkeepalive_timeout: 2\n")
    a = daemons("ka", "--no-mdns", "--config", str(cfg), "--models-dir", str(both))
    b = daemons("kb", "--no-mdns", "--config", str(cfg), "--models-dir", str(both), "--peer", a.address)
    data = tmp_path / "train.txt"
    data.write_text(STORY.format(n="Sue") * 40)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "p2pllm.cli.main", "train", "split", "--model", TINY, "--data", str(data),
        "--stages", "2", "--steps", "100000", "--batch-size", "2", "--seq-len", "32",
        "--daemon", a.address, cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async def b_holds_a_stage():
            return [r for r in await roles_held(ctl, [b.port]) if r["role"] == "train-stage"]

        await wait_for(b_holds_a_stage, timeout=120, what="b holding a train-stage role")
        a.kill()  # the coordinator dies without releasing anything
        await wait_for(lambda: _no_roles(ctl, [b.port]), timeout=30, what="b releasing its orphan role")
        assert "coordinator ka is down" in b.log()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
