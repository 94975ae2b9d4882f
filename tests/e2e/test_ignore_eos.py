"""`p2pllm generate --ignore-eos` in spec and split modes, across two real p2pllmd processes.

The bundled shakespeare models never emit their EOS (id 1) greedily, so the test gives copies
of them an end id their greedy continuation does produce (config.json ``eos_token_id``, the
id the target generates halfway): without the flag every mode stops there, with it spec and
split give exactly ``--max-tokens`` tokens, equal to the engine's local greedy run with no end
ids (speculative and split decoding reproduce the target's greedy ids whatever stops them).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from p2pllm.engine.generate import generate
from p2pllm.engine.loader import load_slice, load_tokenizer
from p2pllm.wire.messages import MsgType
from tests.conftest import BUNDLED, BUNDLED_DRAFT, REPO, DaemonProc, models_dir_args, wait_for

PROMPT = "ROMEO:"
N = 32  # --max-tokens
TARGET, DRAFT = "shakespeare-eos", "shakespeare-draft-eos"


def greedy(path: Path, stop_ids: tuple[int, ...] | None) -> list[int]:
    torch.set_num_threads(1)
    return generate(load_slice(path), load_tokenizer(path), PROMPT, None, N,
                    stop_ids=stop_ids).token_ids


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Copies of the bundled pair whose config ends at the id the target generates at N/2."""
    root = tmp_path_factory.mktemp("ignore-eos")
    free = greedy(BUNDLED, ())
    assert len(free) == N
    eos = free[N // 2]
    k = free.index(eos)  # its first occurrence: where an end id would stop the reply
    for src, name in ((BUNDLED, TARGET), (BUNDLED_DRAFT, DRAFT)):
        dst = root / "models" / name
        shutil.copytree(src, dst)
        cfg = json.loads((dst / "config.json").read_text())
        cfg["eos_token_id"] = eos
        (dst / "config.json").write_text(json.dumps(cfg))
    target = root / "models" / TARGET
    # the end id is live locally: without ignoring it the engine stops at it
    assert greedy(target, None) == free[:k + 1]
    assert greedy(target, ()) == free
    return {"root": root, "dir": root / "models", "free": free, "stop_at": k + 1}


@pytest.fixture(scope="module")
def pair(models: dict[str, Any]) -> Iterator[tuple[DaemonProc, DaemonProc]]:
    logs = models["root"] / "logs"
    logs.mkdir()
    b = DaemonProc("b", ["--no-mdns", "--keepalive-timeout", "2",
                         *models_dir_args(models["dir"])], logs).wait_ready()
    a = DaemonProc("a", ["--no-mdns", "--keepalive-timeout", "2", "--peer", b.address,
                         *models_dir_args(models["dir"])], logs).wait_ready()
    yield a, b
    for d in (a, b):
        d.stop()


async def linked(a: DaemonProc, b: DaemonProc) -> None:
    from p2pllm.cli.client import open_daemon

    async def up() -> bool:
        for d, other in ((a, b), (b, a)):
            conn = await open_daemon(d.address)
            try:
                snap = (await conn.request(MsgType.STATUS, {}, timeout=10)).meta
            finally:
                conn.close()
            if not any(p["node_id"] == other.node_id and p["state"] == "up"
                       for p in snap["peers"]):
                return False
        return True

    await wait_for(up, timeout=30, what="the two daemons to link up")


def cli(daemon: DaemonProc, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "p2pllm.cli.main", "generate", PROMPT, "--model", TARGET,
         "--max-tokens", str(N), "--json", "--daemon", daemon.address, *args],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["spec", "split"])
async def test_ignore_eos_gives_max_tokens_equal_to_local_greedy(
        mode: str, pair: tuple[DaemonProc, DaemonProc], models: dict[str, Any]) -> None:
    a, b = pair
    await linked(a, b)
    extra = (["--mode", "spec", "--draft-model", DRAFT, "--draft-tokens", "3"] if mode == "spec"
             else ["--mode", "split", "--shards", "2", "--keep-alive", "0"])
    stopped = await asyncio.to_thread(cli, a, *extra)
    assert stopped["token_ids"] == models["free"][:models["stop_at"]], mode
    assert stopped["stop_reason"] == "eos"
    full = await asyncio.to_thread(cli, a, *extra, "--ignore-eos")
    assert full["generated_tokens"] == N and full["token_ids"] == models["free"], mode
    assert full["stop_reason"] == "max_tokens"
    if mode == "split":
        assert len(full["shards"]) == 2 and len({s["node_id"] for s in full["shards"]}) == 2


def test_the_generate_body_carries_ignore_eos_only_when_set() -> None:
    import argparse

    from p2pllm.cli.generate import add_arguments
    from p2pllm.cli.remote import generate_meta

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert generate_meta(p.parse_args(["hi", "--mode", "split", "--ignore-eos"]))["ignore_eos"]
    assert "ignore_eos" not in generate_meta(p.parse_args(["hi", "--mode", "spec"]))
