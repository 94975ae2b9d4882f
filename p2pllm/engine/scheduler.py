"""Continuous batching over one :class:`ModelSlice` and one paged :class:`KVCache`.

Policy (engine only: no sockets, no asyncio):

- **Admission by free blocks.** A waiting sequence is admitted (oldest first) when the blocks
  of its context (prompt + tokens already emitted, after a preemption) plus ``headroom``
  blocks per running sequence are free. With nothing running, the head is admitted whenever
  its context fits the whole pool.
- **One batched decode.** Every running sequence with one token to feed goes into ONE forward
  ``(B, 1)`` with ``last_only=True``.
- **Chunked prefill, separate forwards.** A row's pending context is fed in chunks of at most
  the step's remaining token budget (``max_step_tokens`` minus the decodes), one forward per
  row (ModelSlice batches rows of equal T only; separate forwards keep decodes at T=1).
- **Preemption.** When a step needs more blocks than are free, the youngest running sequence
  gives all its blocks back and returns to the head of the waiting queue; it recomputes its
  prompt + generated tokens later, and its emitted tokens are not emitted again.
- **Cancel.** :meth:`Sequence.abort` frees the row at once when no step is running, else right
  after the running forward.

Every sequence samples with its own ``torch.Generator`` (seeded from its params), so what it
draws does not depend on its batch company; greedy outputs equal :func:`generate_ids` of the
sequence alone (same stop ids, max_tokens and length limits), up to float ulps of batching.

Size: over 400 lines because the sequence, the scheduler's policy and its stepping thread are
one mechanism (every caller, :func:`~p2pllm.engine.generate.generate_ids` included, uses all
three); the model and the paged cache are elsewhere.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import torch

from p2pllm.engine.errors import ModelError, SequenceTooLongError
from p2pllm.engine.kv_cache import DEFAULT_BLOCK_SIZE, KVCache
from p2pllm.engine.model import ModelSlice
from p2pllm.engine.sampling import SamplingParams, greedy_token, make_generator, sample

__all__ = ["BatchEngine", "Scheduler", "SchedulerStats", "Sequence"]


class Sequence:
    """One generation: its prompt, sampling, limits and what it has emitted."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: Seq[int], params: SamplingParams | None = None,
                 max_tokens: int = 128, *, stop_ids: Iterable[int] | None = None,
                 on_token: Callable[[int], None] | None = None,
                 generator: torch.Generator | None = None,
                 on_done: Callable[[], None] | None = None) -> None:
        """``on_token(id)`` runs on the stepping thread as each token is drawn (an exception
        there ends the sequence with it); ``on_done()`` there once it ends, however."""
        self.id = next(Sequence._ids)
        self.prompt = list(prompt_ids)
        if not self.prompt:
            raise ModelError("empty prompt")
        if max_tokens < 1:
            raise ModelError(f"max_tokens must be >= 1, got {max_tokens}")
        self.params = params or SamplingParams()
        self.max_tokens = max_tokens
        self.stop_ids: frozenset[int] | None = None if stop_ids is None else frozenset(stop_ids)
        self.on_token = on_token
        self.on_done = on_done
        self.generator = generator if generator is not None else make_generator(self.params.seed)
        self.out: list[int] = []
        self.row: int | None = None
        self.budget = max_tokens
        self.stop_reason = "max_tokens"
        self.error: BaseException | None = None
        self.cancelled = False
        self.preemptions = 0
        self._done = threading.Event()
        self._sched: Scheduler | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def context(self) -> list[int]:
        return self.prompt + self.out

    def abort(self) -> None:
        """Cancel: stop generating and free the row's blocks (now, or after the running forward)."""
        self.cancelled = True
        s = self._sched
        if s is not None:
            s._reap_now(self)

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> list[int]:
        if not self._done.wait(timeout):
            raise TimeoutError(f"sequence {self.id} not done")
        if self.error is not None:
            raise self.error
        return list(self.out)


@dataclass
class SchedulerStats:
    running: int
    waiting: int
    blocks_used: int
    blocks_total: int
    last_batch: int  # decode rows in the last step's batched forward
    preemptions: int
    steps: int
    tokens: int  # tokens emitted in all

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Scheduler:
    """Waiting/running queues over one cache; :meth:`step` runs one iteration."""

    def __init__(self, model: ModelSlice, *, max_total_tokens: int | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE, max_step_tokens: int = 256,
                 headroom: int = 1, max_running: int = 256) -> None:
        if not (model.has_embed and model.has_head and model.start == 0
                and model.end == model.config.num_layers):
            raise ModelError("batched generation needs the whole model")
        self.model = model
        self.limit = model.config.max_position_embeddings
        total = max_total_tokens if max_total_tokens is not None else 16 * self.limit
        self.cache: KVCache = model.new_cache(0, self.limit, max_total_tokens=total,
                                              block_size=block_size)
        self.block_size = block_size
        self.max_step_tokens = max(1, max_step_tokens)
        self.headroom, self.max_running = headroom, max_running
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.lock = threading.RLock()
        self._in_step = False
        self.preemptions = self.steps = self.tokens = self.last_batch = 0

    # -- queue ----------------------------------------------------------------------------

    def add(self, seq: Sequence) -> Sequence:
        n = len(seq.prompt)
        if n > self.limit:
            raise SequenceTooLongError(f"the prompt has {n} tokens; the model takes at most "
                                       f"{self.limit}")
        if self._blocks(n) > self.cache.num_blocks:
            raise SequenceTooLongError(f"the prompt has {n} tokens; the KV pool holds "
                                       f"{self.cache.num_blocks * self.block_size}")
        seq.budget = min(seq.max_tokens, self.limit - n + 1)
        seq.stop_reason = "max_tokens" if seq.budget == seq.max_tokens else "length"
        if seq.stop_ids is None:
            seq.stop_ids = frozenset(self.model.config.eos_token_ids)
        with self.lock:
            seq._sched = self
            self.waiting.append(seq)
        return seq

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> SchedulerStats:
        with self.lock:
            return SchedulerStats(len(self.running), len(self.waiting), self.cache.blocks_used,
                                  self.cache.num_blocks, self.last_batch, self.preemptions,
                                  self.steps, self.tokens)

    # -- one iteration --------------------------------------------------------------------

    def step(self) -> int:
        """Admit, preempt if needed, one batched decode, prefill chunks; returns tokens fed."""
        with self.lock:
            self._in_step = True
            try:
                with torch.inference_mode():
                    return self._step()
            finally:
                self._in_step = False

    def _len(self, s: Sequence) -> int:
        return 0 if s.row is None else self.cache.length(s.row)

    def _blocks(self, n: int) -> int:
        return -(-n // self.block_size)

    def _step(self) -> int:
        self.steps += 1
        for s in [s for s in self.running if s.cancelled]:
            self._finish(s, "cancelled")
        self.waiting = deque(s for s in self.waiting if not (s.cancelled and self._drop(s)))
        self._admit()
        # blocks this step needs: decodes may cross a block boundary; prefill takes the budget
        decodes = [s for s in self.running if len(s.context()) - self._len(s) == 1]
        need = sum(1 for s in decodes if self._len(s) % self.block_size == 0)
        while need > self.cache.blocks_free and len(self.running) > 1:
            victim = self.running[-1]
            if victim in decodes and self._len(victim) % self.block_size == 0:
                need -= 1
            if victim in decodes:
                decodes.remove(victim)
            self._preempt(victim)
        fed = 0
        self.last_batch = len(decodes)
        if decodes:
            fed += self._decode(decodes)
        budget = self.max_step_tokens - fed
        for s in list(self.running):
            if budget <= 0:
                break
            if s.done or s not in self.running:
                continue
            pending = len(s.context()) - self._len(s)
            if pending <= 1 and s.out:
                continue
            if s in decodes:
                continue
            room = self.cache.blocks_free * self.block_size + \
                (-self._len(s)) % self.block_size
            n = min(pending, budget, room)
            if n <= 0:
                if len(self.running) > 1 and s is not self.running[-1]:
                    self._preempt(self.running[-1])
                    continue
                if len(self.running) == 1 and not self.waiting:
                    self._fail(s, ModelError("the KV pool cannot hold this sequence"))
                continue
            fed += self._prefill(s, n)
            budget -= n
        return fed

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_running:
            s = self.waiting[0]
            ctx = len(s.context())
            # blocks the running rows still need for the context they have not fed yet
            owed = sum(self._blocks(len(r.context())) - self._blocks(self._len(r))
                       for r in self.running if r.row is not None)
            free = self.cache.blocks_free - owed
            want = self._blocks(ctx) + self.headroom * (len(self.running) + 1)
            if self.running and want > free:
                return
            if not self.running and self._blocks(ctx) > free:
                return
            self.waiting.popleft()
            s.row = self.cache.add_row()
            self.running.append(s)

    def _decode(self, seqs: list[Sequence]) -> int:
        b = len(seqs)
        x = torch.tensor([[s.context()[-1]] for s in seqs], dtype=torch.int64)
        pos = torch.tensor([[self._len(s)] for s in seqs], dtype=torch.int64)
        slots = torch.tensor([s.row for s in seqs], dtype=torch.int64)
        logits = self.model(x, pos, self.cache, slots=slots, last_only=True)[:, -1]
        for i, s in enumerate(seqs):
            self._emit(s, logits[i])
        return b

    def _prefill(self, s: Sequence, n: int) -> int:
        ctx = s.context()
        start = self._len(s)
        assert s.row is not None
        x = torch.tensor([ctx[start:start + n]], dtype=torch.int64)
        pos = torch.arange(start, start + n, dtype=torch.int64).unsqueeze(0)
        logits = self.model(x, pos, self.cache, slots=torch.tensor([s.row]), last_only=True)
        if start + n == len(ctx):
            self._emit(s, logits[0, -1])
        return n

    def _emit(self, s: Sequence, logits: torch.Tensor) -> None:
        if s.cancelled:
            self._finish(s, "cancelled")
            return
        p = s.params
        penalise = p.repetition_penalty != 1.0
        if p.greedy and not penalise:
            token = greedy_token(logits)
        else:
            hist = torch.tensor(s.context(), dtype=torch.int64) if penalise else None
            token = sample(logits, p, s.generator, hist)[0]
        s.out.append(token)
        self.tokens += 1
        if s.on_token is not None:
            try:
                s.on_token(token)
            except BaseException as e:  # the callback's error ends its sequence
                self._fail(s, e)
                return
        assert s.stop_ids is not None
        if token in s.stop_ids:
            self._finish(s, "eos")
        elif len(s.out) >= s.budget:
            self._finish(s, s.stop_reason)
        elif s.cancelled:
            self._finish(s, "cancelled")

    def _preempt(self, s: Sequence) -> None:
        self.running.remove(s)
        if s.row is not None:
            self.cache.remove_row(s.row)
            s.row = None
        s.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(s)

    def _release(self, s: Sequence) -> None:
        if s in self.running:
            self.running.remove(s)
        if s.row is not None:
            self.cache.remove_row(s.row)
            s.row = None

    def _finish(self, s: Sequence, reason: str) -> None:
        self._release(s)
        s.stop_reason = reason
        s._done.set()
        if s.on_done is not None:
            with contextlib.suppress(Exception):  # a waiter's problem, not the batch's
                s.on_done()

    def _fail(self, s: Sequence, e: BaseException) -> None:
        s.error = e
        self._finish(s, "error")

    def _drop(self, s: Sequence) -> bool:
        self._finish(s, "cancelled")
        return True

    def _reap_now(self, s: Sequence) -> None:
        """Free a cancelled sequence now when no step runs (else the step frees it)."""
        if not self.lock.acquire(blocking=False):
            return
        try:
            if self._in_step or s.done:
                return
            if s in self.waiting:
                self.waiting.remove(s)
            self._finish(s, "cancelled")
        finally:
            self.lock.release()


class BatchEngine:
    """A thread that loops :meth:`Scheduler.step` while work exists; thread-safe submit()."""

    def __init__(self, model: ModelSlice, **kw: Any) -> None:
        self.scheduler = Scheduler(model, **kw)
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> BatchEngine:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="p2pllm-batch", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self.scheduler.lock:
            for s in list(self.scheduler.running) + list(self.scheduler.waiting):
                self.scheduler._finish(s, "cancelled")
            self.scheduler.waiting.clear()

    def submit(self, prompt_ids: Seq[int], params: SamplingParams | None = None,
               max_tokens: int = 128, **kw: Any) -> Sequence:
        return self.add(Sequence(prompt_ids, params, max_tokens, **kw))

    def add(self, seq: Sequence) -> Sequence:
        """Queue a sequence made by the caller (who may abort it before this returns: it is
        then dropped at the next step). Waits while a step runs (the scheduler's lock)."""
        self.scheduler.add(seq)
        with self._cond:
            self._cond.notify_all()
        return seq

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self.scheduler.has_work():
                    self._cond.wait(1.0)
                if self._stop:
                    return
            try:
                self.scheduler.step()
            except BaseException as e:  # fail every sequence, keep serving
                self.error = e
                with self.scheduler.lock:
                    for s in list(self.scheduler.running):
                        self.scheduler._fail(s, e)
