"""RoleWorker: the one thread a role computes on, in order, with cancellation and busy time.

A role's torch work (loading, forwards, backwards, optimizer steps) must not run on the event
loop. Every role gets one worker (``Role.worker``); ``await worker.run(fn, *args)`` queues
``fn(*args)`` behind the items queued before it and returns its result or raises its
exception. Items run one at a time, first in first out, on one thread, so a role's own state
(a KV cache, accumulated gradients, a draft cache) is only ever touched by one thread and needs
no lock.

Follow-up: ``run(fn, *args, then=cb)`` calls ``cb(result)`` on the event loop in the very
callback that delivers the result, before the awaiting task resumes (a task's turn comes a
loop iteration later, after whatever else is ready): what must leave at once, a shard's
hidden states for the next node, leaves from there. Not called when ``fn`` raised or the
awaiting task was cancelled; an exception ``cb`` raises is the awaiting task's.

Cancellation: when the task awaiting an item is cancelled, a queued item is dropped (it never
runs) and a running one is told through its ``cancel`` event (if it was given one: work that
can stop early checks it) and otherwise runs to its end; the task sees CancelledError at once.
``aclose()`` fails every queued item with :class:`WorkerClosed`, sets the running item's
``cancel`` event, and waits for it to finish, so the role can drop its weights afterwards.

Accounting: busy seconds (time inside items, measured on the worker thread), idle seconds
(the rest of the worker's life), items, errors, queue depth, time items waited in the queue,
and a busy fraction over a recent window. :meth:`RoleWorker.span` measures one stretch of
time (a training step): the busy seconds inside it and its idle fraction.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode

__all__ = ["BUSY_WINDOW", "RoleWorker", "Span", "WorkerClosed", "WorkerStats"]

log = logging.getLogger(__name__)

T = TypeVar("T")

BUSY_WINDOW = 10.0  # seconds the busy fraction in the metrics looks back
HORIZON = 60.0  # seconds of busy history kept (the longest window a query may ask for)
COALESCE = 0.1  # items ending within this many seconds of a chunk's start join that chunk


class WorkerClosed(ProtocolError):
    """The worker stopped before this item could run (the role is being stopped)."""

    def __init__(self, name: str) -> None:
        super().__init__(ErrorCode.SHUTTING_DOWN, f"{name} has stopped")


@dataclass(frozen=True)
class WorkerStats:
    """A worker's figures at one moment (seconds from time.perf_counter)."""

    busy_s: float
    idle_s: float
    items: int
    errors: int
    queued: int
    max_queued: int
    wait_s: float
    running: bool
    busy: float  # busy fraction over the last BUSY_WINDOW seconds (or the life, if shorter)

    def as_dict(self) -> dict[str, Any]:
        return {"busy_s": round(self.busy_s, 4), "idle_s": round(self.idle_s, 4),
                "items": self.items, "errors": self.errors, "queued": self.queued,
                "max_queued": self.max_queued, "wait_s": round(self.wait_s, 4),
                "running": self.running, "busy": round(self.busy, 4)}


@dataclass(eq=False)
class _Item:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    cancel: threading.Event | None
    then: Callable[[Any], None] | None = None
    queued_at: float = field(default_factory=time.perf_counter)
    running: bool = False


class Span:
    """Busy and wall seconds of one worker between ``worker.span()`` and now (or ``end()``)."""

    def __init__(self, worker: RoleWorker) -> None:
        self._worker = worker
        self.started = time.perf_counter()
        self._busy0 = worker.busy_seconds(self.started)
        self._ended: tuple[float, float] | None = None

    def end(self) -> Span:
        """Freeze the span at this moment; later reads return the same figures."""
        if self._ended is None:
            now = time.perf_counter()
            self._ended = (now, self._worker.busy_seconds(now))
        return self

    def _now(self) -> tuple[float, float]:
        if self._ended is not None:
            return self._ended
        now = time.perf_counter()
        return now, self._worker.busy_seconds(now)

    @property
    def wall_s(self) -> float:
        return self._now()[0] - self.started

    @property
    def busy_s(self) -> float:
        return max(0.0, self._now()[1] - self._busy0)

    @property
    def idle_s(self) -> float:
        now, busy = self._now()
        return max(0.0, (now - self.started) - (busy - self._busy0))

    @property
    def idle_fraction(self) -> float:
        now, busy = self._now()
        wall = now - self.started
        if wall <= 0:
            return 0.0
        return min(1.0, max(0.0, 1.0 - (busy - self._busy0) / wall))


class RoleWorker:
    """One thread, FIFO order, for one role's compute (see the module docstring)."""

    def __init__(self, name: str = "role-worker") -> None:
        self.name = name
        self.created = time.perf_counter()
        self._cond = threading.Condition()
        self._queue: collections.deque[_Item] = collections.deque()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._exited: asyncio.Future[None] | None = None
        # accounting (guarded by _cond)
        self._current: _Item | None = None
        self._running_since: float | None = None
        self._busy_s = 0.0
        self._wait_s = 0.0
        self._items = 0
        self._errors = 0
        self._max_queued = 0
        self._chunks: collections.deque[tuple[float, float, float]] = collections.deque()  # (start, end, busy)

    # -- submitting ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    async def run(self, fn: Callable[..., T], /, *args: Any,
                  cancel: threading.Event | None = None,
                  then: Callable[[T], None] | None = None) -> T:
        """Run ``fn(*args)`` on the worker thread after everything queued before it.

        ``cancel`` is set when the awaiting task is cancelled or the worker closes while the
        item runs (long work checks it and returns early); a queued item is simply dropped.
        ``then(result)`` runs on the event loop as the result arrives, before this returns
        (the module docstring's follow-up).
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        item = _Item(fn, args, fut, cancel, then)
        with self._cond:
            if self._closed:
                raise WorkerClosed(self.name)
            if self._thread is None:
                self._start(loop)
            elif loop is not self._loop:
                raise RuntimeError(f"{self.name} belongs to another event loop")
            self._queue.append(item)
            self._max_queued = max(self._max_queued, len(self._queue))
            self._cond.notify()
        try:
            return await fut
        except asyncio.CancelledError:
            with self._cond:
                if item.running:
                    if item.cancel is not None:
                        item.cancel.set()
                else:
                    with contextlib.suppress(ValueError):
                        self._queue.remove(item)
            raise

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._exited = loop.create_future()
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread.start()

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop taking items; fail the queued ones; ask the running one to stop."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            dropped = list(self._queue)
            self._queue.clear()
            current = self._current
            if current is not None and current.cancel is not None:
                current.cancel.set()
            self._cond.notify_all()
        for item in dropped:
            if not item.future.done():
                item.future.set_exception(WorkerClosed(self.name))

    async def aclose(self) -> None:
        """close(), then wait until the running item (if any) has finished. Idempotent."""
        self.close()
        exited = self._exited
        if exited is not None and not exited.done():
            await asyncio.shield(exited)
        thread = self._thread
        if thread is not None and exited is not None:
            # ``exited`` is posted as the thread's last act: it returns within microseconds,
            # and after aclose() it is gone (a loaded host could otherwise still see it alive)
            thread.join(timeout=1.0)

    # -- the thread ------------------------------------------------------------------------

    def _main(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:  # closed and drained
                    break
                item = self._queue.popleft()
                item.running = True
                self._current = item
                start = self._running_since = time.perf_counter()
                self._wait_s += start - item.queued_at
            result: Any = None
            error: BaseException | None = None
            try:
                result = item.fn(*item.args)
            except BaseException as exc:  # delivered to the awaiting task
                error = exc
            end = time.perf_counter()
            with self._cond:
                self._account(start, end)
                self._items += 1
                self._errors += error is not None
                self._current = None
                self._running_since = None
            self._post(_deliver, item.future, result, error, item.then)
            del item, result, error  # drop references to tensors before waiting again
        self._post(_deliver, self._exited, None, None)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            log.debug("%s: event loop closed, result dropped", self.name)

    def _account(self, start: float, end: float) -> None:
        """Add one item's busy interval (caller holds _cond)."""
        busy = end - start
        self._busy_s += busy
        chunks = self._chunks
        if chunks and end - chunks[-1][0] <= COALESCE:
            s0, _, b0 = chunks[-1]
            chunks[-1] = (s0, end, b0 + busy)
        else:
            chunks.append((start, end, busy))
        while chunks and chunks[0][1] < end - HORIZON:
            chunks.popleft()

    # -- figures ---------------------------------------------------------------------------

    def busy_seconds(self, now: float | None = None) -> float:
        """Seconds spent inside items so far, the running one's elapsed part included."""
        now = time.perf_counter() if now is None else now
        with self._cond:
            running = self._running_since
            return self._busy_s + (max(0.0, now - running) if running is not None else 0.0)

    def busy_fraction(self, window: float = BUSY_WINDOW, now: float | None = None) -> float:
        """The fraction of the last ``window`` seconds (at most HORIZON, at most the worker's
        life) spent inside items."""
        now = time.perf_counter() if now is None else now
        lo = max(now - min(window, HORIZON), self.created)
        span = now - lo
        if span <= 0:
            return 0.0
        busy = 0.0
        with self._cond:
            for s, e, b in self._chunks:
                if e <= lo:
                    continue
                if s >= lo:
                    busy += b
                else:  # a chunk across the window's start: its busy time, pro rata
                    busy += b * (e - lo) / (e - s)
            if self._running_since is not None:
                busy += now - max(self._running_since, lo)
        return min(1.0, busy / span)

    def stats(self) -> WorkerStats:
        now = time.perf_counter()
        busy = self.busy_seconds(now)
        with self._cond:
            queued, max_queued = len(self._queue), self._max_queued
            items, errors, wait_s = self._items, self._errors, self._wait_s
            running = self._running_since is not None
        return WorkerStats(busy_s=busy, idle_s=max(0.0, (now - self.created) - busy), items=items,
                           errors=errors, queued=queued, max_queued=max_queued, wait_s=wait_s,
                           running=running, busy=self.busy_fraction(BUSY_WINDOW, now))

    def span(self) -> Span:
        """Start measuring a stretch of time: ``span.busy_s``, ``wall_s``, ``idle_fraction``."""
        return Span(self)


def _deliver(fut: asyncio.Future[Any] | None, result: Any, error: BaseException | None,
             then: Callable[[Any], None] | None = None) -> None:
    if fut is None or fut.done():  # cancelled by its awaiting task
        return
    if then is not None and error is None:
        try:
            then(result)
        except BaseException as exc:  # the awaiting task's, like fn's own
            error = exc
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
