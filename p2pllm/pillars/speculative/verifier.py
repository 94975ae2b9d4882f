"""The verifier's engine: sessions over one shared target model, verified in batched forwards.

One :class:`VerifierEngine` per loaded target on a daemon serves every session of every job
that uses that target. Each session owns one row of a pooled KV cache holding its committed
tokens but the last (``committed[:-1]``). A round feeds ``[committed[-1], x_0 .. x_{γ-1}]``,
which gives the target's logits for positions ``start .. start+γ`` (p_0 .. p_γ) in ONE forward;
the acceptance rule decides; the row is rolled back to ``committed[:-1]`` of the new sequence.

All model and cache work runs on the engine's RoleWorker (one thread, shared by the verifier
roles of every job on this target): requests queue up on the event loop while a forward runs,
and the batching task hands the worker every queued window at once (continuous batching;
windows of different lengths are padded, and the padding is rolled back).

The KV cache grows with the tokens its sessions hold: small storage chunks
(``grow_chunk_tokens``), each taken from ``kv_budget`` (a ``KVBudget`` whose limit the roles
set to what the daemon's memory budget has room for); a window or prefill past it is refused
(OVER_LIMIT) before anything changes, and a closed session's blocks are freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from p2pllm.daemon.worker import RoleWorker
from p2pllm.engine.errors import KVBudgetError, KVCacheFullError, ModelError
from p2pllm.engine.kv_cache import GROW_CHUNK_BYTES, KVBudget, KVCache, grow_chunk_tokens
from p2pllm.engine.sampling import SamplingParams, distribution, make_generator
from p2pllm.pillars.speculative.acceptance import SparseDist, verify_greedy, verify_sampled
from p2pllm.pillars.speculative.messages import (
    OpenReply,
    OpenRequest,
    VerifyReply,
    VerifyWindow,
)
from p2pllm.pillars.speculative.models import MODELS, LoadedModel
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode

__all__ = ["Session", "VerifierEngine", "acquire_engine", "decide", "release_engine"]

log = logging.getLogger(__name__)

SWEEP_INTERVAL = 1.0


def decide(
    logits: torch.Tensor,
    tokens: Sequence[int],
    q: Sequence[SparseDist] | None,
    params: SamplingParams,
    committed: Sequence[int],
    generator: torch.Generator,
) -> tuple[int, int]:
    """The verifier's decision for one window: ``(accepted, next_token)``.

    logits: (γ+1, V) target logits at positions start .. start+γ. Greedy: the longest prefix
    of ``tokens`` equal to the target's argmax, then the target's token. Sampling: the exact
    rejection rule on p = the target's sampling distribution (temperature, top-k, top-p,
    repetition penalty over ``committed`` + the drafted prefix).
    """
    gamma = len(tokens)
    histories = None
    if params.repetition_penalty != 1.0:
        seq = list(committed) + list(tokens)
        histories = [seq[: len(committed) + i] for i in range(gamma + 1)]
    if params.greedy:
        if histories is None:
            target = logits.argmax(dim=-1)  # (γ+1,)
        else:
            target = distribution(logits, params, histories).argmax(dim=-1)
        return verify_greedy(tokens, target)
    if q is None:
        raise ValueError("a sampling session needs the draft distributions q with each window")
    p = distribution(logits, params, histories)  # (γ+1, V)
    return verify_sampled(tokens, q, p, generator)


@dataclass(eq=False)
class Session:
    id: int
    job: str
    committed: list[int]
    limit: int  # positions the sequence may reach
    params: SamplingParams
    generator: torch.Generator
    timeout: float
    row: int = -1
    closed: bool = False
    last_used: float = field(default_factory=time.monotonic)
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    verify_s: float = 0.0

    @property
    def kv_len(self) -> int:
        return len(self.committed) - 1


@dataclass(eq=False)
class _Work:
    session: Session
    window: VerifyWindow | None = None  # None: prefill (open)
    received: float = field(default_factory=time.perf_counter)
    result: tuple[int, int] | None = None
    error: BaseException | None = None
    forward_s: float = 0.0
    batch: int = 1
    future: asyncio.Future[None] | None = None


class VerifierEngine:
    """Sessions, the pooled KV cache and the batching worker of one loaded target."""

    def __init__(self, loaded: LoadedModel, max_sessions: int = 64,
                 max_kv_tokens: int | None = None, chunk_bytes: int = GROW_CHUNK_BYTES) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.config = loaded.config
        self.max_sessions = max_sessions
        # KV positions of all sessions together (whole blocks); past it a window is refused
        self.max_kv_tokens = max_kv_tokens or max_sessions * self.config.max_position_embeddings
        self.sessions: dict[int, Session] = {}
        self.cache: KVCache | None = None
        self.kv_budget = KVBudget()  # the roles set its limit (the daemon's memory budget)
        self.chunk_bytes = chunk_bytes  # storage chunks: memory follows the tokens held
        self.refs = 0
        self._ids = itertools.count(random.SystemRandom().randrange(1, 2**40))
        self._queue: asyncio.Queue[_Work | None] = asyncio.Queue()  # None: just wake up
        self._freed: list[Session] = []  # closed sessions whose rows the worker must free
        self._tasks: list[asyncio.Task[None]] = []
        self.worker = RoleWorker(f"verifier:{Path(loaded.path).name}"[:64])
        # totals over all sessions, for the role metrics
        self.forwards = 0
        self.windows = 0
        self.forward_s = 0.0

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._batcher()), loop.create_task(self._sweeper())]

    async def aclose(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        await self.worker.aclose()  # a batch still running finishes before the cache goes
        queued = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None:
                queued.append(item)
        self._fail(queued, ProtocolError(ErrorCode.UNKNOWN_SESSION, "the verifier has stopped"))
        for s in list(self.sessions.values()):
            s.closed = True
        self.sessions.clear()
        if self.cache is not None:
            self.cache.clear()
        self.cache = None

    @property
    def kv_bytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0

    # -- requests (event loop) ----------------------------------------------------------------

    async def open(self, job: str, req: OpenRequest, timeout: float) -> OpenReply:
        live = sum(1 for s in self.sessions.values() if not s.closed)
        if live >= self.max_sessions:
            raise ProtocolError(ErrorCode.REFUSED, f"the verifier already serves {live} sessions")
        limit_model = self.config.max_position_embeddings
        if len(req.prompt) >= limit_model:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"the prompt has {len(req.prompt)} tokens; the target takes at most "
                                f"{limit_model - 1} before generating")
        vocab = self.config.vocab_size
        if max(req.prompt) >= vocab:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"prompt token {max(req.prompt)} is outside the target's vocabulary ({vocab})")
        session = Session(
            id=next(self._ids), job=job, committed=list(req.prompt),
            limit=min(len(req.prompt) + req.max_tokens, limit_model), params=req.params,
            generator=make_generator(req.seed), timeout=timeout,
        )
        self.sessions[session.id] = session
        work = _Work(session)
        try:
            await self._submit(work)
        except BaseException:
            self.close(job, session.id)
            raise
        return OpenReply(session=session.id, vocab_size=vocab,
                         eos=tuple(self.config.eos_token_ids)[:64], limit=session.limit,
                         prefill_s=work.forward_s)

    async def verify(self, job: str, window: VerifyWindow) -> VerifyReply:
        session = self._session(job, window.session)
        session.last_used = time.monotonic()
        work = _Work(session, window)
        await self._submit(work)
        assert work.result is not None
        n, nxt = work.result
        return VerifyReply(accepted=n, next=nxt, seconds=time.perf_counter() - work.received,
                           forward_s=work.forward_s, batch=work.batch)

    def close(self, job: str, session_id: int) -> Session:
        """Close a session now (later requests get UNKNOWN_SESSION); its row is freed next."""
        session = self._session(job, session_id)
        session.closed = True
        del self.sessions[session.id]
        self._freed.append(session)
        self._wake()  # free its row and blocks now, not with the next request
        return session

    def close_job(self, job: str) -> int:
        ids = [s.id for s in self.sessions.values() if s.job == job]
        for sid in ids:
            self.close(job, sid)
        return len(ids)

    def _session(self, job: str, session_id: int) -> Session:
        s = self.sessions.get(session_id)
        if s is None or s.closed or s.job != job:
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION,
                                f"no open verification session {session_id} in job {job}")
        return s

    async def _submit(self, work: _Work) -> None:
        work.future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(work)
        await work.future
        if work.error is not None:
            raise work.error

    def _wake(self) -> None:
        """Let the worker free closed rows even when no request comes."""
        self._queue.put_nowait(None)

    # -- batching -------------------------------------------------------------------------------

    async def _batcher(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            work = [w for w in batch if w is not None]
            freed, self._freed = self._freed, []
            live = [s for s in self.sessions.values() if not s.closed]  # snapshot for the thread
            try:
                await self.worker.run(self._process, work, freed, live)
            except asyncio.CancelledError:  # the engine is closing: fail what was taken
                self._fail(work, ProtocolError(ErrorCode.UNKNOWN_SESSION, "the verifier has stopped"))
                raise
            except Exception as exc:  # a bug, not a peer's fault: fail this batch, keep serving
                log.warning("verifier batch failed", exc_info=True)
                self._fail(work, ProtocolError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
            for w in work:
                if w.future is not None and not w.future.done():
                    w.future.set_result(None)

    @staticmethod
    def _fail(work: list[_Work], error: ProtocolError) -> None:
        for w in work:
            if w.error is None and w.result is None:
                w.error = error
            if w.future is not None and not w.future.done():
                w.future.set_result(None)

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = time.monotonic()
            for s in list(self.sessions.values()):
                if s.timeout > 0 and now - s.last_used > s.timeout:
                    log.info("closing idle verification session %d of %s after %.0fs",
                             s.id, s.job, now - s.last_used)
                    self.close(s.job, s.id)

    def _process(self, batch: list[_Work], freed: list[Session], live: list[Session]) -> None:
        """In the worker thread: free rows, prefill new sessions, verify windows."""
        with torch.inference_mode(), self.loaded.lock:
            for s in freed:
                if s.row >= 0 and self.cache is not None and self.cache.has_row(s.row):
                    self.cache.remove_row(s.row)  # its blocks only: no other row moves
                s.row = -1
            opens = [w for w in batch if w.window is None]
            verifies = [w for w in batch if w.window is not None]
            self._fit(live)
            for w in opens:
                self._guard(w, self._prefill)
            ready = []
            for w in verifies:
                self._guard(w, self._check)
                if w.error is None:
                    ready.append(w)
            if ready:
                self._verify(ready)

    @staticmethod
    def _guard(work: _Work, fn: Callable[[_Work], None]) -> None:
        try:
            fn(work)
        except ProtocolError as exc:
            work.error = exc
        except KVCacheFullError as exc:
            work.error = _kv_refusal(exc)
        except (ModelError, ValueError) as exc:
            work.error = ProtocolError(ErrorCode.BAD_REQUEST, str(exc))
        except Exception as exc:
            log.warning("verification failed", exc_info=True)
            work.error = ProtocolError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    # -- the KV pool (worker thread only) -------------------------------------------------------

    def _fit(self, live: list[Session]) -> None:
        """Give every new live session a row of the block cache (rows take blocks as their
        positions arrive; no live row's KV moves); drop the cache when no session is left."""
        if not live:
            if self.cache is not None:
                self.cache.clear()  # every row was freed above; storage back to the budget
            self.cache = None
            return
        if self.cache is None:
            m, ctx = self.model, self.config.max_position_embeddings
            per_position = ((m.end - m.start) * 2 * self.config.num_kv_heads
                            * self.config.head_dim * m.dtype.itemsize)
            self.cache = m.new_cache(0, ctx, max_total_tokens=self.max_kv_tokens,
                                     chunk_tokens=grow_chunk_tokens(per_position, ctx,
                                                                    chunk_bytes=self.chunk_bytes))
            self.cache.budget = self.kv_budget
        for s in live:
            if s.row < 0:
                s.row = self.cache.add_row()

    def _prefill(self, work: _Work) -> None:
        s = work.session
        if s.closed or s.row < 0 or self.cache is None:
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION, f"verification session {s.id} was closed")
        t0 = time.perf_counter()
        n = s.kv_len
        if n:
            ids = torch.tensor([s.committed[:n]], dtype=torch.int64, device=self.model.device)
            pos = torch.arange(n, device=self.model.device).unsqueeze(0)
            slots = torch.tensor([s.row], dtype=torch.int64)
            self.model(ids, pos, self.cache, slots, last_only=True)
        work.forward_s = time.perf_counter() - t0
        work.result = (0, 0)

    def _check(self, work: _Work) -> None:
        s, w = work.session, work.window
        assert w is not None
        if s.closed:
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION, f"verification session {s.id} was closed")
        if w.start != len(s.committed):
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"window starts at position {w.start} but session {s.id} holds "
                                f"{len(s.committed)} tokens")
        if w.start + len(w.tokens) > s.limit:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"window ends at position {w.start + len(w.tokens)}, past the "
                                f"session's limit {s.limit}")
        vocab = self.config.vocab_size
        if w.tokens and max(w.tokens) >= vocab:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"drafted token {max(w.tokens)} is outside the target's vocabulary ({vocab})")
        if not s.params.greedy:
            if w.q is None:
                raise ProtocolError(ErrorCode.BAD_REQUEST,
                                    "a sampling session needs q (the draft distributions) with each window")
            for d in w.q:
                d.check_vocab(vocab)
        if s.row < 0 or self.cache is None:
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION, f"verification session {s.id} has no cache row")

    def _verify(self, works: list[_Work]) -> None:
        """One forward over every window (padded to the longest), then each decision."""
        cache = self.cache
        assert cache is not None
        width = max(len(w.window.tokens) for w in works if w.window is not None) + 1
        longest = max(w.session.kv_len for w in works)
        groups = [works] if longest + width <= cache.max_len else [[w] for w in works]
        for group in groups:
            self._forward_group(group)

    def _forward_group(self, works: list[_Work]) -> None:
        cache = self.cache
        assert cache is not None
        dev = self.model.device
        width = max(len(w.window.tokens) for w in works if w.window is not None) + 1
        ids = torch.zeros(len(works), width, dtype=torch.int64)
        pos = torch.empty(len(works), width, dtype=torch.int64)
        for b, w in enumerate(works):
            assert w.window is not None
            seq = [w.session.committed[-1], *w.window.tokens]
            ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
            pos[b] = torch.arange(w.session.kv_len, w.session.kv_len + width)
        slots = torch.tensor([w.session.row for w in works], dtype=torch.int64)
        t0 = time.perf_counter()
        try:
            logits = self.model(ids.to(dev), pos.to(dev), cache, slots)  # (B, width, V)
        except KVCacheFullError as exc:  # nothing was written: refuse this group's windows
            if len(works) > 1:  # ... only those that cannot grow: the others run alone
                for w in works:
                    self._forward_group([w])
                return
            for w in works:
                w.error = _kv_refusal(exc)
            return
        except Exception:
            # a failed forward gives its blocks back; make sure every row is where it was
            for w in works:
                if cache.length(w.session.row) > w.session.kv_len:
                    cache.rollback(w.session.row, w.session.kv_len)
            raise
        forward_s = time.perf_counter() - t0
        self.forwards += 1
        self.windows += len(works)
        self.forward_s += forward_s
        for b, w in enumerate(works):
            s, win = w.session, w.window
            assert win is not None
            gamma = len(win.tokens)
            w.forward_s, w.batch = forward_s, len(works)
            try:
                n, nxt = decide(logits[b, : gamma + 1].float(), win.tokens, win.q, s.params,
                                s.committed, s.generator)
            except ValueError as exc:
                cache.rollback(s.row, s.kv_len)
                w.error = ProtocolError(ErrorCode.BAD_REQUEST, str(exc))
                continue
            # keep the KV of committed + accepted (the new committed[:-1]); drop the rejected
            # tail and the padding
            cache.rollback(s.row, s.kv_len + 1 + n)
            s.committed.extend(win.tokens[:n])
            s.committed.append(nxt)
            s.rounds += 1
            s.drafted += gamma
            s.accepted += n
            s.verify_s += forward_s / len(works)
            w.result = (n, nxt)


def _kv_refusal(exc: KVCacheFullError) -> ProtocolError:
    """A full pool is a refusal (try later); growing past the memory budget is a cap."""
    if isinstance(exc, KVBudgetError):
        return ProtocolError(ErrorCode.OVER_LIMIT, f"the verifier's KV memory over the cap "
                             f"{exc.limit} (config key memory_budget): {exc}")
    return ProtocolError(ErrorCode.REFUSED, f"the verifier's KV cache is full: {exc}")


# ---------------------------------------------------------------------------------------------
# One engine per loaded target on this daemon
# ---------------------------------------------------------------------------------------------

_ENGINES: dict[tuple[str, str, str, str], VerifierEngine] = {}


async def acquire_engine(path: Path, dtype: str, device: str,
                         quant: str = "none") -> VerifierEngine:
    """The engine of this target (started on first use); pair with :func:`release_engine`."""
    key = (str(path), dtype, device, quant)  # path: resolved, as find_local_model gives
    engine = _ENGINES.get(key)
    if engine is None:
        loaded = await MODELS.acquire(path, dtype, device, quant)
        engine = _ENGINES.get(key)  # another role may have made it meanwhile
        if engine is None:
            engine = VerifierEngine(loaded)
            _ENGINES[key] = engine
            engine.start()
        else:
            MODELS.release(loaded)
    engine.refs += 1
    return engine


async def release_engine(engine: VerifierEngine) -> None:
    engine.refs -= 1
    if engine.refs <= 0:
        if _ENGINES.get(engine.loaded.key) is engine:
            del _ENGINES[engine.loaded.key]
        await engine.aclose()
        MODELS.release(engine.loaded)
