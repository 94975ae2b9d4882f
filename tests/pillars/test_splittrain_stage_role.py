"""A train-stage role answers summary() and metrics() (what the daemon's status and
capabilities ask every held role for) before its start has parsed the params, while its start
is failing, and after a start that failed."""

from __future__ import annotations

from typing import Any

import pytest

from p2pllm.config import DaemonConfig
from p2pllm.daemon.roles import RoleContext
from p2pllm.pillars.splittrain.compute import OptimConfig
from p2pllm.pillars.splittrain.messages import Neighbour, StageParams
from p2pllm.pillars.splittrain.stage import TrainStageRole
from p2pllm.wire.frame import ProtocolError
from p2pllm.wire.messages import ErrorCode


def role(params: dict[str, Any], tmp: Any) -> TrainStageRole:
    ctx = RoleContext("job1", "stage0", "coord", "me", DaemonConfig(models_dir=str(tmp)),
                      None, lambda m: None)  # type: ignore[arg-type]
    return TrainStageRole(ctx, params)


def watch_close(r: TrainStageRole) -> list[tuple[str, dict[str, Any]]]:
    """What summary() and metrics() answer while start() fails (it closes the worker: the
    await during which the daemon can ask for status)."""
    seen: list[tuple[str, dict[str, Any]]] = []
    close = r._close_worker

    async def closing() -> None:
        seen.append((r.summary(), r.metrics()))
        await close()

    r._close_worker = closing  # type: ignore[method-assign]
    return seen


async def test_bad_params_summary_and_metrics_do_not_raise(tmp_path: Any) -> None:
    r = role({"model": "tiny"}, tmp_path)  # not a stage's params: start refuses them
    assert r.summary() == "stage (not started)"
    assert set(r.metrics()) == {"worker"}
    seen = watch_close(r)
    with pytest.raises(ProtocolError) as err:
        await r.start()
    assert err.value.code == ErrorCode.BAD_REQUEST
    assert [s for s, _ in seen] == ["stage (not started)"]
    assert seen[0][1]["worker"]["items"] == 0
    assert r.summary() == "stage (not started)" and set(r.metrics()) == {"worker"}


async def test_a_stage_whose_model_is_missing_reports_its_layers(tmp_path: Any) -> None:
    p = StageParams(model="no-such-model", start=2, end=4, index=1, num_stages=2, steps=5,
                    seq_len=16, batch_size=4, micro_batches=2, schedule="gpipe", data=None,
                    optim=OptimConfig(lr=2e-3), prev=Neighbour("n1", "stage0"), next=None,
                    lora=None, seed=3, shuffle=False, init="random")
    r = role(p.to_meta(), tmp_path)
    seen = watch_close(r)
    with pytest.raises(ProtocolError) as err:
        await r.start()
    assert err.value.code == ErrorCode.NOT_FOUND
    assert [s for s, _ in seen] == ["stage 1/2 layers 2-4"]
    assert seen[0][1]["stage"] == 1 and seen[0][1]["step"] == 0
