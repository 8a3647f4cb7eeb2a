"""Schedules shared by the sparsity methods: milestones, rate decays and update cadences.

Every function here is a pure function of the step counter, so a resumed run needs no extra
state to continue a schedule exactly.

Milestones
----------
A point in training (an end step, the start of pruning) or a length (an AC/DC phase, the
interval between GMP events) is written with its unit, never as a bare number, so ``0.6`` can
never be mistaken for an epoch::

    {unit: fraction, value: 0.6}   # 60% of the run (of one training schedule)
    {unit: epoch, value: 120}      # epoch 120 of the base (1x) schedule, times schedule.multiplier
    {unit: step, value: 50000}     # after 50,000 optimizer steps (not scaled)

The method YAMLs default to fractions, so every method runs on any ``schedule.epochs``; the
experiment files keep the papers' absolute epochs. A milestone that falls outside the run is a
one-line ``ConfigError`` naming the key and the fix. On the command line:
``method.end={unit:epoch,value:120}`` (both keys are given, so Hydra's merge replaces both).

A piecewise-constant schedule (DSR's reallocation period, DeepR's temperature) names the unit
once for all of its change points, each ``[at, value]``, the first at 0::

    {unit: epoch, points: [[0, 100], [25, 200], [80, 400], [140, 800]]}

:class:`Timeline` turns both into optimizer steps for one run.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..errors import ConfigError

MILESTONE_UNITS = ("fraction", "epoch", "step")


def _cosine(start: float, end: float, frac: float) -> float:
    return end + (start - end) * (1.0 + math.cos(math.pi * frac)) / 2.0


def _linear(start: float, end: float, frac: float) -> float:
    return start + (end - start) * frac


def _constant(start: float, end: float, frac: float) -> float:
    return start


#: decay name -> value at the fraction `frac` (0..1) of the way from `start` to `end`; the methods'
#: schemas offer these names (``method.decay``)
DECAYS = {"cosine": _cosine, "linear": _linear, "constant": _constant}


def decay(kind: str, start: float, end: float, t: int, total: int) -> float:
    """Value at step `t` of a decay from `start` (t=0) to `end` (t>=total).

    cosine: end + (start - end) * (1 + cos(pi * t / total)) / 2 (the reference's
    CosineAnnealingLR over mini-batches); linear: straight line; constant: `start`.
    """
    if kind not in DECAYS:
        raise ValueError(f"unknown decay '{kind}'; choose one of {tuple(DECAYS)}")
    if total <= 0:
        return start
    return DECAYS[kind](start, end, min(max(t / total, 0.0), 1.0))


# --- milestones ------------------------------------------------------------------------------
def _plain(value):
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _example(key: str) -> str:
    return f"{key}={{unit:fraction,value:0.5}}"


def parse_milestone(value, key: str) -> tuple[str, float] | None:
    """``(unit, value)`` from ``{unit: ..., value: ...}``; None for null. Bad input: ConfigError."""
    value = _plain(value)
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"unit", "value"}:
        raise ConfigError(f"{key}={value!r} must name its unit: {{unit: fraction|epoch|step, value: N}}, "
                          f"e.g. {_example(key)}")
    unit, number = value["unit"], value["value"]
    if unit not in MILESTONE_UNITS:
        raise ConfigError(f"{key}.unit={unit!r} is unknown; choose one of: {', '.join(MILESTONE_UNITS)}")
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) or number < 0:
        raise ConfigError(f"{key}.value={number!r} must be a number >= 0, e.g. {_example(key)}")
    if unit == "fraction" and number > 1:
        raise ConfigError(f"{key}={{unit: fraction, value: {number}}} is more than the whole run; "
                          f"a fraction lies in [0, 1]")
    return str(unit), float(number)


class Timeline:
    """Converts milestones to optimizer steps for one training schedule of a run.

    ``epochs`` is the run's length after ``schedule.multiplier``; an ``epoch`` milestone is in
    epochs of the base (1x) schedule and is multiplied by ``multiplier``, as the LR milestones are.
    """

    def __init__(self, epochs: int, steps_per_epoch: int, multiplier: float = 1.0):
        self.epochs = int(epochs)
        self.steps_per_epoch = int(steps_per_epoch)
        self.multiplier = float(multiplier)
        self.total_steps = self.epochs * self.steps_per_epoch

    def _raw(self, unit: str, value: float) -> float:
        if unit == "fraction":
            return value * self.total_steps
        if unit == "epoch":
            return value * self.multiplier * self.steps_per_epoch
        return value

    def _describe(self) -> str:
        mult = f" (schedule.multiplier {self.multiplier:g})" if self.multiplier != 1 else ""
        return f"the {self.epochs}-epoch run{mult} of {self.total_steps} steps"

    def step(self, value, key: str, allow_none: bool = False) -> int | None:
        """A point in training as an optimizer-step count in [0, total_steps] (None for null when
        `allow_none`, e.g. an end point that defaults to the end of training)."""
        parsed = parse_milestone(value, key)
        if parsed is None:
            if allow_none:
                return None
            raise ConfigError(f"{key} is null; give a milestone, e.g. {_example(key)}")
        unit, number = parsed
        steps = int(round(self._raw(unit, number)))
        if steps > self.total_steps:
            raise ConfigError(
                f"{key}={{unit: {unit}, value: {number:g}}} is step {steps}, after the end of {self._describe()}; "
                f"give a fraction of the run, e.g. {_example(key)}, or lengthen schedule.epochs")
        return steps

    def length(self, value, key: str, minimum: int = 0) -> int:
        """A duration (a phase, an interval) in optimizer steps, at least `minimum`.

        A positive fraction of a short run rounds up to `minimum` steps (so the defaults fit any
        run); an explicit epoch or step length below `minimum` is an error.
        """
        parsed = parse_milestone(value, key)
        if parsed is None:
            raise ConfigError(f"{key} is null; give a length, e.g. {_example(key)}")
        unit, number = parsed
        steps = int(round(self._raw(unit, number)))
        if steps < minimum and unit == "fraction" and number > 0:
            steps = minimum
        if steps < minimum:
            raise ConfigError(
                f"{key}={{unit: {unit}, value: {number:g}}} is {steps} steps of {self._describe()}, "
                f"shorter than {minimum}; lengthen schedule.epochs or give it in steps, e.g. "
                f"{key}={{unit:step,value:{max(minimum, 1)}}}")
        return steps

    def piecewise(self, value, key: str, cast=float) -> Piecewise:
        """A piecewise-constant schedule ``{unit, points: [[at, value], ...]}`` with change points in steps."""
        value = _plain(value)
        example = f"{key}={{unit:fraction,points:[[0,100],[0.5,200]]}}"
        if not isinstance(value, dict) or set(value) != {"unit", "points"}:
            raise ConfigError(f"{key}={value!r} must be {{unit: fraction|epoch|step, points: [[at, value], ...]}}, "
                              f"e.g. {example}")
        unit, points = value["unit"], value["points"]
        if unit not in MILESTONE_UNITS:
            raise ConfigError(f"{key}.unit={unit!r} is unknown; choose one of: {', '.join(MILESTONE_UNITS)}")
        if not isinstance(points, list) or not points or any(not isinstance(p, list) or len(p) != 2 for p in points):
            raise ConfigError(f"{key}.points={points!r} must be a non-empty list of [at, value] pairs, e.g. {example}")
        steps, values = [], []
        for at, v in points:
            if isinstance(at, bool) or not isinstance(at, (int, float)) or at < 0 or (unit == "fraction" and at > 1):
                raise ConfigError(f"{key}.points: change point {at!r} is not a valid {unit}, e.g. {example}")
            s = int(round(self._raw(unit, float(at))))
            if s > self.total_steps:
                raise ConfigError(
                    f"{key}: the change point at {unit} {at:g} is step {s}, after the end of {self._describe()}; "
                    f"give the points as fractions of the run, e.g. {example}, or lengthen schedule.epochs")
            try:
                values.append(cast(v))
            except (TypeError, ValueError):
                raise ConfigError(f"{key}.points: {v!r} is not a valid value, e.g. {example}") from None
            steps.append(s)
        given = [float(at) for at, _ in points]
        if given[0] != 0 or any(b <= a for a, b in zip(given, given[1:])):
            raise ConfigError(f"{key}.points must start at 0 and increase ({unit}s: {[f'{g:g}' for g in given]}), "
                              f"e.g. {example}")
        # on a short run points can round to one step: the last of them is the one in force there
        merged = {}
        for s, v in zip(steps, values):
            merged[s] = v
        return Piecewise(list(merged), list(merged.values()))


class Piecewise:
    """``value_at(step)``: the value of the last change point at or before `step`."""

    def __init__(self, steps: Sequence[int], values: Sequence):
        self.steps = list(steps)
        self.values = list(values)

    def value_at(self, step: int):
        return self.values[max(bisect.bisect_right(self.steps, step) - 1, 0)]

    def __repr__(self) -> str:
        return f"Piecewise({list(zip(self.steps, self.values))})"


# --- update cadences -------------------------------------------------------------------------
class UpdateCadence:
    """When a method changes its mask: every `every` steps, at epoch ends, or on a period schedule.

    ``every`` is the string ``"epoch"`` (at the end of every epoch but the last), a positive
    number of optimizer steps, or a :class:`Piecewise` schedule of periods in steps (DSR's
    reallocation schedule: the update after step t happens when t is a multiple of the period in
    force for that step, as the reference tests the global iteration counter against the current
    period). Updates happen for steps in [start, end) only; `end` defaults to the end of training.
    """

    def __init__(self, every, total_steps: int, start: int = 0, end: int | None = None):
        self.per_epoch = str(every) == "epoch"
        self.schedule = every if isinstance(every, Piecewise) else None
        self.every = None if (self.per_epoch or self.schedule is not None) else int(every)
        if self.every is not None and self.every <= 0:
            raise ValueError("update interval must be positive")
        if self.schedule is not None and any(int(v) <= 0 for v in self.schedule.values):
            raise ValueError("update interval must be positive")
        self.start = int(start)
        self.end = int(total_steps if end is None else end)

    def period(self, step: int) -> int:
        """The interval in force for the step that brought the count to `step` (1-based)."""
        if self.schedule is not None:
            return int(self.schedule.value_at(step - 1))
        return int(self.every)

    def at_step(self, step: int) -> bool:
        """Whether to update after optimizer step number `step` (1-based count of steps done)."""
        if self.per_epoch or step < self.start or step >= self.end or step <= 0:
            return False
        return step % self.period(step) == 0

    def at_epoch_end(self, epoch: int, epochs: int, step: int) -> bool:
        """Whether to update after `epoch` (1-based) finished, `step` steps done."""
        return self.per_epoch and epoch < epochs and self.start <= step < max(self.end, self.start + 1)

    def first_update(self, steps_per_epoch: int, epochs: int) -> int | None:
        """The step count after which the first update comes (None: no update in the run), without
        walking the steps: per epoch, the first epoch end in range; per step, the first multiple of
        the period in force in [max(start, 1), end)."""
        if self.per_epoch:
            spe = max(int(steps_per_epoch), 1)
            e = max(1, -(-self.start // spe))
            return e * spe if e < epochs and e * spe < max(self.end, self.start + 1) else None
        if self.schedule is None:
            segments = [(0, None, self.every)]
        else:
            s = self.schedule.steps
            segments = [(a, s[i + 1] if i + 1 < len(s) else None, int(v))
                        for i, (a, v) in enumerate(zip(s, self.schedule.values))]
        for a, b, period in segments:  # `period` is in force for the steps t with t - 1 in [a, b)
            lo = max(self.start, 1, a + 1)
            hi = self.end if b is None else min(self.end, b + 1)
            first = -(-lo // period) * period
            if first < hi:
                return first
        return None

    def steps(self) -> list[int]:
        """Every update step of the run (step cadences only)."""
        return [s for s in range(max(self.start, 1), self.end) if self.at_step(s)]
