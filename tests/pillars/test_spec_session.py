"""A drafter session against the verifier role's real handlers, in one process.

The verifier role runs as in a daemon (its handlers, engine, batching worker, KV pool); its
messages go through real frame encoding, without sockets. Real tiny random Llamas.
"""

from __future__ import annotations

import asyncio
import functools
import operator
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from scipy.stats import chi2

from p2pllm.config import DaemonConfig
from p2pllm.daemon.roles import RoleContext
from p2pllm.engine.generate import generate_ids
from p2pllm.engine.loader import load_slice
from p2pllm.engine.model import ModelSlice
from p2pllm.engine.sampling import SamplingParams, distribution
from p2pllm.pillars.speculative.acceptance import SparseDist, acceptance_probabilities
from p2pllm.pillars.speculative.drafter import (
    DraftState,
    SessionMetrics,
    SpecSession,
    position_seed,
    sparse_q,
)
from p2pllm.pillars.speculative.drafts import random_llama, truncate
from p2pllm.pillars.speculative.messages import DraftRun, OpenRequest, VerifyWindow
from p2pllm.pillars.speculative.models import MODELS, LoadedModel, find_local_model
from p2pllm.pillars.speculative.roles import VerifierRole
from p2pllm.pillars.speculative.verifier import VerifierEngine
from p2pllm.wire.connection import RemoteError, Request
from p2pllm.wire.frame import Frame, ProtocolError, decode_frame, encode_frame
from p2pllm.wire.messages import ErrorCode, Flags, MsgType
from tests.conftest import wait_for

torch.set_num_threads(1)

PROMPT = (1, 80, 147, 201, 282, 57)


# ---------------------------------------------------------------------------------------------
# fixtures: models, a verifier role, a loopback "cluster"
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("spec-models")
    random_llama(root / "target", vocab_size=2048, hidden_size=64, layers=4, max_positions=512, seed=0)
    truncate(root / "target", root / "early", layers=2)  # the target's first half
    random_llama(root / "stranger", vocab_size=2048, hidden_size=32, layers=1, max_positions=512, seed=9)
    # tiny vocabulary, peaked and different distributions: for the sampling statistics
    random_llama(root / "tv-target", vocab_size=8, hidden_size=32, layers=2, init_std=0.3, seed=0,
                 max_positions=64, eos_token_id=None)
    random_llama(root / "tv-draft", vocab_size=8, hidden_size=32, layers=1, init_std=0.3, seed=5,
                 max_positions=64, eos_token_id=None)
    return root


def wire(msg_type: MsgType, meta: dict[str, Any], payload: Any = (), flags: int = 0) -> Frame:
    raw = b"".join(bytes(b) for b in encode_frame(msg_type, meta, payload, flags=flags, request_id=1))
    return decode_frame(bytearray(raw))


class Loopback:
    """A Cluster whose every request goes to one verifier role, through real frames."""

    def __init__(self, role: VerifierRole) -> None:
        self.role = role
        self.requests: list[MsgType] = []

    def nodes(self) -> list[dict[str, Any]]:
        return [{"node_id": "verifier", "name": "v"}]

    async def request(self, node_id: str, msg_type: MsgType, meta: dict[str, Any],
                      payload: Any = (), *, timeout: float | None = None) -> Frame:
        self.requests.append(msg_type)
        handler = self.role.handlers()[msg_type]
        try:
            reply = await handler(Request(None, wire(msg_type, meta, payload)))  # type: ignore[arg-type]
        except ProtocolError as exc:
            raise RemoteError(int(exc.code), exc.message) from None
        assert reply is not None
        return wire(reply.msg_type, reply.meta, reply.payload, Flags.RESPONSE)


async def make_verifier(models_dir: Path, model: str, job: str = "job-1",
                        **params: Any) -> VerifierRole:
    ctx = RoleContext(job, "verifier", "coord", "node", DaemonConfig(models_dir=str(models_dir)),
                      None, lambda m: None)  # type: ignore[arg-type]
    role = VerifierRole(ctx, {"model": model, **params})
    await role.start()
    return role


@pytest.fixture
async def verifier(models_dir: Path) -> AsyncIterator[VerifierRole]:
    role = await make_verifier(models_dir, "target")
    yield role
    await role.stop()


@pytest.fixture
async def draft_models(models_dir: Path) -> AsyncIterator[dict[str, LoadedModel]]:
    names = ("target", "early", "stranger", "tv-target", "tv-draft")
    loaded = {n: await MODELS.acquire(find_local_model(n, str(models_dir))) for n in names}  # type: ignore[arg-type]
    yield loaded
    for m in loaded.values():
        MODELS.release(m)


@pytest.fixture(scope="module")
def local_target(models_dir: Path) -> ModelSlice:
    return load_slice(models_dir / "target")


async def run_session(role: VerifierRole, draft: LoadedModel, *, prompt: tuple[int, ...] = PROMPT,
                      max_tokens: int = 40, params: SamplingParams | None = None, seed: int = 0,
                      window: int | None = 4, overlap: bool | None = True,
                      same_node: bool = False, **extra: Any) -> tuple[list[int], SessionMetrics, list[list[int]]]:
    chunks: list[list[int]] = []

    async def emit(tokens: list[int], m: SessionMetrics) -> None:
        chunks.append(list(tokens))

    run = DraftRun(prompt=prompt, max_tokens=max_tokens, params=params or SamplingParams(),
                   seed=seed, window=window, verifier="verifier", overlap=overlap, **extra)
    session = SpecSession(Loopback(role), role.ctx.job, draft, run, emit, same_node=same_node)
    metrics = await session.execute()
    return session.tokens, metrics, chunks


# ---------------------------------------------------------------------------------------------
# greedy: exactly the target's own output
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("draft", ["target", "early", "stranger"])
@pytest.mark.parametrize("window", [0, 1, 3, None])
@pytest.mark.parametrize("overlap", [True, False])
async def test_greedy_equals_the_target_alone(verifier: VerifierRole, draft_models: dict[str, LoadedModel],
                                              local_target: ModelSlice, draft: str,
                                              window: int | None, overlap: bool) -> None:
    ref = generate_ids(local_target, PROMPT, max_tokens=40, stop_ids=[]).token_ids
    tokens, m, chunks = await run_session(verifier, draft_models[draft], window=window,
                                          overlap=overlap, max_tokens=40)
    assert tokens == ref
    assert functools.reduce(operator.iadd, chunks, []) == ref  # streamed as produced
    d = m.as_dict()
    assert d["rounds"] == len(chunks) and d["drafted"] >= d["accepted"]
    assert m.accepted + m.rounds >= len(ref)  # every round emits accepted + 1 (the last trimmed)
    if draft == "target" and window:
        assert d["acceptance_rate"] == 1.0
        assert d["rounds"] == -(-40 // (window + 1))
    if window == 0:
        assert d["drafted"] == 0 and d["rounds"] == 40
    if overlap and draft == "target" and window:
        assert m.lookahead_hits > 0


async def test_auto_look_ahead_is_measured_and_exact(verifier: VerifierRole,
                                                     draft_models: dict[str, LoadedModel],
                                                     local_target: ModelSlice) -> None:
    """overlap "auto": the session probes both modes (lookahead.py) and keeps the faster; the
    tokens are the target's whatever it picks. One node: off, without measuring."""
    ref = generate_ids(local_target, PROMPT, max_tokens=60, stop_ids=[]).token_ids
    tokens, m, _ = await run_session(verifier, draft_models["target"], window=3, overlap=None,
                                     max_tokens=60)
    assert tokens == ref
    assert m.rounds == 15  # warm-up 1 + probe 8 + the rounds after: a decision was made
    d = m.as_dict()
    assert d["lookahead_choice"] == "measured" and d["lookahead_probes"] == 1
    on, off = d["lookahead_on_ms_per_token"], d["lookahead_off_ms_per_token"]
    assert on > 0 and off > 0 and d["lookahead"] is (on < off)
    assert m.lookaheads >= 5 and m.lookahead_hits > 0  # the warm-up and the probe's on rounds
    tokens, m, _ = await run_session(verifier, draft_models["target"], window=3, overlap=None,
                                     max_tokens=60, same_node=True)
    assert tokens == ref
    d = m.as_dict()
    assert (d["lookahead"], d["lookahead_choice"], m.lookaheads) == (False, "same-node", 0)
    assert d["lookahead_on_ms_per_token"] is None
    for forced in (True, False):  # the request wins, one node or not
        _, m, _ = await run_session(verifier, draft_models["target"], window=3, overlap=forced,
                                    max_tokens=20, same_node=True)
        assert (m.lookahead_on, m.lookahead_choice, m.lookaheads > 0) == (forced, "forced", forced)


async def test_greedy_with_repetition_penalty(verifier: VerifierRole, draft_models: dict[str, LoadedModel],
                                              local_target: ModelSlice) -> None:
    params = SamplingParams(repetition_penalty=1.3)
    ref = generate_ids(local_target, PROMPT, params, max_tokens=40, stop_ids=[]).token_ids
    plain = generate_ids(local_target, PROMPT, max_tokens=40, stop_ids=[]).token_ids
    assert ref != plain  # the penalty matters here
    for draft in ("early", "target"):
        tokens, _, _ = await run_session(verifier, draft_models[draft], params=params, window=None)
        assert tokens == ref


async def test_stops_at_eos_and_budget(verifier: VerifierRole, draft_models: dict[str, LoadedModel],
                                       local_target: ModelSlice) -> None:
    ref = generate_ids(local_target, PROMPT, max_tokens=30, stop_ids=[]).token_ids
    stop = ref[11]
    first = ref.index(stop)
    tokens, m, _ = await run_session(verifier, draft_models["target"], window=8, max_tokens=30,
                                     stop=(stop,))
    assert tokens == ref[: first + 1] and m.stop_reason == "eos"
    tokens, m, _ = await run_session(verifier, draft_models["target"], window=8, max_tokens=7)
    assert tokens == ref[:7] and m.stop_reason == "max_tokens"


async def test_model_length_limit(models_dir: Path, draft_models: dict[str, LoadedModel]) -> None:
    """The tiny-vocab target takes 64 positions: generation stops there, as the engine's does."""
    role = await make_verifier(models_dir, "tv-target")
    try:
        prompt = tuple(range(1, 8)) * 8  # 56 tokens
        local = generate_ids(load_slice(models_dir / "tv-target"), prompt, max_tokens=50, stop_ids=[])
        tokens, m, _ = await run_session(role, draft_models["tv-draft"], prompt=prompt,
                                         max_tokens=50, window=3)
        assert local.stop_reason == "length"
        assert tokens == local.token_ids and m.stop_reason == "length"
    finally:
        await role.stop()


# ---------------------------------------------------------------------------------------------
# sampling: the target's distribution, exactly
# ---------------------------------------------------------------------------------------------


def exact_joint(model: ModelSlice, prompt: tuple[int, ...], params: SamplingParams,
                steps: int) -> dict[tuple[int, ...], float]:
    """P(first ``steps`` generated tokens) under the model's own sampling, by enumeration."""
    vocab = model.config.vocab_size
    out: dict[tuple[int, ...], float] = {(): 1.0}
    with torch.inference_mode():
        for _ in range(steps):
            nxt: dict[tuple[int, ...], float] = {}
            for prefix, pr in out.items():
                seq = list(prompt) + list(prefix)
                logits = model(torch.tensor([seq]), torch.arange(len(seq))[None])[0, -1]
                p = distribution(logits, params, seq).double()
                for t in range(vocab):
                    if p[t] > 0:
                        nxt[(*prefix, t)] = pr * float(p[t])
            out = nxt
    return out


def chi_square_p(counts: dict[Any, int], probs: dict[Any, float]) -> float:
    """p-value of Pearson's test; cells expected below 5 are pooled into one."""
    n = sum(counts.values())
    assert set(counts) <= {k for k, v in probs.items() if v > 0}, "an impossible outcome occurred"
    stat, cells, pool_e, pool_o = 0.0, 0, 0.0, 0
    for k, p in probs.items():
        e, o = n * p, counts.get(k, 0)
        if e < 5:
            pool_e, pool_o = pool_e + e, pool_o + o
            continue
        stat += (o - e) ** 2 / e
        cells += 1
    if pool_e > 0:
        stat += (pool_o - pool_e) ** 2 / pool_e
        cells += 1
    return float(chi2.sf(stat, cells - 1))


def marginals(joint: dict[tuple[int, ...], float], steps: int) -> dict[tuple[int, ...], float]:
    out: dict[tuple[int, ...], float] = {}
    for k, v in joint.items():
        out[k[:steps]] = out.get(k[:steps], 0.0) + v
    return out


@pytest.mark.parametrize("draft", ["tv-draft", "tv-target"])
async def test_sampling_matches_the_targets_distribution(models_dir: Path,
                                                         draft_models: dict[str, LoadedModel],
                                                         draft: str) -> None:
    """Chi-square over fixed seeds (deterministic): the first three generated tokens are
    distributed as the target's own sampling; and NOT as the draft's (the test has power)."""
    params = SamplingParams(temperature=1.0)
    prompt = (1, 3, 5)
    n = 600
    role = await make_verifier(models_dir, "tv-target")
    try:
        results: list[tuple[int, ...]] = []
        for lo in range(0, n, 30):  # concurrent sessions: batched forwards
            batch = range(lo, min(lo + 30, n))
            outs = await asyncio.gather(*(
                run_session(role, draft_models[draft], prompt=prompt, max_tokens=3, params=params,
                            seed=seed, window=2, q_top_k=0) for seed in batch))
            results.extend(tuple(t) for t, _, _ in outs)
        engine = role.engine
        assert engine is not None and engine.windows > engine.forwards  # batching happened
    finally:
        await role.stop()
    target = exact_joint(load_slice(models_dir / "tv-target"), prompt, params, 3)
    counts: dict[tuple[int, ...], int] = {}
    for r in results:
        assert len(r) == 3
        counts[r[:2]] = counts.get(r[:2], 0) + 1
    assert chi_square_p(counts, marginals(target, 2)) > 1e-3
    third: dict[tuple[int, ...], int] = {}
    for r in results:
        third[r[2:]] = third.get(r[2:], 0) + 1
    p3: dict[tuple[int, ...], float] = {}
    for k, v in target.items():
        p3[k[2:]] = p3.get(k[2:], 0.0) + v
    assert chi_square_p(third, p3) > 1e-3
    if draft == "tv-draft":  # power: the draft's own distribution is rejected
        draft_joint = exact_joint(load_slice(models_dir / "tv-draft"), prompt, params, 2)
        assert set(counts) <= {k for k, v in draft_joint.items() if v > 0}
        assert chi_square_p(counts, draft_joint) < 1e-6


async def test_seeded_sampling_is_reproducible_whatever_the_timing(
        verifier: VerifierRole, draft_models: dict[str, LoadedModel]) -> None:
    params = SamplingParams(temperature=0.8, top_p=0.95)
    a, _, _ = await run_session(verifier, draft_models["target"], params=params, seed=11, overlap=True)
    b, _, _ = await run_session(verifier, draft_models["target"], params=params, seed=11, overlap=False)
    c, _, _ = await run_session(verifier, draft_models["target"], params=params, seed=12, overlap=True)
    assert a == b and a != c


# ---------------------------------------------------------------------------------------------
# the drafter's pieces
# ---------------------------------------------------------------------------------------------


def test_sparse_q_truncation_keeps_the_rule_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        vocab = 12
        p = torch.rand(vocab, generator=gen, dtype=torch.float64) ** 3
        p /= p.sum()
        q_dense = torch.rand(vocab, generator=gen, dtype=torch.float64) ** 3
        q_dense /= q_dense.sum()
        k, mass = (0, 1.0) if trial == 0 else (1 + trial % 6, 0.6 + 0.02 * trial)
        q = sparse_q(q_dense.float(), k, mass)
        assert q.probs.dtype == torch.float16 and torch.unique(q.ids).numel() == q.k
        if k:
            assert q.k <= k
        kept = float(q_dense[q.ids].sum())
        # the fewest top entries reaching the mass (or k of them)
        assert kept >= min(mass, float(torch.topk(q_dense, q.k).values.sum())) - 1e-6
        stats = acceptance_probabilities(p, q)
        assert torch.allclose(stats.marginal, p, atol=1e-12)


def test_position_seeds_are_deterministic_and_distinct() -> None:
    seeds = {position_seed(7, pos) for pos in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert position_seed(7, 5) == position_seed(7, 5) != position_seed(8, 5)


def test_draft_state_rolls_back_to_any_shared_prefix(draft_models: dict[str, LoadedModel],
                                                     models_dir: Path) -> None:
    loaded = draft_models["early"]
    local = load_slice(models_dir / "early")
    greedy = SamplingParams()

    def ref(base: list[int], n: int) -> list[int]:
        return generate_ids(local, base, max_tokens=n, stop_ids=[]).token_ids

    state = DraftState(loaded, 128, greedy, 0, 0, 2048)
    base = list(PROMPT)
    d = state.draft(base, 5)
    assert d.tokens == ref(base, 5) and d.q is None and d.forwards == 5
    # continue from an accepted prefix plus a different token: the cache is rolled back
    base2 = base + d.tokens[:2] + [(d.tokens[2] + 1) % 2048]
    assert state.draft(base2, 4).tokens == ref(base2, 4)
    # look-ahead: a guess (the argmax), then a window after it
    la = state.draft([*base2, 7], 3, guess=True)
    full = ref([*base2, 7], 4)
    assert la.guess == full[0] and la.tokens == full[1:]


# ---------------------------------------------------------------------------------------------
# the verifier's engine: batching, isolation, errors, memory
# ---------------------------------------------------------------------------------------------


def _rounds_of(ref: list[int], window: int) -> Iterator[tuple[int, tuple[int, ...]]]:
    """(offset, tokens) windows that the target fully accepts, walking its own output."""
    i = 0
    while i + window + 1 <= len(ref):
        yield i, tuple(ref[i : i + window])
        i += window + 1


async def test_sessions_are_verified_together_in_one_forward(
        verifier: VerifierRole, local_target: ModelSlice) -> None:
    engine = verifier.engine
    assert engine is not None
    prompts = [PROMPT, (1, 5), (1, 9, 9, 9, 9, 9, 9, 9, 9, 12)]
    refs = [generate_ids(local_target, p, max_tokens=24, stop_ids=[]).token_ids for p in prompts]
    opened = [await engine.open("job-1", OpenRequest(p, 24, SamplingParams(), 0), 60) for p in prompts]
    windows = [list(_rounds_of(r, w)) for r, w in zip(refs, (3, 2, 5), strict=True)]
    before = engine.forwards
    for step in range(max(len(w) for w in windows)):
        calls = []
        for o, p, ws in zip(opened, prompts, windows, strict=True):
            if step < len(ws):
                off, toks = ws[step]
                calls.append(engine.verify("job-1", VerifyWindow(o.session, len(p) + off, toks)))
        replies = await asyncio.gather(*calls)
        assert all(r.batch == len(calls) for r in replies)
        j = 0
        for ref, ws in zip(refs, windows, strict=True):
            if step < len(ws):
                off, toks = ws[step]
                assert (replies[j].accepted, replies[j].next) == (len(toks), ref[off + len(toks)])
                j += 1
    assert engine.forwards - before == max(len(w) for w in windows)  # one forward per step
    for o in opened:
        engine.close("job-1", o.session)


async def test_session_isolation_and_typed_errors(models_dir: Path, local_target: ModelSlice) -> None:
    role = await make_verifier(models_dir, "target", job="job-a")
    other = await make_verifier(models_dir, "target", job="job-b")  # same engine, other job
    try:
        assert role.engine is other.engine
        cluster = Loopback(role)
        meta, _ = OpenRequest(PROMPT, 10, SamplingParams(), 0).to_meta("job-a")
        session = (await cluster.request("v", MsgType.SPEC_OPEN, meta)).meta["session"]
        ref = generate_ids(local_target, PROMPT, max_tokens=10, stop_ids=[]).token_ids

        async def verify(c: Loopback, job: str, start: int, tokens: list[int], sid: int = session,
                         **extra: Any) -> dict[str, Any]:
            body = {"job": job, "session": sid, "start": start, "tokens": tokens, **extra}
            return (await c.request("v", MsgType.SPEC_VERIFY, body)).meta

        async def code_of(coro: Any) -> int:
            with pytest.raises(RemoteError) as err:
                await coro
            return err.value.code

        # another job's role cannot see this session; an unknown session is typed
        assert await code_of(verify(Loopback(other), "job-b", len(PROMPT), ref[:2])) == ErrorCode.UNKNOWN_SESSION
        assert await code_of(verify(cluster, "job-a", len(PROMPT), ref[:2], sid=session + 1)) == ErrorCode.UNKNOWN_SESSION
        # out of sync, out of vocabulary, past the limit, sampling fields in a greedy session
        assert await code_of(verify(cluster, "job-a", len(PROMPT) + 1, ref[:2])) == ErrorCode.BAD_REQUEST
        assert await code_of(verify(cluster, "job-a", len(PROMPT), [5000])) == ErrorCode.BAD_REQUEST
        assert await code_of(verify(cluster, "job-a", len(PROMPT), list(range(11)))) == ErrorCode.BAD_REQUEST
        # ... none of which disturbed the session
        r = await verify(cluster, "job-a", len(PROMPT), ref[:3])
        assert (r["n"], r["next"]) == (3, ref[3])
        # closed: gone for good
        await cluster.request("v", MsgType.SPEC_CLOSE, {"job": "job-a", "session": session})
        assert await code_of(verify(cluster, "job-a", len(PROMPT) + 4, ref[4:6])) == ErrorCode.UNKNOWN_SESSION
        assert await code_of(cluster.request("v", MsgType.SPEC_CLOSE, {"job": "job-a", "session": session})) == ErrorCode.UNKNOWN_SESSION
        assert await code_of(cluster.request("v", MsgType.SPEC_CLOSE, {"job": "job-a"})) == ErrorCode.BAD_REQUEST
        # memory: the KV pool goes once no session is left
        engine = role.engine
        assert engine is not None
        await wait_for(lambda: engine.cache is None, timeout=10, what="the KV pool to be freed")
    finally:
        await role.stop()
        await other.stop()


async def test_sampling_session_checks_q(models_dir: Path) -> None:
    role = await make_verifier(models_dir, "tv-target")
    try:
        cluster = Loopback(role)
        meta, _ = OpenRequest((1, 2), 10, SamplingParams(temperature=1.0), 0).to_meta("job-1")
        session = (await cluster.request("v", MsgType.SPEC_OPEN, meta)).meta["session"]
        no_q = {"job": "job-1", "session": session, "start": 2, "tokens": [3]}
        with pytest.raises(RemoteError, match="needs q"):
            await cluster.request("v", MsgType.SPEC_VERIFY, no_q)
        # the drafted token is not in the q it says it was drawn from
        q = SparseDist(torch.tensor([4, 5]), torch.tensor([0.5, 0.5], dtype=torch.float16))
        meta, payload = VerifyWindow(session, 2, (3,), (q,)).to_meta("job-1")
        with pytest.raises(RemoteError, match=r"q\(x\) = 0") as err:
            await cluster.request("v", MsgType.SPEC_VERIFY, meta, payload)
        assert err.value.code == ErrorCode.BAD_REQUEST
        # q over ids outside the vocabulary
        q = SparseDist(torch.tensor([3, 50]), torch.tensor([0.5, 0.5], dtype=torch.float16))
        meta, payload = VerifyWindow(session, 2, (3,), (q,)).to_meta("job-1")
        with pytest.raises(RemoteError, match="outside the vocabulary"):
            await cluster.request("v", MsgType.SPEC_VERIFY, meta, payload)
        # a good window still works after all that
        q = SparseDist(torch.tensor([3, 4]), torch.tensor([0.5, 0.5], dtype=torch.float16))
        meta, payload = VerifyWindow(session, 2, (3,), (q,)).to_meta("job-1")
        r = (await cluster.request("v", MsgType.SPEC_VERIFY, meta, payload)).meta
        assert r["n"] in (0, 1) and 0 <= r["next"] < 8
    finally:
        await role.stop()


async def test_idle_sessions_time_out_and_free_their_memory(models_dir: Path) -> None:
    role = await make_verifier(models_dir, "target", session_timeout=0.3)
    try:
        engine = role.engine
        assert isinstance(engine, VerifierEngine)
        opened = await engine.open("job-1", OpenRequest(PROMPT, 10, SamplingParams(), 0), 0.3)
        assert engine.cache is not None and opened.session in engine.sessions
        await wait_for(lambda: opened.session not in engine.sessions and engine.cache is None,
                       timeout=10, what="the idle session to be closed")
        with pytest.raises(ProtocolError) as err:
            await engine.verify("job-1", VerifyWindow(opened.session, len(PROMPT), (1,)))
        assert err.value.code == ErrorCode.UNKNOWN_SESSION
    finally:
        await role.stop()


async def test_pool_grows_and_shrinks_keeping_live_sessions(verifier: VerifierRole,
                                                            local_target: ModelSlice) -> None:
    engine = verifier.engine
    assert engine is not None
    ref = generate_ids(local_target, PROMPT, max_tokens=40, stop_ids=[]).token_ids
    first = await engine.open("job-1", OpenRequest(PROMPT, 40, SamplingParams(), 0), 60)
    r = await engine.verify("job-1", VerifyWindow(first.session, len(PROMPT), tuple(ref[:4])))
    assert r.accepted == 4
    rows = []
    for _ in range(5):  # more sessions, longer ones: the pool is reallocated, rows move
        o = await engine.open("job-1", OpenRequest(PROMPT, 200, SamplingParams(), 0), 60)
        rows.append(o.session)
    assert engine.cache is not None and engine.cache.batch >= 6
    for sid in rows:
        engine.close("job-1", sid)
    r = await engine.verify("job-1", VerifyWindow(first.session, len(PROMPT) + 5, tuple(ref[5:9])))
    assert engine.cache is not None and engine.cache.batch == 1  # shrunk to the live session
    assert (r.accepted, r.next) == (4, ref[9])  # its KV survived both moves
    engine.close("job-1", first.session)
