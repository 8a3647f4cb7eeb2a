"""The methods' part of the config schema (see ``sparse_bench.schema``): one dataclass per method,
with every option's type and range; the YAML files in ``conf/method/`` give the values.

Milestones (``end``, GMP's window, AC/DC's phases, ...) are ``{unit: fraction|epoch|step, value}``
and period or temperature schedules ``{unit, points: [[at, value], ...]}``
(``sparsity.schedules``); their position inside the run is checked when the run's length is
known. A user's method registered with ``@register`` may carry its own schema as the class
attribute ``schema``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING

from ... import schema as S
from ...errors import ConfigError
from ..distributions import DISTRIBUTIONS as INITS
from ..saliency import SCOPES
from ..reinit import REINITS
from ..schedules import DECAYS, MILESTONE_UNITS



@dataclass
class Milestone:
    unit: str = S.choice(MISSING, MILESTONE_UNITS, hint="fraction of the run, epoch of the base schedule, or step")
    value: float = S.num(MISSING, ge=0.0, hint="a number >= 0, e.g. {unit:fraction,value:0.5}")


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


def _check_non_increasing(value, key: str) -> None:
    if value is not None and any(b > a for a, b in zip(value, value[1:])):
        raise ConfigError(f"{key}={list(value)} must not increase: each level is at most as dense as the one before")


def interval(default, hint: str = ""):
    meta = {"check": _check_interval, "hint": hint}
    if isinstance(default, dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


#: DSR's reallocation periods: the reference's WRN schedule (TimDettmers/sparse_learning,
#: learning_schedules/wrnet_schedule.yaml: 100/200/400/800 iterations from epochs 0/25/80/140 of 200)
#: as fractions of the run
DSR_PERIODS = {"unit": "fraction", "points": [[0, 100], [0.125, 200], [0.4, 400], [0.7, 800]]}


def init(default="uniform"):
    return S.choice(default, INITS, hint="initial layer densities")


def reinit():
    return S.choice("none", REINITS, hint="fan_in re-initialises weights by their (sparse) fan-in, default by "
                                          "torch's default layer initialisation")


def scope(default="global"):
    return S.choice(default, SCOPES)


def fraction(default, *, open_low=False, closed_high=False, hint=""):
    kw = {"gt" if open_low else "ge": 0.0, "le" if closed_high else "lt": 1.0}
    return S.num(default, hint=hint, **kw)


def milestone(default_fraction: Optional[float] = None):
    """An Optional[Milestone] field; the default is a fraction of the run (or null)."""
    if default_fraction is None:
        return field(default=None)
    return field(default_factory=lambda: Milestone(unit="fraction", value=default_fraction))


@dataclass
class Dense:
    name: str = "dense"


@dataclass
class Static:
    name: str = "static"
    init: str = init()
    reinit: str = reinit()


@dataclass
class SparseMomentum:
    name: str = "sparse_momentum"
    init: str = init()
    reinit: str = reinit()
    prune_rate: float = fraction(0.5, open_low=True, hint="p0, e.g. method.prune_rate=0.5")
    prune_rate_min: float = fraction(0.005)
    decay: str = S.choice("cosine", DECAYS)
    update_every: Any = interval("epoch")
    end: Optional[Milestone] = milestone()
    prune: str = S.choice("magnitude", ("magnitude", "set", "negativity", "global_magnitude"))
    growth: str = S.choice("momentum", ("momentum", "random", "momentum_neuron", "global_momentum"))
    redistribution: str = S.choice("momentum", ("momentum", "magnitude", "nonzero", "none"))
    dense_guard: float = fraction(0.8, open_low=True, closed_high=True)
    regrow_cap: float = fraction(0.99, open_low=True, closed_high=True)
    nonzero_threshold: float = S.num(0.0, ge=0.0)


@dataclass
class SET:
    name: str = "set"
    init: str = init("er")
    reinit: str = reinit()
    prune_rate: float = fraction(0.3, open_low=True, hint="zeta, e.g. method.prune_rate=0.3")
    prune_rate_min: float = fraction(0.0)
    decay: str = S.choice("constant", DECAYS)
    update_every: Any = interval("epoch")
    end: Optional[Milestone] = milestone()
    prune: str = S.choice("magnitude", ("magnitude", "set"))
    scope: str = scope("layer")
    exclude_pruned: bool = False


@dataclass
class DeepR:
    name: str = "deepr"
    init: str = init()
    reinit: str = reinit()
    l1: float = S.num(1e-4, ge=0.0)
    l1_mode: str = S.choice("shrink", ("shrink", "loss"))
    temperature: Any = field(default=1e-12, metadata={"check": _check_temperature})
    noise_mode: str = S.choice("weight", ("weight", "gradient"))
    eta: float = S.num(0.01, ge=0.0)
    regrow_sign: str = S.choice("fixed", ("fixed", "random", "first_update"))
    exclude_pruned: bool = False
    end: Optional[Milestone] = milestone()


@dataclass
class DSR:
    name: str = "dsr"
    init: str = init()
    reinit: str = reinit()
    init_threshold: float = S.num(1e-3, gt=0.0, hint="the paper uses 0.001")
    np_target: float = fraction(0.1, open_low=True, hint="a fraction of the active weights")
    np_count: Optional[int] = S.count(None, ge=1, nullable=True, hint="a number of weights, or null for np_target x "
                                                                      "the active weights")
    delta: float = fraction(0.1, hint="the paper uses 0.1")
    update_every: Any = interval(DSR_PERIODS)
    end: Optional[Milestone] = milestone(0.95)
    exclude_pruned: bool = True


@dataclass
class RigL:
    name: str = "rigl"
    init: str = init("erk")
    reinit: str = reinit()
    drop_fraction: float = S.num(0.3, ge=0.0, le=1.0, hint="the paper uses 0.3")
    decay: str = S.choice("cosine", DECAYS)
    update_every: int = S.count(100, ge=1, hint="steps between updates; the paper uses 100")
    end: Optional[Milestone] = milestone(0.75)
    scope: str = scope("layer")
    exclude_pruned: bool = False
    stat_batches: Optional[int] = S.count(None, ge=1, nullable=True, hint="null (the step's own batch) or a number "
                                                                          "of batches (GSE: 1 on CIFAR-10, 8 on CIFAR-100)")
    grow_init: str = S.choice("zeros", ("zeros",))
    drop_noise: float = S.num(0.0, ge=0.0, hint="the reference uses 1e-5")


@dataclass
class TopKAST:
    name: str = "topkast"
    forward_density: Optional[float] = S.num(None, gt=0.0, le=1.0, nullable=True, hint="leave it null to use density")
    backward_density: Optional[float] = S.num(None, gt=0.0, le=1.0, nullable=True,
                                              hint="leave it null for min(1, 2 * density)")
    init: str = S.choice("uniform", ("uniform", "er", "erk"))
    update_every: int = S.count(100, ge=1)
    explore_end: Optional[Milestone] = milestone()
    exploration_l2: float = S.num(0.0, ge=0.0, hint="0 turns it off")
    norm_penalty: float = S.num(0.0, ge=0.0, hint="0 turns it off; GSE uses 1e-4")
    promote: str = S.choice("theta", ("theta", "zero"))
    reinit: str = reinit()


@dataclass
class GSE:
    name: str = "gse"
    init: str = init("er")
    reinit: str = S.choice("fan_in", REINITS)
    alpha: float = S.num(0.1, gt=0.0, le=0.5, hint="the paper uses 0.1 (at most 0.2 per update)")
    update_every: Any = interval(1000)
    end: Optional[Milestone] = milestone(0.6)
    gamma: float = S.num(1.0, gt=0.0, hint="the paper uses 1 (CIFAR) or 2 (ImageNet)")
    sampling: str = S.choice("uniform", ("uniform", "grabo", "graest"))
    scope: str = scope()
    stat_batches: int = S.count(1, ge=1)
    chunk_size: int = S.count(1 << 20, ge=1)
    all_candidates_density: float = S.num(0.5, gt=0.0, le=1.0)


@dataclass
class GMP:
    name: str = "gmp"
    start: Milestone = field(default_factory=lambda: Milestone("fraction", 0.1))
    end: Milestone = field(default_factory=lambda: Milestone("fraction", 0.8))
    frequency: Milestone = field(default_factory=lambda: Milestone("fraction", 0.02))
    initial_sparsity: float = fraction(0.0)
    curve: str = S.choice("polynomial", ("polynomial", "cosine"))
    power: float = S.num(3.0, gt=0.0, hint="Zhu & Gupta use 3 (cubic)")
    scope: str = scope()
    reinit: str = reinit()


@dataclass
class ACDC:
    name: str = "acdc"
    warmup: Milestone = field(default_factory=lambda: Milestone("fraction", 0.1))
    phase_length: Milestone = field(default_factory=lambda: Milestone("fraction", 0.05))
    final_dense: Milestone = field(default_factory=lambda: Milestone("fraction", 0.1))
    final_sparse: Milestone = field(default_factory=lambda: Milestone("fraction", 0.15))
    scope: str = scope()
    momentum_reset: str = S.choice("all", ("all", "restored", "none"))


@dataclass
class SNIP:
    name: str = "snip"
    batches: int = S.count(1, ge=1, hint="the paper scores one mini-batch")
    scope: str = scope()
    train_mode: bool = True
    reinit: str = reinit()


@dataclass
class GraSP(SNIP):
    name: str = "grasp"
    temperature: float = S.num(200.0, gt=0.0, hint="the official code uses 200")


@dataclass
class SynFlow:
    name: str = "synflow"
    iterations: int = S.count(100, ge=1, hint="the paper uses 100")
    schedule: str = S.choice("exponential", ("exponential", "linear"))
    scope: str = scope()
    precision: str = S.choice("float32", ("float32", "float64"))
    linearise: bool = False
    reinit: str = reinit()


@dataclass
class Lottery:
    name: str = "lottery"
    densities: Optional[List[float]] = S.numbers(None, items_gt=0.0, items_le=1.0, check=_check_non_increasing,
                                                 hint="non-increasing densities in (0, 1], e.g. [0.5, 0.25, 0.1]")
    n_rounds: Optional[int] = S.count(None, ge=1, nullable=True, hint="a number of prune steps, or null")
    keep_per_round: float = fraction(0.8, open_low=True, hint="the papers keep 0.8 (prune 20%)")
    scope: str = scope()
    rewind_epoch: float = S.num(0.0, ge=0.0, hint="0 rewinds to the initialisation")
    reinit: str = reinit()


S.METHODS.update({
    "dense": Dense, "static": Static, "sparse_momentum": SparseMomentum, "set": SET, "deepr": DeepR, "dsr": DSR,
    "rigl": RigL, "topkast": TopKAST, "gse": GSE, "gmp": GMP, "acdc": ACDC, "snip": SNIP, "grasp": GraSP,
    "synflow": SynFlow, "lottery": Lottery,
})
