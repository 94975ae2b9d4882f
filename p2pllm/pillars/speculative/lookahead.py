"""Whether to draft ahead while a window is verified, chosen from the session's own timings.

The look-ahead (drafter.py) pays when the drafter and the verifier compute at once, on cores of
their own; when they share cores, both forward passes slow down and it can lose. Which case
holds is not visible from addresses (two daemons on one machine may be pinned to separate
cores, one daemon may hold both roles), so with ``overlap: "auto"`` the drafter measures it:

:class:`LookaheadProbe`, a pure schedule fed the wall time of each round (window sent to the
next window sent, which is where the look-ahead's gain or cost shows) and the tokens it
produced (accepted + 1):

1. ``warmup`` rounds with the look-ahead on, not counted (the first passes after prefill);
2. a probe: ``2 * probe_rounds`` rounds alternating on, off, on, off, ... (alternating, so a
   window that grows during the probe or a load that drifts falls on both modes alike);
3. the decision: the mode with the lower seconds per produced token (total time / total
   tokens of its probe rounds); on a tie, off (it wastes no draft work);
4. ``reprobe_every`` rounds in the chosen mode, then probe again (the load changes), and so on.

Deterministic given the timings; the drafter only calls :attr:`on` before a round and
:meth:`record` after it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LookaheadProbe", "ProbeResult"]


@dataclass(frozen=True)
class ProbeResult:
    """One finished probe: the seconds per produced token of each mode, and the choice."""

    on_s_per_token: float
    off_s_per_token: float

    @property
    def on(self) -> bool:
        return self.on_s_per_token < self.off_s_per_token


class LookaheadProbe:
    """The look-ahead schedule of one session: warm up, probe both modes, keep the faster."""

    def __init__(self, *, warmup: int = 1, probe_rounds: int = 4, reprobe_every: int = 64) -> None:
        if warmup < 0 or probe_rounds < 1 or reprobe_every < 1:
            raise ValueError(f"LookaheadProbe: need warmup >= 0, probe_rounds >= 1, reprobe_every "
                             f">= 1; got {warmup}, {probe_rounds}, {reprobe_every}")
        self.warmup = warmup
        self.probe_rounds = probe_rounds
        self.reprobe_every = reprobe_every
        self.rounds = 0  # rounds recorded
        self.decisions = 0  # probes finished
        self.last: ProbeResult | None = None  # the latest finished probe
        self._phase_start = warmup  # the round the current probe (or exploitation) began
        self._probing = True
        self._sums = {True: [0.0, 0], False: [0.0, 0]}  # mode -> [seconds, tokens] this probe

    @property
    def on(self) -> bool:
        """The mode for the next round."""
        if self.rounds < self.warmup:
            return True
        if self._probing:
            return (self.rounds - self._phase_start) % 2 == 0
        assert self.last is not None
        return self.last.on

    @property
    def probing(self) -> bool:
        """Whether the next round belongs to a probe (or to the warm-up before the first)."""
        return self.rounds < self.warmup or self._probing

    def record(self, seconds: float, tokens: int) -> None:
        """One round done, run in mode :attr:`on`: its wall time and the tokens it produced."""
        if seconds < 0 or tokens < 0:
            raise ValueError(f"LookaheadProbe: a round of {seconds} s and {tokens} tokens")
        mode, counted = self.on, self.rounds >= self.warmup and self._probing
        self.rounds += 1
        if counted:
            acc = self._sums[mode]
            acc[0] += seconds
            acc[1] += tokens
            if self.rounds - self._phase_start == 2 * self.probe_rounds:
                self.last = self.partial()
                assert self.last is not None
                self.decisions += 1
                self._probing = False
                self._phase_start = self.rounds
                self._sums = {True: [0.0, 0], False: [0.0, 0]}
        elif self.rounds > self.warmup and self.rounds - self._phase_start == self.reprobe_every:
            self._probing = True
            self._phase_start = self.rounds

    def partial(self) -> ProbeResult | None:
        """The current probe's figures so far (None until both modes produced tokens)."""
        (on_s, on_n), (off_s, off_n) = self._sums[True], self._sums[False]
        if not on_n or not off_n:
            return None
        return ProbeResult(on_s / on_n, off_s / off_n)

    def best(self) -> ProbeResult | None:
        """What the session would report now: the latest finished probe, else the current
        probe's figures so far (a session that ends mid-probe), else None."""
        return self.last if self.last is not None else self.partial()
