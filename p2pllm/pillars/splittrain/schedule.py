"""Pipeline schedules for split training, as plain lists of operations per stage.

A step of K stages and M micro-batches is, for each stage, an ordered list of operations
``Op(FORWARD, m)`` / ``Op(BACKWARD, m)``. Dependencies are implied by the pipeline:

- ``F(k, m)`` needs ``F(k-1, m)`` (the activations of micro-batch m from the stage before);
- ``B(k, m)`` needs ``B(k+1, m)`` (the gradient of those activations from the stage after)
  and, on the last stage, its own ``F(K-1, m)`` (the loss).

Two schedules:

- **GPipe**: every forward, then every backward (micro-batches in order both times). Each stage
  keeps the activations of all M micro-batches until their backward.
- **1F1B** (PipeDream-flush): stage k runs ``min(K-k-1, M)`` warm-up forwards, then
  alternates one forward and one backward, then drains the remaining backwards. The same
  bubble as GPipe, but at most ``K-k`` micro-batches' activations are held at once.

With equal per-micro-batch times the idle fraction of both is the bubble
``(K-1) / (M+K-1)`` (:func:`bubble_fraction`); :func:`simulate` replays schedules against
their dependencies (it detects deadlocks) and measures makespan, idle time and peak in-flight
activations. Everything here is pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

__all__ = [
    "SCHEDULES",
    "Op",
    "Phase",
    "ScheduleError",
    "Timeline",
    "bubble_fraction",
    "gpipe",
    "measured_bubble",
    "one_f_one_b",
    "pipeline_schedules",
    "simulate",
    "stage_schedule",
]


class ScheduleError(ValueError):
    """Bad schedule arguments, or schedules that cannot run (a deadlock, a missing op)."""


class Phase(Enum):
    FORWARD = "F"
    BACKWARD = "B"


class Op(NamedTuple):
    phase: Phase
    mb: int  # micro-batch index

    def __str__(self) -> str:
        return f"{self.phase.value}{self.mb}"


def _check(stage: int, num_stages: int, num_micro: int) -> None:
    for name, v in (("stage", stage), ("num_stages", num_stages), ("num_micro", num_micro)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ScheduleError(f"{name} must be an int, got {v!r}")
    if num_stages < 1:
        raise ScheduleError(f"num_stages must be >= 1, got {num_stages}")
    if num_micro < 1:
        raise ScheduleError(f"num_micro must be >= 1, got {num_micro}")
    if not 0 <= stage < num_stages:
        raise ScheduleError(f"stage must be in [0, {num_stages}), got {stage}")


def gpipe(stage: int, num_stages: int, num_micro: int) -> list[Op]:
    """All forwards, then all backwards."""
    _check(stage, num_stages, num_micro)
    return [Op(Phase.FORWARD, m) for m in range(num_micro)] + [
        Op(Phase.BACKWARD, m) for m in range(num_micro)
    ]


def one_f_one_b(stage: int, num_stages: int, num_micro: int) -> list[Op]:
    """Warm-up forwards, then one forward / one backward, then the remaining backwards."""
    _check(stage, num_stages, num_micro)
    warmup = min(num_stages - stage - 1, num_micro)
    ops = [Op(Phase.FORWARD, m) for m in range(warmup)]
    fwd, bwd = warmup, 0
    while fwd < num_micro:  # steady state
        ops.append(Op(Phase.FORWARD, fwd))
        fwd += 1
        ops.append(Op(Phase.BACKWARD, bwd))
        bwd += 1
    ops.extend(Op(Phase.BACKWARD, m) for m in range(bwd, num_micro))  # cool-down
    return ops


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}


def stage_schedule(name: str, stage: int, num_stages: int, num_micro: int) -> list[Op]:
    """The operations of one stage under the schedule called ``name`` ("gpipe" or "1f1b")."""
    fn = SCHEDULES.get(name)
    if fn is None:
        raise ScheduleError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return fn(stage, num_stages, num_micro)


def pipeline_schedules(name: str, num_stages: int, num_micro: int) -> list[list[Op]]:
    """Every stage's operations, stage 0 first."""
    return [stage_schedule(name, k, num_stages, num_micro) for k in range(num_stages)]


def bubble_fraction(num_stages: int, num_micro: int) -> float:
    """The theoretical idle fraction of a GPipe or 1F1B step: (K-1) / (M+K-1)."""
    _check(0, num_stages, num_micro)
    return (num_stages - 1) / (num_micro + num_stages - 1)


def measured_bubble(busy_s: Sequence[float], window_s: Sequence[float]) -> list[float]:
    """The bubble one step actually had, per stage: ``1 - busy_k / T``.

    ``busy_k``: seconds stage k's worker computed during the step's micro-batches (forwards,
    backwards, the tied gradient, the norm); ``window_s[k]``: seconds from its TRAIN_BATCH to
    its answer; ``T`` the longest window, the step's pipeline time. Unlike
    :func:`bubble_fraction` (equal op times, free communication) it includes uneven stages,
    communication and whatever else kept a stage waiting.
    """
    if len(busy_s) != len(window_s) or not busy_s:
        raise ValueError("one busy time and one window per stage")
    t = max(window_s)
    if t <= 0:
        return [0.0] * len(busy_s)
    return [min(1.0, max(0.0, 1.0 - b / t)) for b in busy_s]


@dataclass(frozen=True)
class Timeline:
    """What :func:`simulate` found: times in the units of the given op costs."""

    makespan: float
    busy: tuple[float, ...]  # per stage
    idle: tuple[float, ...]  # per stage: makespan - busy
    peak_in_flight: tuple[int, ...]  # per stage: most micro-batches forwarded, not backwarded
    spans: tuple[tuple[tuple[Op, float, float], ...], ...]  # per stage: (op, start, end)

    @property
    def idle_fraction(self) -> float:
        """Idle time over all stages divided by the stages' total time."""
        if self.makespan == 0:
            return 0.0
        return sum(self.idle) / (self.makespan * len(self.idle))


def simulate(
    schedules: Sequence[Sequence[Op]],
    forward_time: float | Sequence[float] = 1.0,
    backward_time: float | Sequence[float] = 1.0,
    comm_time: float = 0.0,
) -> Timeline:
    """Run per-stage schedules as early as their dependencies allow (as the stages do).

    Costs may be one number or one per stage; ``comm_time`` is added to every hop between
    stages. Raises :class:`ScheduleError` if the schedules are incomplete or deadlock.
    """
    k = len(schedules)
    if k == 0:
        raise ScheduleError("no stages")
    f_cost = _per_stage(forward_time, k, "forward_time")
    b_cost = _per_stage(backward_time, k, "backward_time")
    num_micro = _check_complete(schedules)

    done: dict[tuple[int, Op], float] = {}  # (stage, op) -> end time
    pos = [0] * k
    clock = [0.0] * k
    in_flight = [0] * k
    peak = [0] * k
    spans: list[list[tuple[Op, float, float]]] = [[] for _ in range(k)]
    total = sum(len(s) for s in schedules)
    while len(done) < total:
        progressed = False
        for s in range(k):
            while pos[s] < len(schedules[s]):
                op = schedules[s][pos[s]]
                ready = _ready_at(s, op, k, done, comm_time)
                if ready is None:
                    break
                start = max(clock[s], ready)
                cost = f_cost[s] if op.phase is Phase.FORWARD else b_cost[s]
                end = start + cost
                done[(s, op)] = end
                clock[s] = end
                spans[s].append((op, start, end))
                in_flight[s] += 1 if op.phase is Phase.FORWARD else -1
                peak[s] = max(peak[s], in_flight[s])
                pos[s] += 1
                progressed = True
        if not progressed:
            stuck = ", ".join(
                f"stage {s} at {schedules[s][pos[s]]}" for s in range(k) if pos[s] < len(schedules[s])
            )
            raise ScheduleError(f"deadlock with {num_micro} micro-batches: {stuck}")
    makespan = max(clock)
    busy = tuple(sum(e - b for _, b, e in spans[s]) for s in range(k))
    return Timeline(
        makespan=makespan,
        busy=busy,
        idle=tuple(makespan - b for b in busy),
        peak_in_flight=tuple(peak),
        spans=tuple(tuple(sp) for sp in spans),
    )


def _per_stage(v: float | Sequence[float], k: int, name: str) -> list[float]:
    if isinstance(v, int | float):
        values = [float(v)] * k
    else:
        values = [float(x) for x in v]
    if len(values) != k or any(x < 0 for x in values):
        raise ScheduleError(f"{name} must be one cost >= 0 or {k} of them")
    return values


def _check_complete(schedules: Sequence[Sequence[Op]]) -> int:
    """Every stage must run F and B of the same micro-batches 0..M-1, each once, F before B."""
    first = schedules[0]
    num_micro = sum(1 for op in first if op.phase is Phase.FORWARD)
    want = {Op(p, m) for p in Phase for m in range(num_micro)}
    for s, ops in enumerate(schedules):
        if len(ops) != len(set(ops)) or set(ops) != want:
            raise ScheduleError(
                f"stage {s} must run F and B of micro-batches 0..{num_micro - 1} exactly once"
            )
        seen: set[int] = set()
        for op in ops:
            if op.phase is Phase.FORWARD:
                seen.add(op.mb)
            elif op.mb not in seen:
                raise ScheduleError(f"stage {s} runs {op} before F{op.mb}")
    return num_micro


def _ready_at(
    s: int, op: Op, k: int, done: dict[tuple[int, Op], float], comm: float
) -> float | None:
    """When ``op`` of stage ``s`` may start given the ops done so far, or None (not yet)."""
    if op.phase is Phase.FORWARD:
        if s == 0:
            return 0.0
        t = done.get((s - 1, op))
        return None if t is None else t + comm
    own = done.get((s, Op(Phase.FORWARD, op.mb)))
    if own is None:
        return None
    if s == k - 1:
        return own
    t = done.get((s + 1, op))
    return None if t is None else max(own, t + comm)
