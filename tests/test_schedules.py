"""LR schedules, the schedule multiplier, shared decays and update cadences."""

import math

import pytest
from omegaconf import OmegaConf

from sparse_bench.errors import ConfigError
from sparse_bench.sparsity.schedules import UpdateCadence, decay
from sparse_bench.train.optim import LRSchedule


def sched(kind, **kw):
    lr = {"kind": kind, **{k: v for k, v in kw.items() if k != "warmup_epochs"}}
    # over the built-in constant schedule's YAML (which fills in the keys left out here)
    return OmegaConf.create({"name": "constant", "epochs": 10, "warmup_epochs": kw.get("warmup_epochs", 0), "lr": lr})


def test_step_every_n_iterations():
    s = LRSchedule(sched("step", step_size=25_000, gamma=0.1), 0.1, 540, 100)
    assert s(0) == 0.1 and s(24_999) == 0.1
    assert s(25_000) == pytest.approx(0.01) and s(50_000) == pytest.approx(0.001)


def test_multistep_by_epochs_and_warmup():
    s = LRSchedule(sched("multistep", milestones=[80, 120], gamma=0.1, warmup_epochs=5), 0.1, 10, 200)
    assert s(0) == pytest.approx(0.1 / 50) and s(49) == pytest.approx(0.1)
    assert s(799) == pytest.approx(0.1) and s(800) == pytest.approx(0.01) and s(1200) == pytest.approx(0.001)


def test_cosine_after_warmup():
    s = LRSchedule(sched("cosine", min_lr=0.0, warmup_epochs=1), 1.0, 10, 11)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.5)
    assert s(109) == pytest.approx((1 + math.cos(math.pi * 99 / 100)) / 2)


def test_multiplier_two_doubles_every_milestone():
    one = LRSchedule(sched("multistep", milestones=[80, 120]), 0.1, 10, 200)
    two = LRSchedule(sched("multistep", milestones=[80, 120]), 0.1, 10, 400, multiplier=2)
    assert two.milestones == [2 * m for m in one.milestones]
    st1 = LRSchedule(sched("step", step_size=25_000), 0.1, 540, 100)
    st2 = LRSchedule(sched("step", step_size=25_000), 0.1, 540, 200, multiplier=2)
    assert st2.step_size == 2 * st1.step_size
    cos2 = LRSchedule(sched("cosine"), 1.0, 10, 20, multiplier=2)
    assert cos2(100) == pytest.approx(0.5)


def test_bad_lr_kind():
    with pytest.raises(ConfigError, match="schedule.lr.kind"):
        LRSchedule(sched("zigzag"), 0.1, 10, 10)


def test_decays():
    assert decay("cosine", 0.5, 0.0, 0, 100) == 0.5
    assert decay("cosine", 0.5, 0.0, 50, 100) == pytest.approx(0.25)
    assert decay("cosine", 0.5, 0.0, 150, 100) == 0.0
    assert decay("linear", 0.4, 0.0, 25, 100) == pytest.approx(0.3)
    assert decay("constant", 0.3, 0.0, 99, 100) == 0.3


def test_update_cadence():
    c = UpdateCadence(100, total_steps=1000, end=750)
    assert [s for s in range(1, 1001) if c.at_step(s)] == [100, 200, 300, 400, 500, 600, 700]
    e = UpdateCadence("epoch", total_steps=40)
    assert [ep for ep in range(1, 5) if e.at_epoch_end(ep, 4, ep * 10)] == [1, 2, 3]


def test_milestones_convert_fractions_epochs_and_steps():
    from sparse_bench.errors import ConfigError
    from sparse_bench.sparsity.schedules import Timeline

    tl = Timeline(epochs=200, steps_per_epoch=10)
    assert tl.step({"unit": "fraction", "value": 0.6}, "k") == 1200
    assert tl.step({"unit": "epoch", "value": 120}, "k") == 1200
    assert tl.step({"unit": "step", "value": 7}, "k") == 7
    assert tl.step(None, "k", allow_none=True) is None
    # an epoch milestone is in epochs of the base schedule: it scales with schedule.multiplier
    assert Timeline(300, 10, multiplier=1.5).step({"unit": "epoch", "value": 120}, "k") == 1800
    assert Timeline(300, 10, multiplier=1.5).step({"unit": "fraction", "value": 0.6}, "k") == 1800
    assert tl.length({"unit": "epoch", "value": 5}, "k", minimum=1) == 50
    # a bare number is refused: 0.6 could be a fraction or an epoch
    for bad in (0.6, 120, {"fraction": 0.6}, {"unit": "epochs", "value": 3}, {"unit": "fraction", "value": 1.5},
                {"unit": "step", "value": -1}):
        with pytest.raises(ConfigError, match="k"):
            tl.step(bad, "k")
    # a schedule too short for the pattern: one line naming the key and the fix
    with pytest.raises(ConfigError) as err:
        Timeline(4, 10).step({"unit": "epoch", "value": 120}, "method.end")
    msg = str(err.value)
    assert "\n" not in msg and "method.end" in msg and "fraction" in msg and "schedule.epochs" in msg
    # a positive fraction of a short run is at least the minimum; an explicit length below it is refused
    assert Timeline(1, 2).length({"unit": "fraction", "value": 0.05}, "method.phase_length", minimum=1) == 1
    with pytest.raises(ConfigError, match="method.phase_length"):
        Timeline(1, 2).length({"unit": "step", "value": 0}, "method.phase_length", minimum=1)


def test_period_schedule_cadence_like_the_dsr_code():
    from sparse_bench.errors import ConfigError
    from sparse_bench.sparsity.schedules import Timeline

    tl = Timeline(epochs=20, steps_per_epoch=10)
    periods = tl.piecewise({"unit": "epoch", "points": [[0, 10], [5, 20], [10, 40]]}, "k", cast=int)
    assert periods.steps == [0, 50, 100] and periods.value_at(49) == 10 and periods.value_at(50) == 20
    c = UpdateCadence(periods, total_steps=200, end=tl.step({"unit": "epoch", "value": 18}, "k"))
    # an update after step t when t is a multiple of the period in force for that step
    assert c.steps() == [10, 20, 30, 40, 50, 60, 80, 100, 120, 160]
    for bad in ({"unit": "epoch", "points": [[1, 10]]}, {"unit": "epoch", "points": [[0, 10], [0, 20]]},
                {"unit": "epoch", "points": 3}, [[0, 10]]):
        with pytest.raises(ConfigError, match="k"):
            tl.piecewise(bad, "k")
