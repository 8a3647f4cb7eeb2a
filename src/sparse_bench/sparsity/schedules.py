"""Schedules shared by the sparsity methods: rate decays and update cadences.

Every function here is a pure function of the step counter, so a resumed run needs no extra
state to continue a schedule exactly.
"""

from __future__ import annotations

import math

DECAYS = ("cosine", "linear", "constant")


def decay(kind: str, start: float, end: float, t: int, total: int) -> float:
    """Value at step `t` of a decay from `start` (t=0) to `end` (t>=total).

    cosine: end + (start - end) * (1 + cos(pi * t / total)) / 2 (the reference's
    CosineAnnealingLR over mini-batches); linear: straight line; constant: `start`.
    """
    if kind == "constant" or total <= 0:
        return start
    frac = min(max(t / total, 0.0), 1.0)
    if kind == "cosine":
        return end + (start - end) * (1.0 + math.cos(math.pi * frac)) / 2.0
    if kind == "linear":
        return start + (end - start) * frac
    raise ValueError(f"unknown decay '{kind}'; choose one of {DECAYS}")


class UpdateCadence:
    """When a method changes its mask: every `every` steps, or at epoch ends.

    ``every`` is either the string ``"epoch"`` (at the end of every epoch but the last) or a
    positive number of optimizer steps. Updates happen for steps in [start, end) only; `end`
    defaults to the end of training.
    """

    def __init__(self, every, total_steps: int, start: int = 0, end: int | None = None):
        self.per_epoch = str(every) == "epoch"
        self.every = None if self.per_epoch else int(every)
        if self.every is not None and self.every <= 0:
            raise ValueError("update interval must be positive")
        self.start = int(start)
        self.end = int(total_steps if end is None else end)

    def at_step(self, step: int) -> bool:
        """Whether to update after optimizer step number `step` (1-based count of steps done)."""
        if self.per_epoch or step < self.start or step >= self.end:
            return False
        return step % self.every == 0

    def at_epoch_end(self, epoch: int, epochs: int, step: int) -> bool:
        """Whether to update after `epoch` (1-based) finished, `step` steps done."""
        return self.per_epoch and epoch < epochs and self.start <= step < max(self.end, self.start + 1)


def lengthening_steps(period: int, total_steps: int, doublings=(), end: int | None = None) -> list[int]:
    """Update steps every `period` steps, the period doubling once for each step in `doublings`
    already reached, and none from `end` on (DSR's reallocation schedule)."""
    if period <= 0:
        raise ValueError("update interval must be positive")
    end = total_steps if end is None else end
    marks = sorted(int(d) for d in doublings)
    steps, last = [], 0
    while True:
        nxt = last + period * 2 ** sum(m <= last for m in marks)
        if nxt >= end:
            return steps
        steps.append(nxt)
        last = nxt


class StepList:
    """A cadence given by an explicit list of update steps (no epoch-end updates)."""

    per_epoch = False

    def __init__(self, steps):
        self.steps = frozenset(int(s) for s in steps)

    def at_step(self, step: int) -> bool:
        return step in self.steps

    def at_epoch_end(self, epoch: int, epochs: int, step: int) -> bool:
        return False
