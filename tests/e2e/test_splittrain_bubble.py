"""The split-training bubble is measured: each stage's worker busy time in each step against
the step's pipeline time, on a real 2-stage run of the bundled model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from p2pllm.pillars.splittrain.schedule import bubble_fraction, measured_bubble
from tests.conftest import BUNDLED
from tests.e2e.test_splittrain import all_up, start_cluster, train

EPS = 1e-6  # float rounding of sums of the same measured intervals


def bundled_ids(tmp_path: Path, tokens: int = 2000) -> Path:
    g = torch.Generator().manual_seed(0)
    f = tmp_path / "ids.safetensors"
    save_file({"input_ids": torch.randint(3, 2048, (tokens,), generator=g)}, str(f))
    return f


def check_step(rec: dict[str, Any]) -> None:
    """What holds in every step whatever the load: busy within the window, ops within busy."""
    stages = rec["stages"]
    for s in stages:
        assert 0.0 < s["forward_s"] + s["backward_s"] <= s["busy_s"] + EPS
        assert s["busy_s"] <= s["window_s"] + EPS
        assert 0.0 <= s["bubble"] < 1.0
    assert [s["bubble"] for s in stages] == pytest.approx(
        measured_bubble([s["busy_s"] for s in stages], [s["window_s"] for s in stages]))
    assert rec["bubble"] == pytest.approx(sum(s["bubble"] for s in stages) / len(stages))


async def test_the_bubble_is_measured_per_stage_per_step(daemons, ctl, tmp_path: Path) -> None:
    # Prepare: two daemons, the bundled model (4 layers, tied), token ids.
    ds = start_cluster(daemons, 2, tmp_path)
    await all_up(ctl, ds)
    data = bundled_ids(tmp_path)
    conn = await ctl(ds[0].port)
    runs = {}
    for micro in (1, 8):
        # the dataset's content goes with the request (as `train split --data FILE` sends it)
        meta = {"model": str(BUNDLED), "data_format": "safetensors", "steps": 3, "batch_size": 8,
                "micro_batches": micro, "seq_len": 32, "schedule": "gpipe", "stages": 2,
                "lr": 1e-3, "seed": 1}
        # Execute
        partials, result = await train(conn, meta, data.read_bytes())
        steps = [p for p in partials if p["event"] == "step"]
        assert len(steps) == 3
        # Assert: a measurement per stage per step, consistent with itself and the run's figures.
        for rec in steps:
            check_step(rec)
        assert result["bubble_theory"] == pytest.approx(bubble_fraction(2, micro))
        for k, st in enumerate(result["stages"]):
            busy = sum(rec["stages"][k]["busy_s"] for rec in steps)
            pipe = sum(max(s["window_s"] for s in rec["stages"]) for rec in steps)
            assert st["bubble"] == pytest.approx(1 - busy / pipe)
        assert result["bubble"] == pytest.approx(sum(s["bubble"] for s in result["stages"]) / 2)
        runs[micro] = steps
    # With one micro-batch nothing overlaps: stage 1's forward and backward of it happen after
    # stage 0's forward and before its backward, while stage 0's worker waits. So stage 0's idle
    # time in each step is at least stage 1's compute time, however loaded the machine is.
    for rec in runs[1]:
        s0, s1 = rec["stages"]
        assert s0["window_s"] - s0["busy_s"] >= s1["forward_s"] + s1["backward_s"] - EPS
    print({m: [round(r["bubble"], 3) for r in recs] for m, recs in runs.items()})


def test_measured_bubble_is_idle_time_over_the_longest_window() -> None:
    assert measured_bubble([1.0, 2.0], [4.0, 3.0]) == [0.75, 0.5]
    assert measured_bubble([0.0], [0.0]) == [0.0]
    assert measured_bubble([5.0, 1.0], [4.0, 4.0]) == [0.0, 0.75]  # clamped to [0, 1]
    with pytest.raises(ValueError):
        measured_bubble([1.0], [1.0, 2.0])


async def test_unbalanced_stages_show_a_bubble_the_formula_does_not(daemons, ctl, tmp_path: Path) -> None:
    """Stage 1 holds three of the four layers and the (tied) head, stage 0 one layer: with 8
    micro-batches the formula says (K-1)/(M+K-1) = 1/9 whatever the split, but stage 0 waits
    on the slow stage, and the measured bubble (what the dashboard shows) says so."""
    ds = start_cluster(daemons, 2, tmp_path)
    await all_up(ctl, ds)
    data = bundled_ids(tmp_path)
    conn = await ctl(ds[0].port)
    meta = {"model": str(BUNDLED), "data_format": "safetensors", "steps": 2, "batch_size": 8,
            "micro_batches": 8, "seq_len": 32, "schedule": "gpipe", "layers": "0-1,1-4",
            "lr": 1e-3, "seed": 1}
    partials, result = await train(conn, meta, data.read_bytes())
    steps = [p for p in partials if p["event"] == "step"]
    assert len(steps) == 2
    for rec in steps:
        check_step(rec)
    assert result["bubble_theory"] == pytest.approx(1 / 9)
    assert 0.0 <= result["bubble"] < 1.0
    assert result["bubble"] > result["bubble_theory"] + 0.05, result
    # the light stage idles more than the heavy one: it waits for it every micro-batch
    s0, s1 = result["stages"]
    assert s0["bubble"] > s1["bubble"], result["stages"]
    print({"bubble": result["bubble"], "theory": result["bubble_theory"], "stages": [s["bubble"] for s in result["stages"]]})
