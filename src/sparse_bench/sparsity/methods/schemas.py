"""Pieces the methods' option schemas share (see ``sparse_bench.schema``): milestones, update
intervals, temperature schedules and the common ``init``, ``reinit``, ``scope`` and fraction fields.

Each method's schema, a dataclass with every option's type and range, sits beside the method in its
own module and is registered with it (``@register("rigl", schema=RigLSchema)``); the YAML files in
``conf/method/`` give the values. Milestones (``end``, GMP's window, AC/DC's phases, ...) are
``{unit: fraction|epoch|step, value}`` and period or temperature schedules ``{unit, points: [[at,
value], ...]}`` (``sparsity.schedules``); their position inside the run is checked when the run's
length is known. A user's method registered with ``@register`` may carry its own schema as the
class attribute ``schema``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from omegaconf import MISSING

from ... import schema as S
from ...errors import ConfigError
from ..distributions import DISTRIBUTIONS as INITS
from ..reinit import REINITS
from ..saliency import SCOPES
from ..schedules import MILESTONE_UNITS


@dataclass
class Milestone:
    unit: str = S.choice(MILESTONE_UNITS, hint="fraction of the run, epoch of the base schedule, or step")
    value: float = S.num(ge=0.0, hint="a number >= 0, e.g. {unit:fraction,value:0.5}")


def _check_interval(value, key: str) -> None:
    """`update_every`: 'epoch', a positive number of steps, or {unit, points: [[at, steps], ...]}."""
    if value == "epoch" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return
    if isinstance(value, dict) and set(value) == {"unit", "points"}:
        return _check_points(value, key, positive_int=True)
    raise ConfigError(f"{key}={value} must be 'epoch', a positive number of steps, or a period schedule "
                      f"{{unit: fraction|epoch|step, points: [[at, steps], ...]}}")


def _check_temperature(value, key: str) -> None:
    """DeepR's temperature: a finite number >= 0, or {unit, points: [[at, T], ...]}."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return
    if isinstance(value, dict) and set(value) == {"unit", "points"}:
        return _check_points(value, key, positive_int=False)
    raise ConfigError(f"{key}={value} must be a finite number >= 0 or a schedule {{unit: fraction|epoch|step, "
                      f"points: [[at, T], ...]}}")


def _check_points(value: dict, key: str, positive_int: bool) -> None:
    if value["unit"] not in MILESTONE_UNITS:
        raise ConfigError(f"{key}.unit={value['unit']} is not one of: {', '.join(MILESTONE_UNITS)}")
    points = value["points"]
    if not isinstance(points, list) or not points or any(not isinstance(p, list) or len(p) != 2 for p in points):
        raise ConfigError(f"{key}.points={points} must be a non-empty list of [at, value] pairs")
    for at, v in points:
        if isinstance(at, bool) or not isinstance(at, (int, float)) or at < 0:
            raise ConfigError(f"{key}.points: change point {at} must be a number >= 0")
        bad = (not isinstance(v, int) or isinstance(v, bool) or v <= 0) if positive_int else (
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0)
        if bad:
            want = "a positive number of steps" if positive_int else "a finite number >= 0"
            raise ConfigError(f"{key}.points: {v} must be {want}")


def interval(hint: str = ""):
    """`update_every`: 'epoch', a number of steps, or a period schedule (checked by its form)."""
    return field(default=MISSING, metadata={"check": _check_interval, "hint": hint})


def temperature():
    """DeepR's temperature: a number >= 0 or a temperature schedule (checked by its form)."""
    return field(default=MISSING, metadata={"check": _check_temperature})


def init():
    return S.choice(INITS, hint="initial layer densities")


def reinit():
    return S.choice(REINITS, hint="fan_in re-initialises weights by their (sparse) fan-in, default by torch's "
                                  "default layer initialisation")


def scope():
    return S.choice(SCOPES)


def fraction(*, open_low=False, closed_high=False, hint=""):
    kw = {"gt" if open_low else "ge": 0.0, "le" if closed_high else "lt": 1.0}
    return S.num(hint=hint, **kw)


def milestone():
    """An Optional[Milestone] field: ``{unit, value}`` or null."""
    return field(default=MISSING)
