"""A run that never lies: checkpoints that are verified, folders that stay put, failures that
are recorded, sweeps that survive a bad job."""

from __future__ import annotations

import errno
import io
import json
import os
import stat

import pytest
import torch

from sparse_bench.errors import ConfigError, RunFailed
from sparse_bench.run import run
from sparse_bench.train import checkpoint as ckpt
from sparse_bench.train import trainer as trainer_mod

from conftest import cli_here, compose, read_jsonl

TINY = ["dataset=digits", "model=mlp", "schedule=constant", "schedule.epochs=2", "density=0.3",
        "limit_train_batches=4", "eval.train_samples=100", "logger=none", "progress=false", "device=cpu"]


def _results(folder):
    return json.loads((folder / "results.json").read_text())


def _crash_after_epoch_1(monkeypatch):
    real_save = trainer_mod.Trainer.save

    def save_then_crash(self):
        real_save(self)
        if self.epoch == 1:
            raise KeyboardInterrupt  # like a kill: nothing is recorded

    monkeypatch.setattr(trainer_mod.Trainer, "save", save_then_crash)
    return real_save


@pytest.fixture
def half_run(tmp_path, monkeypatch):
    """A run folder holding a checkpoint after epoch 1 (the run was killed)."""
    cfg = compose([*TINY, f"paths.runs={tmp_path}"])
    real = _crash_after_epoch_1(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(trainer_mod.Trainer, "save", real)
    return cfg, tmp_path / cfg.run_name


# --- checkpoints ------------------------------------------------------------------------------
def test_checkpoint_round_trip_is_weights_only_and_verified(tmp_path):
    path = tmp_path / "c.pt"
    state = {"w": torch.arange(6.0), "n": 3, "nested": {"a": [1, 2.5, "x"]}}
    ckpt.save_checkpoint(path, state, "fp1")
    back = ckpt.load_checkpoint(path, config_fingerprint="fp1")
    assert torch.equal(back["w"], state["w"]) and back["nested"] == state["nested"]
    with pytest.raises(ckpt.CheckpointError, match="another config"):
        ckpt.load_checkpoint(path, config_fingerprint="fp2")


@pytest.mark.parametrize("damage,match", [
    ("empty", "is empty"),
    ("text", "not a sparse_bench checkpoint"),
    ("truncate", "truncated"),
    ("flip", "corrupt"),
    ("plain_torch_save", "not a sparse_bench checkpoint"),
])
def test_damaged_checkpoint_is_refused_in_one_line(tmp_path, damage, match):
    path = tmp_path / "c.pt"
    ckpt.save_checkpoint(path, {"w": torch.ones(1000)}, "fp")
    data = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "text":
        path.write_text("hello\n")
    elif damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:-100] + bytes(b ^ 0xFF for b in data[-100:]))
    else:
        torch.save({"w": torch.ones(3)}, path)
    with pytest.raises(ckpt.CheckpointError, match=match) as err:
        ckpt.load_checkpoint(path, config_fingerprint="fp")
    assert "\n" not in str(err.value) and str(path) in str(err.value)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_crafted_checkpoint_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    buf = io.BytesIO()
    torch.save({"x": _Evil()}, buf)
    payload = buf.getvalue()
    import hashlib

    header = {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload), "fingerprint": "fp"}
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(ckpt.MAGIC + json.dumps(header).encode() + b"\n" + payload)
    with pytest.raises(ckpt.CheckpointError, match="other than tensors and plain data"):
        ckpt.load_checkpoint(path, config_fingerprint="fp")
    assert not (tmp_path / "pwned").exists()


def test_overwritten_checkpoint_is_refused_before_training(half_run):
    cfg, folder = half_run
    data = bytearray((folder / "checkpoint.pt").read_bytes())
    data[-2000:-1000] = b"\x00" * 1000
    (folder / "checkpoint.pt").write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        run(cfg)
    assert not (folder / "results.json").exists()


def test_checkpoint_from_another_run_folder_is_refused(half_run, tmp_path):
    cfg, folder = half_run
    other = compose([*TINY, "seed=1", f"paths.runs={tmp_path}"])
    target = tmp_path / other.run_name
    target.mkdir()
    (target / "checkpoint.pt").write_bytes((folder / "checkpoint.pt").read_bytes())
    with pytest.raises(ckpt.CheckpointError, match="another config"):
        run(other)


def test_config_json_gone_and_another_density_is_refused(half_run, tmp_path):
    cfg, folder = half_run
    (folder / "config.json").unlink()
    changed = compose([*TINY, "density=0.2", f"paths.runs={tmp_path}", f"run_name={cfg.run_name}"])
    with pytest.raises(ckpt.CheckpointError, match="another config"):
        run(changed)


def test_killed_writers_leave_no_temporaries(half_run):
    cfg, folder = half_run
    (folder / ".checkpoint.pt.abc123").write_bytes(b"partial")
    (folder / ".results.json.x").write_bytes(b"{")
    run(cfg)
    assert not list(folder.glob(".checkpoint.pt.*")) and not list(folder.glob(".results.json.*"))
    assert _results(folder)["status"] == "complete"


def test_run_outputs_are_readable_by_the_group(tmp_path):
    cfg = compose([*TINY, "schedule.epochs=1", f"paths.runs={tmp_path}"])
    run(cfg)
    for name in ("results.json", "config.json", "checkpoint.pt", "config.yaml", "metrics.jsonl"):
        mode = stat.S_IMODE((tmp_path / cfg.run_name / name).stat().st_mode)
        assert mode & 0o044 == 0o044, (name, oct(mode))


# --- finished runs and run folders --------------------------------------------------------------
def test_finished_run_is_never_overwritten_by_another_config(tmp_path):
    cfg = compose([*TINY, "schedule.epochs=1", f"paths.runs={tmp_path}"])
    run(cfg)
    folder = tmp_path / cfg.run_name
    (folder / "checkpoint.pt").unlink()
    before = (folder / "results.json").read_text()
    other = compose([*TINY, "schedule.epochs=1", "optimizer.lr=0.01", f"paths.runs={tmp_path}",
                     f"run_name={cfg.run_name}"])
    with pytest.raises(ConfigError, match="finished run with another config"):
        run(other)
    assert (folder / "results.json").read_text() == before
    run(compose([*TINY, "schedule.epochs=1", "optimizer.lr=0.01", "resume=false", f"paths.runs={tmp_path}",
                 f"run_name={cfg.run_name}"]))
    assert _results(folder)["config"]["optimizer"]["lr"] == 0.01


@pytest.mark.parametrize("name", ["../elsewhere", "../../x", "..", "/abs/path", "a/../../b", "", "."])
def test_run_name_may_not_leave_paths_runs(tmp_path, name):
    with pytest.raises(ConfigError, match="run_name="):
        run(compose([*TINY, f"paths.runs={tmp_path / 'runs'}", f"run_name='{name}'"]))
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "x").exists()


def test_resume_false_removes_only_what_this_tool_wrote(tmp_path):
    cfg = compose([*TINY, "schedule.epochs=1", "logger=wandb", f"paths.runs={tmp_path}"])
    run(cfg)
    folder = tmp_path / cfg.run_name
    (folder / "notes.txt").write_text("mine")
    run(compose([*TINY, "schedule.epochs=1", "resume=false", f"paths.runs={tmp_path}"]))
    assert (folder / "notes.txt").read_text() == "mine"
    # a folder that is not one of ours: resume=false refuses, and its wandb/ and results.json survive
    foreign = tmp_path / "foreign"
    (foreign / "wandb").mkdir(parents=True)
    (foreign / "wandb" / "keep").write_text("x")
    (foreign / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match="that this tool did not write"):
        run(compose([*TINY, "schedule.epochs=1", "resume=false", f"paths.runs={tmp_path}", "run_name=foreign"]))
    assert (foreign / "wandb" / "keep").exists() and (foreign / "results.json").read_text() == "{}"


def test_unwritable_run_folder_is_one_line_naming_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file")
    with pytest.raises(ConfigError, match="is a file, not a folder") as err:
        run(compose([*TINY, f"paths.runs={blocker}"]))
    assert str(blocker) in str(err.value)


def test_full_disk_during_a_checkpoint_is_one_line_and_recorded(tmp_path, monkeypatch):
    cfg = compose([*TINY, f"paths.runs={tmp_path}"])
    real_fsync = os.fsync
    calls = {"n": 0}

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > 2:  # config.json and the first checkpoint go through
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    # a run that started and could not go on (exit status 1), not bad input (2)
    with pytest.raises(RunFailed, match="no space left") as err:
        run(cfg)
    assert "checkpoint.pt" in str(err.value) and not isinstance(err.value, ConfigError)
    folder = tmp_path / cfg.run_name
    assert not list(folder.glob(".checkpoint.pt.*"))


# --- a loss that stops being finite -------------------------------------------------------------
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = compose([*TINY, "schedule.epochs=3", f"paths.runs={tmp_path}"])
    real = torch.nn.CrossEntropyLoss.forward

    def poisoned(self, out, y):
        loss = real(self, out, y)
        poisoned.calls += 1
        return loss * float("nan") if poisoned.calls == 6 else loss  # step 6 = epoch 2, batch 2

    poisoned.calls = 0
    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", poisoned)
    with pytest.raises(RunFailed, match=r"non-finite .* at epoch 2, step 6"):
        run(cfg)
    folder = tmp_path / cfg.run_name
    res = _results(folder)
    assert res["status"] == "failed" and "non-finite" in res["error"] and res["epochs"] == 1
    assert ckpt.load_checkpoint(folder / "checkpoint.pt")["epoch"] == 1
    assert [r["epoch"] for r in read_jsonl(folder / "metrics.jsonl") if not r.get("update")] == [1]


def test_huge_learning_rate_fails_loudly_from_the_command_line(tmp_path):
    proc = cli_here([*TINY, "optimizer.lr=1e6", f"paths.runs={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "non-finite" in err[0] and "optimizer.lr" in err[0] and "Traceback" not in proc.stderr
    res = _results(tmp_path / "digits-mlp-sparse_momentum-d0.3-s0")
    assert res["status"] == "failed"
    log_text = (tmp_path / "digits-mlp-sparse_momentum-d0.3-s0" / "sparse_bench.log").read_text()
    assert "non-finite" in log_text


# --- the command line ---------------------------------------------------------------------------
def test_refused_run_leaves_no_folder(tmp_path):
    proc = cli_here(["dataset=digits", "model=lenet300_100", "logger=none", f"paths.runs={tmp_path / 'r' / 's'}"],
               cwd=tmp_path)
    assert proc.returncode == 2 and "does not fit" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_sweep_survives_a_bad_job(tmp_path):
    proc = cli_here(["-m", *TINY, "schedule.epochs=1", "density=0.1,1.5,0.2", f"paths.runs={tmp_path}",
                "sweep_name=s"], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    jobs = sorted((tmp_path / "multirun" / "s").glob("*/results.json"))
    status = {json.loads(p.read_text())["config"]["density"]: json.loads(p.read_text()) for p in jobs}
    assert set(status) == {0.1, 1.5, 0.2}
    assert status[0.1]["status"] == status[0.2]["status"] == "complete"
    assert status[1.5]["status"] == "failed" and "density=1.5" in status[1.5]["error"]
    assert "1 job(s) of the sweep failed" in proc.stderr and "density=1.5" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- densities and widths that leave nothing to train ------------------------------------------
def test_density_that_empties_a_layer_is_refused_with_the_smallest_usable_one(tmp_path):
    proc = cli_here(["density=1e-6", "dataset=digits", "model=mlp", "method=static", "logger=none",
                f"paths.runs={tmp_path / 'r'}"], cwd=tmp_path)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "density=1e-06 leaves net." in line and "use density >=" in line
    assert not (tmp_path / "r").exists()


def test_min_density_keeps_a_weight_in_every_layer():
    from sparse_bench.sparsity.distributions import layer_counts, min_density

    shapes = [(300, 784), (100, 300), (10, 100)]
    for kind in ("uniform", "er", "erk"):
        d = min_density(shapes, kind)
        assert min(layer_counts(shapes, d * 1.01, kind)) >= 1
        with pytest.raises(ConfigError, match="without a single active weight"):
            layer_counts(shapes, d * 0.5, kind)


def test_zero_width_layer_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"model.hidden=\[0\]: every value must be > 0"):
        run(compose([*TINY, "model.hidden=[0]", f"paths.runs={tmp_path}"]))
    from torch import nn

    from sparse_bench.sparsity.masks import MaskSet

    with pytest.raises(ConfigError, match="has no weights"):  # a model of the user's with an empty layer
        MaskSet([("fc.weight", nn.Parameter(torch.zeros(0, 3)))])


def test_lr_milestones_the_run_never_reaches_are_warned_about():
    from omegaconf import OmegaConf

    from sparse_bench.train.optim import LRSchedule

    multi = OmegaConf.create({"name": "constant", "epochs": 5, "warmup_epochs": 0,
                              "lr": {"kind": "multistep", "milestones": [2, 80, 120]}})
    assert "never happen" in LRSchedule(multi, 0.1, 10, 5).warnings()[0]
    assert LRSchedule(multi, 0.1, 10, 200).warnings() == []
    step = OmegaConf.create({"name": "constant", "epochs": 5, "warmup_epochs": 0,
                             "lr": {"kind": "step", "step_size": 25000}})
    assert "never drops" in LRSchedule(step, 0.1, 540, 5).warnings()[0]
    assert LRSchedule(step, 0.1, 540, 100).warnings() == []


def test_a_failure_already_recorded_by_the_run_keeps_its_detail(tmp_path):
    """A sweep job's failure is recorded by the run (resolved config, epochs done) and again by
    the sweep's job wrapper (what it has: the unresolved config): the first record stays."""
    from sparse_bench.run import record_failure

    record_failure(tmp_path, {"density": 0.1}, "loss is nan at step 3", 2)
    record_failure(tmp_path, {"density": "${oops}"}, "loss is nan at step 3")
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["config"] == {"density": 0.1} and res["epochs"] == 2
    record_failure(tmp_path, {"density": 0.2}, "another failure")  # a new failure replaces it
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["error"] == "another failure" and res["config"] == {"density": 0.2}
