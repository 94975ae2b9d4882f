"""GPipe and 1F1B schedules: complete, deadlock-free, the theoretical bubble, bounded memory."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pllm.pillars.splittrain.schedule import (
    Op,
    Phase,
    ScheduleError,
    bubble_fraction,
    gpipe,
    one_f_one_b,
    pipeline_schedules,
    simulate,
    stage_schedule,
)

F, B = Phase.FORWARD, Phase.BACKWARD


def names(ops: list[Op]) -> list[str]:
    return [str(op) for op in ops]


def test_gpipe_is_all_forwards_then_all_backwards() -> None:
    assert names(gpipe(0, 2, 3)) == ["F0", "F1", "F2", "B0", "B1", "B2"]
    assert names(gpipe(1, 2, 3)) == ["F0", "F1", "F2", "B0", "B1", "B2"]


def test_1f1b_warms_up_by_distance_to_the_last_stage() -> None:
    # 4 stages, 4 micro-batches: stage k runs K-k-1 warm-up forwards.
    assert names(one_f_one_b(0, 4, 4)) == ["F0", "F1", "F2", "F3", "B0", "B1", "B2", "B3"]
    assert names(one_f_one_b(1, 4, 4)) == ["F0", "F1", "F2", "B0", "F3", "B1", "B2", "B3"]
    assert names(one_f_one_b(2, 4, 4)) == ["F0", "F1", "B0", "F2", "B1", "F3", "B2", "B3"]
    assert names(one_f_one_b(3, 4, 4)) == ["F0", "B0", "F1", "B1", "F2", "B2", "F3", "B3"]
    # Fewer micro-batches than stages: warm-up capped at M.
    assert names(one_f_one_b(0, 4, 2)) == ["F0", "F1", "B0", "B1"]


@given(k=st.integers(1, 6), m=st.integers(1, 9), name=st.sampled_from(["gpipe", "1f1b"]))
def test_every_schedule_runs_to_completion_with_the_theoretical_bubble(k: int, m: int, name: str) -> None:
    scheds = pipeline_schedules(name, k, m)
    tl = simulate(scheds)  # raises on a deadlock or a missing op
    # Equal forward and backward costs: makespan (M+K-1)*(f+b), idle fraction (K-1)/(M+K-1).
    assert tl.makespan == pytest.approx(2 * (m + k - 1))
    assert tl.idle_fraction == pytest.approx(bubble_fraction(k, m))
    # Backward twice the forward: the same bubble.
    tl2 = simulate(scheds, forward_time=1.0, backward_time=2.0)
    assert tl2.idle_fraction == pytest.approx(bubble_fraction(k, m))


@given(k=st.integers(1, 6), m=st.integers(1, 9))
def test_1f1b_holds_at_most_k_minus_stage_micro_batches_gpipe_holds_all(k: int, m: int) -> None:
    one = simulate(pipeline_schedules("1f1b", k, m))
    gp = simulate(pipeline_schedules("gpipe", k, m))
    for s in range(k):
        assert one.peak_in_flight[s] == min(k - s, m)
        assert gp.peak_in_flight[s] == m


def test_bubble_fraction_values() -> None:
    assert bubble_fraction(1, 4) == 0.0
    assert bubble_fraction(2, 1) == pytest.approx(0.5)
    assert bubble_fraction(2, 8) == pytest.approx(1 / 9)
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7)


def test_simulate_detects_a_deadlock_and_incomplete_schedules() -> None:
    # Stage 1 wants B1 before B0, stage 0 waits for B0 before anything else: still runnable.
    ok = [[Op(F, 0), Op(F, 1), Op(B, 0), Op(B, 1)], [Op(F, 0), Op(F, 1), Op(B, 1), Op(B, 0)]]
    simulate(ok)
    # Stage 0 runs B0 before F1, but stage 1 needs F1 before it can produce B0: deadlock.
    dead = [[Op(F, 0), Op(B, 0), Op(F, 1), Op(B, 1)], [Op(F, 0), Op(F, 1), Op(B, 0), Op(B, 1)]]
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(dead)
    with pytest.raises(ScheduleError, match="exactly once"):
        simulate([[Op(F, 0), Op(B, 0)], [Op(F, 0)]])
    with pytest.raises(ScheduleError, match="before F0"):
        simulate([[Op(B, 0), Op(F, 0)]])


def test_bad_arguments_are_typed_errors() -> None:
    with pytest.raises(ScheduleError, match="unknown schedule"):
        stage_schedule("zigzag", 0, 2, 2)
    with pytest.raises(ScheduleError, match="stage must be"):
        gpipe(2, 2, 2)
    with pytest.raises(ScheduleError, match="num_micro"):
        one_f_one_b(0, 2, 0)
    with pytest.raises(ScheduleError, match="must be an int"):
        gpipe(0, 2.0, 2)  # type: ignore[arg-type]
