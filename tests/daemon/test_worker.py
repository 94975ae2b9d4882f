"""RoleWorker: FIFO order on one thread, cancellation, exceptions, busy accounting, close;
and the Role base class that gives every role one."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from typing import Any

import pytest

from p2pllm.config import DaemonConfig
from p2pllm.daemon.roles import EchoRole, Refused, RoleContext
from p2pllm.daemon.worker import HORIZON, RoleWorker, WorkerClosed
from p2pllm.wire.messages import ErrorCode


def crunch(seconds: float) -> float:
    """Real CPU work for about ``seconds``; returns the seconds it measured inside itself."""
    t0 = time.perf_counter()
    h = b"x"
    while time.perf_counter() - t0 < seconds:
        for _ in range(200):
            h = hashlib.sha256(h).digest()
    return time.perf_counter() - t0


async def test_items_run_in_submission_order_on_one_thread() -> None:
    worker = RoleWorker("t")
    order: list[int] = []
    threads: set[int] = set()

    def item(i: int) -> int:
        order.append(i)
        threads.add(threading.get_ident())
        return i * i

    try:
        # Execute: 50 items from 50 concurrent tasks, created in order.
        tasks = [asyncio.create_task(worker.run(item, i)) for i in range(50)]
        results = await asyncio.gather(*tasks)
    finally:
        await worker.aclose()
    assert order == list(range(50))
    assert results == [i * i for i in range(50)]
    assert len(threads) == 1 and threading.get_ident() not in threads
    assert worker.stats().items == 50


async def test_a_cancelled_queued_item_never_runs_and_later_items_still_do() -> None:
    worker = RoleWorker("t")
    gate = threading.Event()
    ran: list[str] = []

    def blocker() -> None:
        gate.wait(10)
        ran.append("blocker")

    try:
        first = asyncio.create_task(worker.run(blocker))
        second = asyncio.create_task(worker.run(ran.append, "second"))
        third = asyncio.create_task(worker.run(ran.append, "third"))
        await asyncio.sleep(0.05)
        assert worker.stats().queued == 2 and worker.stats().running
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert worker.stats().queued == 1
        gate.set()
        await first
        await third
    finally:
        gate.set()
        await worker.aclose()
    assert ran == ["blocker", "third"]


async def test_cancelling_a_running_item_sets_its_cancel_event() -> None:
    worker = RoleWorker("t")
    started = threading.Event()
    stopped_early: list[bool] = []

    def long(cancel: threading.Event) -> None:
        started.set()
        stopped_early.append(cancel.wait(30))  # True only when cancel is set

    try:
        cancel = threading.Event()
        task = asyncio.create_task(worker.run(long, cancel, cancel=cancel))
        assert await asyncio.to_thread(started.wait, 10)
        t0 = time.perf_counter()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The next item runs as soon as the running one has seen its cancel event.
        assert await asyncio.wait_for(worker.run(lambda: "next"), 10) == "next"
        assert time.perf_counter() - t0 < 10
    finally:
        await worker.aclose()
    assert stopped_early == [True]


async def test_exceptions_reach_the_caller_and_the_worker_goes_on() -> None:
    worker = RoleWorker("t")
    boom = ValueError("bad step")

    def fail() -> None:
        raise boom

    try:
        with pytest.raises(ValueError) as info:
            await worker.run(fail)
        assert info.value is boom
        assert await worker.run(sum, [1, 2, 3]) == 6
        s = worker.stats()
        assert s.items == 2 and s.errors == 1
    finally:
        await worker.aclose()


async def test_then_runs_on_the_loop_with_the_result_before_run_returns() -> None:
    worker = RoleWorker("t")
    loop_thread = threading.get_ident()
    seen: list[tuple[str, Any, int]] = []

    def then(result: int) -> None:
        seen.append(("then", result, threading.get_ident()))

    def fail() -> int:
        raise ValueError("bad step")

    def refuse(result: int) -> None:
        raise LookupError(f"cannot send {result}")

    try:
        assert await worker.run(sum, [1, 2, 3], then=then) == 6
        assert seen == [("then", 6, loop_thread)]  # already called when run() returned
        # fn failed: no follow-up, the caller gets fn's exception
        with pytest.raises(ValueError):
            await worker.run(fail, then=then)
        assert len(seen) == 1
        # the follow-up failed: the caller gets its exception
        with pytest.raises(LookupError, match="cannot send 6"):
            await worker.run(sum, [1, 2, 3], then=refuse)
        # the awaiting task was cancelled while its item ran: nobody wants the follow-up
        started = threading.Event()

        def slow() -> int:
            started.set()
            time.sleep(0.05)
            return 1

        task = asyncio.create_task(worker.run(slow, then=then))
        assert await asyncio.to_thread(started.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await worker.run(sum, [2], then=then) == 2  # after slow() has finished
        assert seen == [("then", 6, loop_thread), ("then", 2, loop_thread)]
    finally:
        await worker.aclose()


async def test_busy_and_idle_seconds_measure_the_real_work() -> None:
    worker = RoleWorker("t")
    try:
        # Prepare: the worker idles on its own first.
        idle0 = worker.stats().idle_s
        await asyncio.sleep(0.2)
        assert worker.stats().idle_s - idle0 >= 0.2
        assert worker.stats().busy_s == 0.0
        # Execute: real CPU work, measured inside the items and around the whole stretch.
        span = worker.span()
        t0 = time.perf_counter()
        inside = 0.0
        for _ in range(4):
            inside += await worker.run(crunch, 0.05)
        outside = time.perf_counter() - t0
        span.end()
        s = worker.stats()
        # Assert: busy covers the work, and no more than the time it took.
        assert inside <= s.busy_s <= outside
        assert inside <= span.busy_s <= span.wall_s <= outside + 1e-3
        assert span.idle_fraction == pytest.approx(1 - span.busy_s / span.wall_s)
        assert 0.0 <= span.idle_fraction < 1.0
        assert s.items == 4 and s.queued == 0 and not s.running
        # The busy fraction over the whole life is busy / life (life < HORIZON here).
        now = time.perf_counter()
        life = now - worker.created
        assert life < HORIZON
        assert worker.busy_fraction(HORIZON, now) == pytest.approx(worker.busy_seconds(now) / life)
        # A window that holds only idle time is 0 busy.
        await asyncio.sleep(0.3)
        assert worker.busy_fraction(0.2) == 0.0
        # Idle grows while nothing runs; busy does not.
        before = worker.stats()
        await asyncio.sleep(0.1)
        after = worker.stats()
        assert after.busy_s == before.busy_s and after.idle_s - before.idle_s >= 0.1
    finally:
        await worker.aclose()


async def test_a_running_item_counts_as_busy_while_it_runs() -> None:
    worker = RoleWorker("t")
    gate, started = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        gate.wait(10)

    try:
        task = asyncio.create_task(worker.run(hold))
        assert await asyncio.to_thread(started.wait, 10)
        seen = time.perf_counter()  # the item has been running since before this
        queued = [asyncio.create_task(worker.run(time.sleep, 0)) for _ in range(3)]
        await asyncio.sleep(0.15)
        s = worker.stats()
        assert s.running and s.queued == 3 and s.max_queued >= 3
        now = time.perf_counter()
        assert worker.busy_seconds(now) >= now - seen >= 0.15
        assert worker.busy_fraction(0.1) == pytest.approx(1.0)
        gate.set()
        await task
        await asyncio.gather(*queued)
        assert worker.stats().wait_s > 0
    finally:
        gate.set()
        await worker.aclose()


async def test_close_fails_queued_items_and_waits_for_the_running_one() -> None:
    worker = RoleWorker("t")
    started = threading.Event()
    finished: list[bool] = []

    def running(cancel: threading.Event) -> str:
        started.set()
        cancel.wait(30)
        time.sleep(0.1)  # some work after the cancel: close() must wait for it
        finished.append(True)
        return "done"

    cancel = threading.Event()
    first = asyncio.create_task(worker.run(running, cancel, cancel=cancel))
    queued = asyncio.create_task(worker.run(finished.append, False))
    assert await asyncio.to_thread(started.wait, 10)
    await worker.aclose()
    # Assert: the running item saw the cancel and finished before aclose returned.
    assert cancel.is_set() and finished == [True]
    assert await first == "done"
    with pytest.raises(WorkerClosed) as info:
        await queued
    assert info.value.code == ErrorCode.SHUTTING_DOWN
    with pytest.raises(WorkerClosed):
        await worker.run(time.sleep, 0)
    assert worker._thread is not None and not worker._thread.is_alive()
    await worker.aclose()  # idempotent


async def test_a_worker_never_used_closes_without_a_thread() -> None:
    worker = RoleWorker("t")
    await worker.aclose()
    assert worker._thread is None and worker.closed


def _ctx(reports: list[dict[str, Any]]) -> RoleContext:
    return RoleContext("job1", "echo", "coord", "me", DaemonConfig(), None, reports.append)  # type: ignore[arg-type]


async def test_every_role_has_a_worker_closed_on_stop_and_reported_in_metrics() -> None:
    role = EchoRole(_ctx([]), {})
    await role.start()
    assert await role.worker.run(crunch, 0.02) >= 0.02
    m = role.metrics()
    assert m["calls"] == 0
    assert m["worker"]["items"] == 1 and m["worker"]["busy_s"] >= 0.02
    assert set(m["worker"]) >= {"busy_s", "idle_s", "items", "queued", "busy"}
    await role.stop()
    assert role.stopped and role.worker.closed


async def test_a_role_that_fails_to_start_closes_its_worker() -> None:
    class Failing(EchoRole):
        async def on_start(self) -> None:
            await self.worker.run(time.sleep, 0)
            raise Refused("no model here")

    role = Failing(_ctx([]), {})
    with pytest.raises(Refused):
        await role.start()
    assert role.worker.closed
    assert role.worker._thread is not None and not role.worker._thread.is_alive()
