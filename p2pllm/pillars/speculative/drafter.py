"""The drafter's side of a speculative session: draft, send a window, draft ahead, repeat.

:class:`DraftState` owns the draft model's KV cache for one session and drafts (a blocking
call). :class:`SpecSession` runs the rounds against a verifier, drafting on the drafter role's
RoleWorker (FIFO, so a look-ahead and the draft after it never touch the cache at once):

1. draft a window of γ tokens (and, when sampling, the sparse q each was drawn from);
2. send it (SPEC_VERIFY) and, while the verifier works, draft the NEXT window as if the whole
   window will be accepted: first a guess for the verifier's bonus token (the draft's argmax),
   then the next window after it;
3. on the answer ``(n, next)``: if all γ were accepted and ``next`` is the guess, the next window
   is already drafted and goes out at once; otherwise it is dropped (the draft KV rolls back to
   the committed tokens on the next draft) and a fresh window is drafted.

Whether step 2 drafts ahead: as the request's ``overlap`` forces it; else off when one daemon
holds both roles; else chosen from the session's own round timings (:mod:`.lookahead`).

Randomness: the draft token at absolute position ``pos`` is drawn with a generator seeded from
``(seed, pos)``. A discarded look-ahead therefore changes no later draw (runs are reproducible
from the seed whatever the timing), and each draw stays independent of everything the verifier
decided before it, which the exactness of the acceptance rule needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from p2pllm.daemon.worker import RoleWorker
from p2pllm.engine.kv_cache import KVCache
from p2pllm.engine.sampling import SamplingParams, distribution
from p2pllm.pillars.speculative.acceptance import AdaptiveWindow, SparseDist, sample_sparse
from p2pllm.pillars.speculative.lookahead import LookaheadProbe
from p2pllm.pillars.speculative.messages import (
    DraftRun,
    OpenReply,
    OpenRequest,
    VerifyReply,
    VerifyWindow,
    error_code,
)
from p2pllm.pillars.speculative.models import LoadedModel
from p2pllm.wire.connection import ConnectionClosed, RemoteError
from p2pllm.wire.frame import Frame, ProtocolError
from p2pllm.wire.messages import ErrorCode, MsgType

__all__ = ["Draft", "DraftState", "SessionMetrics", "SpecSession", "position_seed", "sparse_q"]

log = logging.getLogger(__name__)

OPEN_TIMEOUT = 300.0  # prefilling a long prompt on a slow host
VERIFY_TIMEOUT = 300.0  # a dead verifier is noticed sooner, by the keepalive
CLOSE_TIMEOUT = 5.0
LOOKAHEAD_MIN_HIT = 0.05  # skip the look-ahead when it would almost surely be thrown away
_MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """A 63-bit seed for the draft token at ``position`` (splitmix64 of seed and position)."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def sparse_q(dense: torch.Tensor, k: int, mass: float = 1.0,
             dtype: torch.dtype = torch.float16) -> SparseDist:
    """The q the drafter samples from AND sends (SPEC_VERIFY): the most likely entries of
    ``dense`` (V,) — at most ``k`` (0 = no cap), and no more than it takes to cover ``mass`` of
    the probability — renormalised, cast to the wire dtype, zeros dropped.

    Any such q keeps the rule exact; what it drops only lowers the acceptance rate (for a
    draft equal to the target, the acceptance rate is the mass kept).
    """
    support = int((dense > 0).sum())
    keep = support if k == 0 else min(k, support)
    vals, ids = torch.topk(dense.double(), keep)  # (keep,), descending
    if mass < 1.0:
        covered = torch.cumsum(vals, 0) / float(dense.double().sum())
        keep = min(keep, int((covered < mass).sum()) + 1)
        vals, ids = vals[:keep], ids[:keep]
    probs = (vals / vals.sum()).to(dtype)
    nonzero = probs > 0
    return SparseDist(ids=ids[nonzero].to(torch.int64), probs=probs[nonzero])


@dataclass
class Draft:
    """Tokens drafted after some base sequence; ``guess`` (look-ahead only) comes first."""

    tokens: list[int]
    q: list[SparseDist] | None
    guess: int | None
    seconds: float
    forwards: int
    complete: bool = True


class Steer:
    """Tells a running look-ahead to stop: aborted, or the verifier's bonus token is known."""

    def __init__(self) -> None:
        self.abort = threading.Event()
        self.bonus: int | None = None

    def stop(self, guess: int | None) -> bool:
        if self.abort.is_set():
            return True
        bonus = self.bonus
        return bonus is not None and guess is not None and bonus != guess


class DraftState:
    """The draft model's KV cache for one session, and drafting (call from one thread at a time).

    A draft holds the model's lock for the whole call: the weights may be shared with other
    roles of this daemon (:mod:`.models`), each computing on its own worker thread.
    """

    def __init__(self, loaded: LoadedModel, max_len: int, params: SamplingParams, seed: int,
                 q_top_k: int, vocab_limit: int, q_mass: float = 1.0) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.cache: KVCache = self.model.new_cache(1, max_len)
        self.fed: list[int] = []  # the tokens whose keys/values are in the cache
        self.params = params
        self.seed = seed
        self.q_top_k = q_top_k
        self.q_mass = q_mass
        self.vocab_limit = min(vocab_limit, loaded.config.vocab_size)
        self.gen = torch.Generator()
        self.penalise = params.repetition_penalty != 1.0

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def draft(self, base: Sequence[int], n: int, guess: bool = False,
              steer: Steer | None = None) -> Draft:
        """Draft ``n`` tokens after ``base`` (after one guessed token first if ``guess``)."""
        t0 = time.perf_counter()
        seq = list(base)
        tokens: list[int] = []
        qs: list[SparseDist] | None = None if self.params.greedy else []
        guessed: int | None = None
        forwards = 0
        total = n + int(guess)
        if total == 0:
            return Draft(tokens, qs, None, 0.0, 0)
        with torch.inference_mode(), self.loaded.lock:
            pending = self._sync(seq)
            for j in range(total):
                if steer is not None and steer.stop(guessed):
                    return Draft(tokens, qs, guessed, time.perf_counter() - t0, forwards, False)
                logits = self._forward(pending, len(self.fed))  # (V,)
                forwards += 1
                self.fed.extend(pending)
                if guess and j == 0:
                    tok, q = self._guess(logits, seq), None
                    guessed = tok
                else:
                    tok, q = self._pick(logits, seq)
                    tokens.append(tok)
                    if qs is not None:
                        assert q is not None
                        qs.append(q)
                seq.append(tok)
                pending = [tok]
        done = not (steer is not None and steer.stop(guessed))
        return Draft(tokens, qs, guessed, time.perf_counter() - t0, forwards, done)

    def _sync(self, seq: list[int]) -> list[int]:
        """Roll the cache back to the longest valid prefix of ``seq[:-1]``; the rest to feed."""
        keep = 0
        limit = min(len(self.fed), len(seq) - 1)
        while keep < limit and self.fed[keep] == seq[keep]:
            keep += 1
        self.cache.rollback(0, keep)
        del self.fed[keep:]
        return seq[keep:]

    def _forward(self, pending: list[int], start: int) -> torch.Tensor:
        dev = self.model.device
        ids = torch.tensor([pending], dtype=torch.int64, device=dev)
        pos = torch.arange(start, start + len(pending), device=dev).unsqueeze(0)
        out = self.model(ids, pos, self.cache, last_only=True)  # (1, 1, V)
        return out[0, -1, : self.vocab_limit].float().cpu()  # (V,): sampling is on the CPU

    def _dist(self, logits: torch.Tensor, seq: list[int]) -> torch.Tensor:
        return distribution(logits, self.params, seq if self.penalise else None)

    def _guess(self, logits: torch.Tensor, seq: list[int]) -> int:
        """The most likely token: the best guess for the verifier's bonus token."""
        if self.penalise:
            return int(self._dist(logits, seq).argmax())
        return int(logits.argmax())

    def _pick(self, logits: torch.Tensor, seq: list[int]) -> tuple[int, SparseDist | None]:
        if self.params.greedy:
            return self._guess(logits, seq), None
        q = sparse_q(self._dist(logits, seq), self.q_top_k, self.q_mass)
        self.gen.manual_seed(position_seed(self.seed, len(seq)))
        return sample_sparse(q, self.gen), q


@dataclass
class SessionMetrics:
    """What one session measured; ``as_dict`` is what ``generate --json`` and status show."""

    window: int | str = "auto"  # the --draft-tokens setting
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0  # rounds that ended on a rejected draft token
    generated: int = 0
    lookahead_on: bool = True  # the mode in force (auto: the latest probe's choice)
    lookahead_choice: str = "forced"  # "forced" (the request), "same-node", "measured",
    # "probing" (auto, ended before a probe finished: lookahead_on from its figures so far)
    lookahead_on_s_per_token: float | None = None  # auto: the probe's wall s per token, on
    lookahead_off_s_per_token: float | None = None  # ... and off
    lookahead_probes: int = 0  # auto: probes finished
    lookaheads: int = 0  # windows drafted ahead during a verification
    lookahead_hits: int = 0  # ... and sent as drafted
    wasted: int = 0  # drafted tokens thrown away (rejected look-aheads)
    draft_s: float = 0.0  # drafting, in the drafter's thread (look-aheads included)
    draft_forwards: int = 0
    verify_s: float = 0.0  # the verifier's time on the rounds (queue, forward, decision)
    forward_s: float = 0.0  # the verifier's forward passes
    network_s: float = 0.0  # round trips minus the verifier's time
    wait_s: float = 0.0  # the drafter idle, waiting for an answer
    prefill_s: float = 0.0
    bytes_out: int = 0  # SPEC_VERIFY frames sent, headers included
    bytes_in: int = 0  # their answers
    started: float = field(default_factory=time.perf_counter)
    first_token_s: float = 0.0
    stop_reason: str = "max_tokens"

    def as_dict(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.started
        rounds = max(self.rounds, 1)
        decode = elapsed - self.first_token_s
        return {
            "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "rounds": self.rounds,
            "rejections": self.rejections,
            # per-token acceptance α (censored-geometric estimate: each round tries tokens
            # until the first rejection), the α of the speedup formula
            "alpha": self.accepted / (self.accepted + self.rejections) if self.accepted + self.rejections else 0.0,
            "draft_tokens": self.window,
            "generated_tokens": self.generated,
            "mean_tokens_per_round": self.generated / rounds,
            "mean_window": self.drafted / rounds,
            "lookahead": self.lookahead_on,
            "lookahead_choice": self.lookahead_choice,
            "lookahead_on_ms_per_token": _ms(self.lookahead_on_s_per_token),
            "lookahead_off_ms_per_token": _ms(self.lookahead_off_s_per_token),
            "lookahead_probes": self.lookahead_probes,
            "lookaheads": self.lookaheads,
            "lookahead_hits": self.lookahead_hits,
            "wasted_drafts": self.wasted,
            "draft_s": round(self.draft_s, 6),
            "draft_token_s": self.draft_s / self.draft_forwards if self.draft_forwards else 0.0,
            "verify_s": round(self.verify_s, 6),
            "verify_forward_s": round(self.forward_s, 6),
            "network_s": round(self.network_s, 6),
            "network_ms_per_round": 1000 * self.network_s / rounds,
            "wait_s": round(self.wait_s, 6),
            "prefill_s": round(self.prefill_s, 6),
            "bytes_out": self.bytes_out,
            "bytes_in": self.bytes_in,
            "bytes_per_round": (self.bytes_out + self.bytes_in) / rounds,
            "tokens_per_s": (self.generated - 1) / decode if self.generated > 1 and decode > 0 else 0.0,
            "seconds": elapsed,
            "stop_reason": self.stop_reason,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 3)


Emit = Callable[[list[int], SessionMetrics], Awaitable[None]]


class SpecSession:
    """One generation: open a verifier session, run the rounds, stream tokens, close."""

    def __init__(self, cluster: Any, job: str, loaded: LoadedModel, run: DraftRun,
                 emit: Emit, peer_name: str = "", same_node: bool = False,
                 worker: RoleWorker | None = None) -> None:
        """``worker``: where the drafting runs (the drafter role's); without one, the session
        makes its own and closes it when it ends. ``same_node``: the verifier is this very
        daemon (the look-ahead then stays off unless the request forces it)."""
        self.cluster = cluster
        self.job = job
        self.loaded = loaded
        self.run = run
        self.emit = emit
        self.peer = f"verifier {peer_name or run.verifier[:8]}"
        self.metrics = SessionMetrics(window="auto" if run.window is None else run.window)
        self.session: int | None = None
        self.tokens: list[int] = []
        # the look-ahead: as the request forces it; else off when one daemon holds both roles
        # (their passes share its cores); else chosen from this session's timings (lookahead.py)
        self.probe: LookaheadProbe | None = None
        if run.overlap is not None:
            self.lookahead, choice = run.overlap, "forced"
        elif same_node:
            self.lookahead, choice = False, "same-node"
        else:
            self.probe = LookaheadProbe()
            self.lookahead, choice = self.probe.on, "probing"
        self.metrics.lookahead_on = self.lookahead
        self.metrics.lookahead_choice = choice
        self._own_worker = worker is None
        self.worker = RoleWorker(f"draft:{job}"[:64]) if worker is None else worker

    # -- talking to the verifier ----------------------------------------------------------------

    async def _call(self, msg_type: MsgType, meta: dict[str, Any], payload: Sequence[Any],
                    timeout: float) -> Frame:
        try:
            frame = await self.cluster.request(self.run.verifier, msg_type, meta, payload,
                                               timeout=timeout)
        except ConnectionClosed as exc:
            raise ProtocolError(ErrorCode.PEER_DOWN, f"lost the {self.peer}: {exc}") from exc
        except RemoteError as exc:
            code = error_code(exc.code)
            raise ProtocolError(code, f"{self.peer}: {exc.message}") from exc
        except TimeoutError as exc:
            raise ProtocolError(ErrorCode.TIMEOUT,
                                f"the {self.peer} did not answer {msg_type.name} in {timeout:.0f}s") from exc
        return frame

    async def _open(self) -> OpenReply:
        r = self.run
        meta, payload = OpenRequest(r.prompt, r.max_tokens, r.params, r.seed).to_meta(self.job)
        reply = OpenReply.from_meta((await self._call(MsgType.SPEC_OPEN, meta, payload, OPEN_TIMEOUT)).meta)
        self.session = reply.session
        self.metrics.prefill_s = reply.prefill_s
        return reply

    async def _verify(self, window: VerifyWindow) -> VerifyReply:
        meta, payload = window.to_meta(self.job)
        t0 = time.perf_counter()
        answer = await self._call(MsgType.SPEC_VERIFY, meta, payload, VERIFY_TIMEOUT)
        rtt = time.perf_counter() - t0
        reply = VerifyReply.from_meta(answer.meta)
        if reply.accepted > len(window.tokens):
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"the {self.peer} accepted {reply.accepted} of {len(window.tokens)} tokens")
        m = self.metrics
        m.bytes_out += answer.sent_bytes  # as the connection counted them (0 in-process)
        m.bytes_in += answer.wire_bytes
        m.verify_s += reply.seconds
        m.forward_s += reply.forward_s / reply.batch
        m.network_s += max(0.0, rtt - reply.seconds)
        return reply

    async def close(self) -> None:
        if self.session is None:
            return
        session, self.session = self.session, None
        with contextlib.suppress(ProtocolError):
            await self._call(MsgType.SPEC_CLOSE, {"job": self.job, "session": session}, (),
                             CLOSE_TIMEOUT)

    # -- the rounds -----------------------------------------------------------------------------

    async def execute(self) -> SessionMetrics:
        try:
            await self._rounds()
        finally:
            await asyncio.shield(self.close())
            if self._own_worker:
                await asyncio.shield(self.worker.aclose())
        return self.metrics

    async def _rounds(self) -> None:
        run, m = self.run, self.metrics
        opened = await self._open()
        # positions: the verifier checks start + γ <= limit; the draft KV must hold them too
        limit = opened.limit
        draft_max = self.loaded.config.max_position_embeddings
        stops = set() if run.ignore_eos else set(opened.eos) | set(run.stop)
        state = await self.worker.run(
            DraftState, self.loaded, min(limit, draft_max), run.params, run.seed, run.q_top_k,
            opened.vocab_size, run.q_mass)
        policy = None
        estimate = AdaptiveWindow(1, max_window=1)  # α̂ alone, whatever sets the window
        if run.window is None:
            initial = min(max(4, run.min_window), run.max_window)
            policy = AdaptiveWindow(initial, min_window=run.min_window, max_window=run.max_window)
        committed = list(run.prompt)

        def size(start: int, produced: int, pol: AdaptiveWindow | None) -> int:
            """The window for a round at position ``start`` after ``produced`` tokens."""
            want = run.window if pol is None else pol.window
            assert want is not None
            room = min(run.max_tokens - produced - 1, limit - start, state.max_len - start)
            return max(0, min(want, room))

        def ready(start: int, produced: int) -> bool:
            return produced < run.max_tokens and start <= limit

        draft = await self._draft(state, committed, size(len(committed), 0, policy))
        last: tuple[float, int] | None = None  # the previous round: when it began, its tokens
        while True:
            start = len(committed)
            began = time.perf_counter()
            if last is not None and self.probe is not None:
                # a round's wall time runs from its window sent to the next one sent: the
                # look-ahead's gain (a next window ready) or cost (slower passes) falls in it
                self._probed(began - last[0], last[1])
            gamma = len(draft.tokens)
            window = VerifyWindow(self.session or 0, start, tuple(draft.tokens),
                                  None if draft.q is None else tuple(draft.q))
            # 1. look ahead: the next window, as if this one will be accepted whole
            ahead: asyncio.Task[Draft] | None = None
            steer = Steer()
            nxt_start, nxt_produced = start + gamma + 1, len(self.tokens) + gamma + 1
            # worth it when a hit is not hopeless: all γ accepted and the guess right, ≈ α^(γ+1)
            if (self.lookahead and ready(nxt_start, nxt_produced)
                    and estimate.alpha ** (gamma + 1) >= LOOKAHEAD_MIN_HIT):
                pol = None
                if policy is not None:
                    pol = copy.copy(policy)
                    if gamma:
                        pol.update(gamma, gamma)
                ahead_n = size(nxt_start, nxt_produced, pol)
                ahead = asyncio.create_task(self.worker.run(
                    state.draft, committed + draft.tokens, ahead_n, True, steer,
                    cancel=steer.abort))
                m.lookaheads += 1
            # 2. verify this window
            t_sent = time.perf_counter()
            try:
                reply = await self._verify(window)
            except BaseException:
                await self._drop(ahead, steer)
                raise
            rtt = time.perf_counter() - t_sent
            n, bonus = reply.accepted, reply.next
            if n < gamma:
                steer.abort.set()
            else:
                steer.bonus = bonus
            # 3. commit, stream, stop
            m.rounds += 1
            m.drafted += gamma
            m.accepted += n
            m.rejections += int(n < gamma)
            if gamma:
                estimate.update(gamma, n)
                if policy is not None:
                    policy.update(gamma, n, cost_ratio=self._cost_ratio())
            new = [*draft.tokens[:n], bonus]
            last = (began, len(new))
            committed.extend(new)
            taken, done = self._take(new, stops)
            if m.rounds == 1:
                m.first_token_s = time.perf_counter() - m.started
            await self.emit(taken, m)
            if not done and not ready(len(committed), len(self.tokens)):
                done = True
                m.stop_reason = "max_tokens" if len(self.tokens) >= run.max_tokens else "length"
            if done:
                await self._drop(ahead, steer)
                return
            # 4. the next window: the look-ahead if it guessed right, else a fresh draft
            if ahead is None:
                m.wait_s += rtt
            else:
                pre = await ahead
                self._count(pre)
                m.wait_s += max(0.0, rtt - pre.seconds)
                if pre.complete and n == gamma and pre.guess == bonus:
                    m.lookahead_hits += 1
                    draft = pre
                    continue
                m.wasted += len(pre.tokens)
            draft = await self._draft(state, committed, size(len(committed), len(self.tokens), policy))

    def _probed(self, seconds: float, tokens: int) -> None:
        """Feed the look-ahead probe one round; the mode for the next one, into the metrics."""
        probe, m = self.probe, self.metrics
        assert probe is not None
        probe.record(seconds, tokens)
        self.lookahead = probe.on
        best = probe.best()
        if best is not None:
            m.lookahead_on = best.on
            m.lookahead_on_s_per_token = best.on_s_per_token
            m.lookahead_off_s_per_token = best.off_s_per_token
        m.lookahead_probes = probe.decisions
        m.lookahead_choice = "measured" if probe.decisions else "probing"

    def _take(self, new: list[int], stops: set[int]) -> tuple[list[int], bool]:
        """Append ``new`` to the output up to a stop token or the budget; True when done."""
        room = self.run.max_tokens - len(self.tokens)
        taken: list[int] = []
        done = False
        for tok in new[:room]:
            taken.append(tok)
            if tok in stops:
                done = True
                self.metrics.stop_reason = "eos"
                break
        self.tokens.extend(taken)
        self.metrics.generated = len(self.tokens)
        return taken, done

    def _count(self, d: Draft) -> None:
        self.metrics.draft_s += d.seconds
        self.metrics.draft_forwards += d.forwards

    async def _draft(self, state: DraftState, base: list[int], n: int) -> Draft:
        d = await self.worker.run(state.draft, base, n)
        self._count(d)
        return d

    async def _drop(self, ahead: asyncio.Task[Draft] | None, steer: Steer) -> None:
        """Stop a look-ahead and wait for it to finish (to count what it drafted)."""
        if ahead is None:
            return
        steer.abort.set()
        try:
            pre = await asyncio.shield(ahead)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await ahead
            raise
        except Exception:
            return
        self._count(pre)
        self.metrics.wasted += len(pre.tokens)

    def _cost_ratio(self) -> float | None:
        """Measured c = one draft step / one target forward (None until both are known)."""
        m = self.metrics
        if not m.draft_forwards or not m.rounds or m.forward_s <= 0:
            return None
        return min(10.0, (m.draft_s / m.draft_forwards) / (m.forward_s / m.rounds))
