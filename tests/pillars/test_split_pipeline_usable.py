"""A kept-alive split pipeline whose job was stopped is never handed to a new request.

Found by tests/security (F): right after `ctl stop`, a GENERATE split could be given the
stopped pipeline while its shards were still being released, and fail UNKNOWN_JOB.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from p2pllm.pillars.split.pipeline import Pipeline


def _pipe(stopped: bool) -> SimpleNamespace:
    loop = asyncio.new_event_loop()
    try:
        ready = loop.create_future()
        ready.set_result(None)
    finally:
        loop.close()
    return SimpleNamespace(closing=False, job=SimpleNamespace(stopped=stopped), replaying=False,
                           broken=None, ready=ready, stages=[SimpleNamespace(node_id="a")])


def test_a_running_pipeline_is_usable() -> None:
    assert Pipeline.usable(_pipe(stopped=False), {"a"})  # type: ignore[arg-type]


def test_a_stopped_jobs_pipeline_is_not_usable() -> None:
    assert not Pipeline.usable(_pipe(stopped=True), {"a"})  # type: ignore[arg-type]
