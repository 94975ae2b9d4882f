"""The look-ahead probe (pillars/speculative/lookahead.py): fed timings, it picks the faster
mode, on a fixed schedule."""

from __future__ import annotations

import pytest

from p2pllm.pillars.speculative.lookahead import LookaheadProbe, ProbeResult


def drive(probe: LookaheadProbe, rounds: int, on_s: float, off_s: float,
          tokens: int = 5) -> list[bool]:
    """Run ``rounds`` rounds taking ``on_s`` / ``off_s`` seconds per token; the modes used."""
    modes = []
    for _ in range(rounds):
        mode = probe.on
        modes.append(mode)
        probe.record((on_s if mode else off_s) * tokens, tokens)
    return modes


@pytest.mark.parametrize(("on_s", "off_s", "chosen"), [(0.02, 0.03, True), (0.03, 0.02, False),
                                                       (0.02, 0.02, False)])
def test_warmup_then_alternate_then_keep_the_faster(on_s: float, off_s: float, chosen: bool) -> None:
    probe = LookaheadProbe(warmup=1, probe_rounds=4, reprobe_every=64)
    assert probe.on and probe.probing and probe.best() is None
    modes = drive(probe, 9, on_s, off_s)
    assert modes == [True, True, False, True, False, True, False, True, False]
    assert probe.decisions == 1 and not probe.probing
    assert probe.last == ProbeResult(on_s, off_s) and probe.last.on is chosen  # a tie: off
    assert drive(probe, 64, on_s, off_s) == [chosen] * 64
    # every 64 rounds, probe again (no warm-up)
    assert probe.probing
    assert drive(probe, 8, on_s, off_s) == [True, False] * 4
    assert probe.decisions == 2 and drive(probe, 3, on_s, off_s) == [chosen] * 3


def test_the_warmup_rounds_do_not_count() -> None:
    probe = LookaheadProbe(warmup=2, probe_rounds=2)
    probe.record(100.0, 1)  # a slow first pass (warm-up), in mode on
    probe.record(100.0, 1)
    assert probe.best() is None
    drive(probe, 4, 0.01, 0.02)
    assert probe.last == ProbeResult(0.01, 0.02) and probe.on


def test_per_token_not_per_round() -> None:
    """A round of the look-ahead that produced more tokens is not held against it."""
    probe = LookaheadProbe(warmup=0, probe_rounds=2)
    for _ in range(2):
        probe.record(0.6, 6)  # on: 0.1 s/token
        probe.record(0.3, 2)  # off: 0.15 s/token, though each round is quicker
    assert probe.last is not None and probe.last.on
    assert probe.last.on_s_per_token == pytest.approx(0.1)
    assert probe.last.off_s_per_token == pytest.approx(0.15)


def test_totals_over_the_probe_rounds() -> None:
    probe = LookaheadProbe(warmup=0, probe_rounds=3)
    for on_round, off_round in ((1.0, 0.2), (0.1, 0.2), (0.1, 0.2)):  # one slow on round
        probe.record(on_round, 1)
        probe.record(off_round, 1)
    assert probe.last == ProbeResult(pytest.approx(0.4), pytest.approx(0.2))  # type: ignore[arg-type]
    assert not probe.on


def test_the_load_changes_and_the_reprobe_follows() -> None:
    probe = LookaheadProbe(warmup=1, probe_rounds=4, reprobe_every=16)
    drive(probe, 9, 0.02, 0.03)
    assert probe.on
    drive(probe, 16, 0.02, 0.03)
    drive(probe, 8, 0.05, 0.03)  # the look-ahead now loses (say, another job on the cores)
    assert probe.decisions == 2 and not probe.on
    assert probe.last == ProbeResult(pytest.approx(0.05), pytest.approx(0.03))  # type: ignore[arg-type]


def test_partial_figures_when_a_session_ends_mid_probe() -> None:
    probe = LookaheadProbe(warmup=1, probe_rounds=4)
    drive(probe, 2, 0.02, 0.03)  # warm-up + one on round
    assert probe.best() is None  # off not measured yet
    drive(probe, 1, 0.02, 0.03)
    best = probe.best()
    assert best is not None and best.on and probe.decisions == 0 and probe.probing
    # after a decision, a re-probe in progress reports the decision until it ends
    drive(probe, 6 + 64 + 2, 0.02, 0.03)
    assert probe.probing and probe.best() is probe.last


def test_deterministic_and_checked() -> None:
    a, b = LookaheadProbe(), LookaheadProbe()
    assert drive(a, 200, 0.02, 0.021) == drive(b, 200, 0.02, 0.021)
    for bad in ({"warmup": -1}, {"probe_rounds": 0}, {"reprobe_every": 0}):
        with pytest.raises(ValueError):
            LookaheadProbe(**bad)
    with pytest.raises(ValueError):
        a.record(-1.0, 1)
