"""Speculative decoding across two real p2pllmd processes on loopback.

Node "a" coordinates and drafts (it holds only drafts, whose tokenizer is the target's);
node "b" verifies (it holds the targets). Results are compared with the engine's own local
generation: token for token in greedy mode, by a chi-square test in sampling mode.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from scipy.stats import chi2

from p2pllm.cli.remote import stream_generate
from p2pllm.engine.generate import generate
from p2pllm.engine.loader import load_slice, load_tokenizer
from p2pllm.engine.sampling import SamplingParams, distribution
from p2pllm.pillars.speculative.drafts import random_llama, truncate
from p2pllm.pillars.speculative.messages import DraftRun
from p2pllm.wire.connection import RemoteError
from p2pllm.wire.messages import ErrorCode, MsgType
from tests.conftest import (
    REPO,
    DaemonProc,
    has_shared_model,
    models_dir_args,
    real_model,
    shared_model,
    wait_for,
)

TOKENIZER = "tinystories-656k"
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """b: targets (the verifier's host); a: drafts only (the coordinator's and drafter's)."""
    tok = real_model(TOKENIZER)  # a real tokenizer (and model) of a 2048-token vocabulary
    root = tmp_path_factory.mktemp("spec-e2e")
    a, b = root / "a", root / "b"
    a.mkdir()
    b.mkdir()
    random_llama(b / "target", vocab_size=2048, hidden_size=64, layers=4, max_positions=4096,
                 seed=0, tokenizer_from=tok)
    truncate(b / "target", a / "early", layers=2)
    shutil.copytree(b / "target", a / "twin")  # the target's weights, as a draft (acceptance 1)
    (b / "tinystories").symlink_to(tok, target_is_directory=True)
    truncate(tok, a / "tinystories-1l", layers=1)
    for d in (a, b):  # tiny vocabulary, peaked distributions: sampling statistics
        random_llama(d / "tv-target", vocab_size=8, hidden_size=32, layers=2, init_std=0.3,
                     seed=0, max_positions=64, eos_token_id=None)
        random_llama(d / "tv-draft", vocab_size=8, hidden_size=32, layers=1, init_std=0.3,
                     seed=5, max_positions=64, eos_token_id=None)
    return {"a": a, "b": b, "root": root}


def start_pair(daemons: Any, dirs: dict[str, Path], *extra: str) -> tuple[Any, Any]:
    b = daemons("b", "--no-mdns", *models_dir_args(dirs["b"]), *extra)
    a = daemons("a", "--no-mdns", "--peer", b.address, *models_dir_args(dirs["a"]), *extra)
    return a, b


@pytest.fixture(scope="module")
def pair(dirs: dict[str, Path]) -> Iterator[tuple[DaemonProc, DaemonProc]]:
    """One coordinator/drafter "a" and one verifier "b" for the tests that kill nothing."""
    log_dir = dirs["root"] / "logs"
    log_dir.mkdir(exist_ok=True)
    b = DaemonProc("b", ["--no-mdns", *models_dir_args(dirs["b"])], log_dir).wait_ready()
    a = DaemonProc("a", ["--no-mdns", "--peer", b.address, *models_dir_args(dirs["a"])],
                   log_dir).wait_ready()
    yield a, b
    for d in (a, b):
        d.stop()


async def wait_peers(ctl: Any, a: Any, b: Any) -> None:
    async def linked() -> bool:
        for d, other in ((a, b), (b, a)):
            snap = (await (await ctl(d.port)).request(MsgType.STATUS, {}, timeout=10)).meta
            if not any(p["node_id"] == other.node_id and p["state"] == "up" for p in snap["peers"]):
                return False
        return True

    await wait_for(linked, timeout=30, what="the two daemons to link up")


def local_reference(path: Path, prompt: str, max_tokens: int, params: SamplingParams | None = None) -> Any:
    torch.set_num_threads(1)
    return generate(load_slice(path), load_tokenizer(path), prompt, params, max_tokens)


async def status(ctl: Any, port: int) -> dict[str, Any]:
    return (await (await ctl(port)).request(MsgType.STATUS, {}, timeout=10)).meta


RESULT_FIELDS = ("text", "prompt_tokens", "generated_tokens", "token_ids", "seconds", "tokens_per_s",
                 "time_to_first_token_s", "mode", "acceptance_rate", "drafted", "accepted",
                 "rounds", "draft_tokens")


@pytest.mark.xfail(not has_shared_model(TOKENIZER), strict=True, reason=(
    "known bug: on the bundled byte-level tokenizer a random target can end mid-character; "
    "spec's final text then drops the partial character, the engine's text keeps it as U+FFFD"))
async def test_greedy_across_daemons_equals_the_target_alone(pair: Any, ctl: Any,
                                                             dirs: dict[str, Path]) -> None:
    a, b = pair
    await wait_peers(ctl, a, b)
    jobs_before = len([j for j in (await status(ctl, a.port))["jobs"] if j["pillar"] == "spec"])
    ref = local_reference(dirs["b"] / "target", PROMPT, 48)
    cases = (("twin", 4, True), ("early", 1, "auto"), ("early", 4, True), ("early", "auto", "auto"),
             ("twin", "auto", "auto"))
    for draft, window, overlap in cases:
        meta = {"mode": "spec", "prompt": PROMPT, "model": "target", "draft_model": draft,
                "draft_tokens": window, "max_tokens": 48, "overlap": overlap}
        chunks: list[dict[str, Any]] = []
        conn = await ctl(a.port)
        result: dict[str, Any] = {}
        async for frame in conn.stream(MsgType.GENERATE, meta):
            if frame.is_partial:
                chunks.append(frame.meta)
            else:
                result = frame.meta
        label = f"{draft}/{window}/{overlap}"
        assert result["token_ids"] == ref.token_ids, label
        assert result["text"] == ref.text, label
        assert [t for c in chunks for t in c["token_ids"]] == ref.token_ids, label
        assert "".join(c["text"] for c in chunks) == ref.text, label
        assert set(RESULT_FIELDS) <= set(result) and result["mode"] == "spec"
        assert result["verifier"] == "b" and result["drafter"] == "a"
        assert result["draft_tokens"] == window
        assert result["rounds"] == len(chunks)
        assert result["bytes_out"] > 0 and result["network_s"] >= 0
        # the look-ahead: on when asked; by default ("auto") chosen from the session's timings
        if overlap is True:
            assert result["lookahead"] is True and result["lookahead_choice"] == "forced"
        else:
            assert result["lookahead_choice"] in ("measured", "probing"), label
            on, off = result["lookahead_on_ms_per_token"], result["lookahead_off_ms_per_token"]
            if result["lookahead_choice"] == "measured":
                assert result["lookahead_probes"] >= 1 and result["lookahead"] is (on < off)
        if draft == "twin":
            assert result["acceptance_rate"] == 1.0
            assert result["lookahead_hits"] > 0  # forced, or the probe's rounds with it on
        else:
            assert 0.0 <= result["acceptance_rate"] < 1.0
    # the jobs, their members and metrics in the coordinator's status
    snap = await status(ctl, a.port)
    jobs = [j for j in snap["jobs"] if j["pillar"] == "spec"][jobs_before:]
    assert len(jobs) == 5 and all(j["state"] == "done" for j in jobs)
    members = {(m["node_id"], m["role"]) for m in jobs[-1]["members"]}
    assert members == {(b.node_id, "verifier"), (a.node_id, "drafter")}
    assert {"tokens", "acceptance_rate", "rounds", "tokens_per_s"} <= set(jobs[-1]["metrics"])
    # and every role was released on both nodes
    for d in (a, b):
        assert not (await status(ctl, d.port))["node"]["roles"]


async def test_golden_tinystories_with_its_one_layer_draft(pair: Any, ctl: Any) -> None:
    """The trained model's reference continuation (models README), through spec decoding."""
    shared_model(TOKENIZER)  # its reference ids: shared-only
    expected = [313, 598, 303, 1049, 1468, 267, 628, 333, 94, 1210, 263, 251, 604, 94, 1030, 94,
                1030, 94, 436, 220, 1053, 615, 303, 328, 552, 319, 1269, 163, 1945, 897, 645,
                1188, 108, 319, 135, 448, 563, 1799, 1380, 1067]
    a, b = pair
    await wait_peers(ctl, a, b)
    meta = {"mode": "spec", "prompt": PROMPT, "model": "tinystories", "draft_model": "tinystories-1l",
            "draft_tokens": "auto", "max_tokens": 40}
    result = await stream_generate(a.address, None, meta, echo=False)
    assert result["token_ids"] == expected
    assert result["text"].startswith(", a little girl named Lily lived in a small house")
    assert 0.0 < result["acceptance_rate"] <= 1.0


async def test_cli_generate_spec_json_and_one_node(daemons: Any, dirs: dict[str, Path]) -> None:
    """`p2pllm generate --mode spec --json` against one daemon holding everything."""
    solo_dir = dirs["root"] / "solo"
    if not solo_dir.exists():
        solo_dir.mkdir()
        for src in (dirs["b"] / "target", dirs["a"] / "early"):
            (solo_dir / src.name).symlink_to(src, target_is_directory=True)
    solo = daemons("solo", "--no-mdns", *models_dir_args(solo_dir))
    ref = local_reference(dirs["b"] / "target", PROMPT, 24)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "p2pllm.cli.main", "generate", PROMPT, "--mode", "spec",
         "--model", "target", "--draft-model", "early", "--draft-tokens", "3", "--max-tokens", "24",
         "--json", "--daemon", solo.address],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["token_ids"] == ref.token_ids and result["text"] == ref.text
    assert result["verifier"] == result["drafter"] == "solo"
    # one daemon holds both roles: no look-ahead, without measuring
    assert (result["lookahead"], result["lookahead_choice"], result["lookaheads"]) == (False, "same-node", 0)
    assert set(RESULT_FIELDS) <= set(result)
    # a bad request is a clear error, and the daemon keeps serving
    bad = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "p2pllm.cli.main", "generate", PROMPT, "--mode", "spec",
         "--model", "nope", "--draft-model", "early", "--daemon", solo.address],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert bad.returncode == 1 and "no node can verify with nope" in bad.stderr


# ---------------------------------------------------------------------------------------------
# sampling statistics, many sessions at once, typed errors — roles assigned by hand
# ---------------------------------------------------------------------------------------------


def exact_first_two(path: Path, prompt: list[int], params: SamplingParams) -> dict[tuple[int, int], float]:
    model = load_slice(path)
    out: dict[tuple[int, int], float] = {}
    with torch.inference_mode():
        p1 = distribution(model(torch.tensor([prompt]), torch.arange(len(prompt))[None])[0, -1], params)
        for t1 in range(model.config.vocab_size):
            seq = [*prompt, t1]
            p2 = distribution(model(torch.tensor([seq]), torch.arange(len(seq))[None])[0, -1], params)
            for t2 in range(model.config.vocab_size):
                out[(t1, t2)] = float(p1[t1]) * float(p2[t2])
    return out


def chi_square_p(counts: dict[Any, int], probs: dict[Any, float]) -> float:
    n = sum(counts.values())
    assert set(counts) <= {k for k, v in probs.items() if v > 0}
    stat, cells, pool_e, pool_o = 0.0, 0, 0.0, 0
    for k, p in probs.items():
        e, o = n * p, counts.get(k, 0)
        if e < 5:
            pool_e, pool_o = pool_e + e, pool_o + o
            continue
        stat, cells = stat + (o - e) ** 2 / e, cells + 1
    if pool_e > 0:
        stat, cells = stat + (pool_o - pool_e) ** 2 / pool_e, cells + 1
    return float(chi2.sf(stat, cells - 1))


async def test_sampling_sessions_many_at_once_and_typed_errors(pair: Any, ctl: Any, peer: Any,
                                                               dirs: dict[str, Path]) -> None:
    a, b = pair
    await wait_peers(ctl, a, b)
    # the test coordinates the job by hand: peer connections, and the verifier takes the
    # drafter's node as a member (protocol.md 4.4)
    ca, cb = await peer(a.port), await peer(b.port)
    job = "spec-bytest"
    await cb.request(MsgType.ASSIGN, {"job": job, "rid": "verifier", "role": "verifier",
                                      "params": {"model": "tv-target"}, "pillar": "spec",
                                      "members": [a.node_id]}, timeout=60)
    await ca.request(MsgType.ASSIGN, {"job": job, "rid": "drafter", "role": "drafter",
                                      "params": {"model": "tv-draft"}, "pillar": "spec"}, timeout=60)
    try:
        params = SamplingParams(temperature=1.0)
        prompt = [1, 3, 5]

        async def one(seed: int) -> tuple[int, ...]:
            run = DraftRun(prompt=tuple(prompt), max_tokens=2, params=params, seed=seed, window=2,
                           verifier=b.node_id, q_top_k=0)
            result = (await ca.request(MsgType.SPEC_DRAFT_RUN, run.to_meta(job), timeout=60)).meta
            return tuple(result["token_ids"])

        n = 400
        results: list[tuple[int, ...]] = []
        for lo in range(0, n, 40):  # 40 sessions in flight on one verifier
            results += await asyncio.gather(*(one(s) for s in range(lo, lo + 40)))
        counts: dict[tuple[int, ...], int] = {}
        for r in results:
            assert len(r) == 2
            counts[r] = counts.get(r, 0) + 1
        exact = exact_first_two(dirs["b"] / "tv-target", prompt, params)
        assert chi_square_p(counts, exact) > 1e-3  # type: ignore[arg-type]
        # the roles' metrics, as `ctl status` shows them
        snap_b = await status(ctl, b.port)
        vrole = next(r for r in snap_b["node"]["roles"] if r["job"] == job)
        m = vrole["metrics"]
        assert m["sessions_total"] == n and m["sessions_open"] == 0 and m["rounds"] >= n
        assert 0 < m["acceptance_rate"] < 1 and m["engine_windows_per_forward"] > 1.0

        # typed errors from the verifier, over the wire; the daemon keeps serving
        async def code(meta: dict[str, Any], msg: MsgType = MsgType.SPEC_VERIFY) -> int:
            with pytest.raises(RemoteError) as err:
                await cb.request(msg, meta, timeout=10)
            return err.value.code

        window = {"job": job, "session": 12345, "start": 3, "tokens": [1]}
        assert await code(window) == ErrorCode.UNKNOWN_SESSION
        assert await code({**window, "job": "no-such-job"}) == ErrorCode.UNKNOWN_JOB
        opened = (await cb.request(MsgType.SPEC_OPEN, {"job": job, "prompt": prompt, "max_tokens": 4,
                                                       "params": {}, "seed": 0}, timeout=10)).meta
        sid = opened["session"]
        ok = (await cb.request(MsgType.SPEC_VERIFY, {**window, "session": sid}, timeout=10)).meta
        assert ok["n"] in (0, 1)
        assert await code({**window, "session": sid, "start": 99}) == ErrorCode.BAD_REQUEST
        assert await code({**window, "session": sid, "tokens": "x"}) == ErrorCode.BAD_REQUEST
        await cb.request(MsgType.SPEC_CLOSE, {"job": job, "session": sid}, timeout=10)
        assert await code({**window, "session": sid, "start": 3 + 1 + ok["n"]}) == ErrorCode.UNKNOWN_SESSION
        assert await code({"job": job, "session": sid}, MsgType.SPEC_CLOSE) == ErrorCode.UNKNOWN_SESSION
        assert (await status(ctl, b.port))["node"]["name"] == "b"
    finally:
        for conn in (ca, cb):
            await conn.request(MsgType.RELEASE, {"job": job}, timeout=30)


# ---------------------------------------------------------------------------------------------
# faults
# ---------------------------------------------------------------------------------------------


async def test_verifier_killed_mid_generation_fails_fast_and_clearly(daemons: Any, ctl: Any,
                                                                     dirs: dict[str, Path]) -> None:
    cfg = dirs["root"] / "fast.yaml"
    cfg.write_text("keepalive_interval: 0.2\nkeepalive_timeout: 1.5\n")
    a, b = start_pair(daemons, dirs, "--config", str(cfg))
    await wait_peers(ctl, a, b)
    meta = {"mode": "spec", "prompt": PROMPT, "model": "target", "draft_model": "early",
            "draft_tokens": 2, "max_tokens": 4000}
    conn = await ctl(a.port)
    got = 0
    killed_at = 0.0
    with pytest.raises(RemoteError) as err:
        async with asyncio.timeout(60):
            async for frame in conn.stream(MsgType.GENERATE, meta):
                assert frame.is_partial, "generation ended before the verifier was killed"
                got += len(frame.meta["token_ids"])
                if not killed_at and got >= 20:
                    b.kill()
                    killed_at = time.monotonic()
    elapsed = time.monotonic() - killed_at
    assert killed_at and elapsed < 1.5 + 2.0
    assert err.value.code == ErrorCode.PEER_DOWN
    assert "verifier b" in err.value.message
    # the coordinator keeps serving; the job is marked failed with the reason
    snap = await status(ctl, a.port)
    job = next(j for j in snap["jobs"] if j["pillar"] == "spec")
    assert job["state"] == "failed" and "verifier" in (job["error"] or "")
    await wait_for(lambda: _no_roles(ctl, a.port), timeout=10, what="the drafter to be released")


async def _no_roles(ctl: Any, port: int) -> bool:
    return not (await status(ctl, port))["node"]["roles"]
