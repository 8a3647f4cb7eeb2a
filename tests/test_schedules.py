"""LR schedules, the schedule multiplier, shared decays and update cadences."""

import math

import pytest
from omegaconf import OmegaConf

from sparse_bench.errors import ConfigError
from sparse_bench.sparsity.schedules import UpdateCadence, decay
from sparse_bench.train.optim import LRSchedule


def sched(kind, **kw):
    lr = {"kind": kind, **{k: v for k, v in kw.items() if k != "warmup_epochs"}}
    return OmegaConf.create({"epochs": 10, "warmup_epochs": kw.get("warmup_epochs", 0), "lr": lr})


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


def test_lengthening_steps_double_the_period_and_stop():
    from sparse_bench.sparsity.schedules import StepList, lengthening_steps

    # DSR on 200 epochs x 10 steps: period 100, x2 at epochs 40/80/120, none from 160 on
    steps = lengthening_steps(100, 2000, doublings=[400, 800, 1200], end=1600)
    assert steps == [100, 200, 300, 400, 600, 800, 1200]
    c = StepList(steps)
    assert c.at_step(600) and not c.at_step(500) and not c.at_epoch_end(1, 2, 10)
    assert lengthening_steps(3, 10) == [3, 6, 9]
