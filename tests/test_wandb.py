"""W&B: what a run sends, and that the run is always finished, even when training crashes."""

import sys
import types

import pytest

from sparse_bench.run import run
from sparse_bench.train import trainer as trainer_mod
from sparse_bench.train.logging import wandb_mode

from conftest import compose

TINY = ["dataset=digits", "model=mlp", "schedule=constant", "schedule.epochs=2", "density=0.3",
        "logger=wandb", "progress=false", "device=cpu"]


class FakeRun:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.project = kwargs["project"]
        self.tags = kwargs["tags"]
        self.logged = []
        self.summary = {}
        self.finished = None

    def define_metric(self, *a, **k):
        pass

    def log(self, rec):
        self.logged.append(rec)

    def finish(self, exit_code=0):
        self.finished = exit_code


@pytest.fixture
def fake_wandb(monkeypatch):
    runs = []
    mod = types.ModuleType("wandb")
    mod.init = lambda **kw: runs.append(FakeRun(**kw)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return runs


def test_a_run_logs_every_epoch_with_the_same_names_and_finishes(fake_wandb, tmp_path):
    final = run(compose([*TINY, f"paths.runs={tmp_path}"]))
    (r,) = fake_wandb
    assert r.finished == 0
    assert r.kwargs["mode"] == "offline" and r.kwargs["dir"].startswith(str(tmp_path))
    assert {"method:sparse_momentum", "density:0.3", "model:mlp", "dataset:digits"} <= set(r.tags)
    assert [x["epoch"] for x in r.logged if "train/loss" in x] == [1, 2]
    assert r.logged[-1]["test/acc"] == final["test/acc"]
    assert r.summary["test/acc"] == final["test/acc"]


def test_the_run_is_finished_when_training_crashes(fake_wandb, tmp_path, monkeypatch):
    def boom(self):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(trainer_mod.Trainer, "save", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run(compose([*TINY, f"paths.runs={tmp_path}"]))
    (r,) = fake_wandb
    assert r.finished == 1


def test_resumed_runs_keep_their_wandb_id(fake_wandb, tmp_path, monkeypatch):
    cfg = compose([*TINY, f"paths.runs={tmp_path}"])
    real_save = trainer_mod.Trainer.save

    def crash_after_first(self):
        real_save(self)
        raise RuntimeError("killed")

    monkeypatch.setattr(trainer_mod.Trainer, "save", crash_after_first)
    with pytest.raises(RuntimeError):
        run(cfg)
    monkeypatch.setattr(trainer_mod.Trainer, "save", real_save)
    run(cfg)
    first, second = fake_wandb
    assert first.kwargs["id"] == second.kwargs["id"] and second.kwargs["resume"] == "allow"
    assert [x["epoch"] for x in second.logged if "train/loss" in x] == [2]


def test_mode_follows_config_then_environment_then_credentials(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode(None) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(None) == "disabled"
    assert wandb_mode("offline") == "offline"
