"""W&B: what a run sends, and that the run is always finished, even when training crashes."""

import json
import sys
import types
from pathlib import Path

import pytest

from sparse_bench.run import _sweep_label, run
from sparse_bench.train import trainer as trainer_mod
from sparse_bench.train.logging import wandb_mode

from conftest import cli, compose, read_jsonl

TINY = ["dataset=digits", "model=mlp", "schedule=constant", "schedule.epochs=2", "density=0.3",
        "logger=wandb", "progress=false", "device=cpu"]


class FakeRun:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.project = kwargs["project"]
        self.tags = kwargs["tags"]
        self.logged = []
        self.steps = []
        self.metrics = {}
        self.summary = {}
        self.finished = None
        self.step = 0

    def define_metric(self, name, step_metric=None, **k):
        self.metrics[name] = step_metric

    def log(self, rec, step=None):
        self.logged.append(rec)
        self.steps.append(step)

    def finish(self, exit_code=0):
        self.finished = exit_code


class FakeTable:
    def __init__(self, columns, data):
        self.columns, self.data = columns, data


@pytest.fixture
def fake_wandb(monkeypatch):
    runs = []
    mod = types.ModuleType("wandb")
    mod.init = lambda **kw: runs.append(FakeRun(**kw)) or runs[-1]
    mod.Table = FakeTable
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return runs


def test_a_run_logs_every_epoch_with_the_same_names_and_finishes(fake_wandb, tmp_path):
    final = run(compose([*TINY, f"paths.runs={tmp_path}"]))
    (r,) = fake_wandb
    assert r.finished == 0
    assert r.kwargs["mode"] == "offline" and r.kwargs["dir"].startswith(str(tmp_path))
    assert {"method:sparse_momentum", "density:0.3", "model:mlp", "dataset:digits"} <= set(r.tags)
    assert [x["epoch"] for x in r.logged if "train/loss" in x] == [1, 2]
    assert [x for x in r.logged if "test/acc" in x][-1]["test/acc"] == final["test/acc"]
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
    # W&B's step keeps counting across the segments: one history, whatever order they are synced in
    assert second.steps[0] == first.steps[-1] + 1
    assert second.steps == list(range(second.steps[0], second.steps[0] + len(second.steps)))


def test_every_mask_update_is_its_own_record_charted_over_the_step(fake_wandb, tmp_path):
    over = [*TINY, "method=rigl", "method.update_every=4", f"paths.runs={tmp_path}", "eval.train_samples=0"]
    final = run(compose(over))
    (r,) = fake_wandb
    folder = next(tmp_path.glob("digits-mlp-rigl-*"))
    recs = read_jsonl(folder / "metrics.jsonl")
    steps_per_epoch = [x for x in recs if "train/loss" in x][0]["step"]
    end = int(0.75 * 2 * steps_per_epoch)
    updates = [x for x in recs if x.get("update")]
    # RigL every 4 steps up to 75% of training: each update a record with its step and epoch
    assert [(u["step"], u["epoch"]) for u in updates] == [
        (s, 1 + (s - 1) // steps_per_epoch) for s in range(4, end, 4)]
    assert all("mask/pruned" in u and "rigl/drop_fraction" in u for u in updates)
    # the epoch records no longer carry (and overwrite) the step-cadence updates' keys
    assert not any("mask/pruned" in x for x in recs if "train/loss" in x)
    sent = [x for x in r.logged if "mask/pruned" in x]
    assert len(sent) == len(updates) and all("update" not in x for x in sent)
    # charts: mask, density, flops and the method's keys over the step; epoch metrics over the epoch
    assert {r.metrics[k] for k in ("mask/pruned", "mask/churn", "rigl/drop_fraction", "density/achieved",
                                   "flops/train_total")} == {"step"}
    assert {r.metrics[k] for k in ("train/loss", "train/acc", "val/acc", "lr", "test/acc")} == {"epoch"}
    assert "step" in r.metrics and "epoch" in r.metrics
    assert r.steps == list(range(len(r.steps)))  # explicit, increasing W&B steps
    # config, summary and the per-layer table
    assert r.kwargs["job_type"] == "train"
    cfg = r.kwargs["config"]
    assert cfg["experiment"] is None and cfg["prunable_rule"]["types"] == ["Linear", "Conv1d", "Conv2d", "Conv3d"]
    for key in ("test/acc", "test/loss", "density/achieved", "flops/train_multiple", "flops/test_multiple",
                "flops/train_total"):
        assert key in r.summary, key
    assert r.summary["test/acc"] == final["test/acc"]
    # an MLP's forward FLOPs are proportional to its weights: the multiple is the density
    assert r.summary["flops/test_multiple"] == pytest.approx(r.summary["density/achieved"], abs=1e-12)
    (table,) = [x["density/final_per_layer"] for x in r.logged if "density/final_per_layer" in x]
    assert table.columns == ["layer", "shape", "weights", "active", "density"]
    assert [row[0] for row in table.data] == ["net.0.weight", "net.2.weight", "net.4.weight"]
    assert table.data[0][1:3] == ["128x64", 8192]
    res = json.loads((folder / "results.json").read_text())
    assert res["flops"]["train_multiple"] == r.summary["flops/train_multiple"]


def test_a_sweep_is_grouped_by_what_it_runs(monkeypatch):
    cfg = compose(["dataset=digits", "model=mlp"])
    assert _sweep_label(["experiment=sm_mnist_lenet5_caffe", "density=0.01,0.02"], cfg) == "sm_mnist_lenet5_caffe"
    assert _sweep_label(["method=set,rigl", "density=0.1"], cfg) == "digits-mlp-set,rigl"
    assert _sweep_label(["method=dense,static,set,rigl,gse"], cfg) == "digits-mlp-dense,static,set+2"


def _wandb_records(path: Path):
    """The records of an offline run's .wandb file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):  # full, or last fragment
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


@pytest.mark.slow
def test_offline_run_folder_holds_the_axes_group_config_and_summary(tmp_path):
    """A real offline W&B run of an experiment sweep, read back from its .wandb file."""
    args = ["-m", "experiment=cmp_mnist_lenet300_100_set", "dataset=digits", "model=mlp", "schedule.epochs=2",
            "method.update_every=5", "limit_train_batches=10", "eval.train_samples=0", "logger=wandb",
            "progress=false", "device=cpu", f"paths.runs={tmp_path}"]
    proc = cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = [p.parent for p in tmp_path.glob("multirun/*/*/results.json")]
    res = json.loads((folder / "results.json").read_text())
    sweep = folder.parent.name
    assert res["wandb"]["group"] == f"cmp_mnist_lenet300_100_set-{sweep}"
    prov = res["provenance"]
    assert prov["experiment"] == "cmp_mnist_lenet300_100_set"
    assert {"dataset=digits", "model=mlp", "schedule.epochs=2", "method.update_every=5",
            "limit_train_batches=10"} <= set(prov["recipe_departures"])
    assert res["paper"] is None  # a departing run is never compared with the paper
    (wb,) = folder.glob("wandb/offline-run-*/*.wandb")
    axes, history, summary, config, run_rec = {}, [], {}, {}, None
    for rec in _wandb_records(wb):
        kind = rec.WhichOneof("record_type")
        if kind == "metric" and rec.metric.name:
            axes[rec.metric.name] = rec.metric.step_metric
        elif kind == "history":
            history.append((rec.history.step.num, {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                                   for i in rec.history.item}))
        elif kind == "summary":
            for item in rec.summary.update:
                summary["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
        elif kind == "run":
            run_rec = rec.run
            for item in rec.run.config.update:
                config[item.key] = json.loads(item.value_json)
    assert run_rec.job_type == "train" and run_rec.run_group == res["wandb"]["group"]
    assert config["experiment"] == "cmp_mnist_lenet300_100_set"
    assert "dataset=digits" in config["recipe_departures"] and "types" in config["prunable_rule"]
    assert axes["mask/pruned"] == axes["set/prune_rate"] == axes["density/achieved"] == "step"
    assert axes["train/loss"] == axes["val/acc"] == axes["test/acc"] == "epoch"
    steps = [s for s, _ in history]
    assert steps == sorted(set(steps))
    updates = [h for _, h in history if "mask/pruned" in h]
    assert [u["step"] for u in updates] == [5, 10, 15]  # every 5 steps, none after the last epoch's end
    for key in ("test/acc", "density/achieved", "flops/train_multiple", "flops/test_multiple"):
        assert key in summary, key


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


def test_progress_lines_when_output_is_not_a_terminal(caplog):
    import logging

    import torch

    from sparse_bench.train.logging import Progress

    with caplog.at_level(logging.INFO, logger="sparse_bench"):
        bar = Progress(epoch=1, epochs=3, n_batches=5, enabled=True, log_every=2, tty=False)
        for done in range(1, 6):
            bar.update(done, torch.tensor(2.0 * done), torch.tensor(done), 2 * done, done, 15)
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/3 batch 2/5", "epoch 1/3 batch 4/5"]
    assert all("loss 1.0000 acc 0.5000" in line and "ETA epoch" in line and "run" in line for line in lines)
    with caplog.at_level(logging.INFO, logger="sparse_bench"):
        caplog.clear()
        quiet = Progress(epoch=1, epochs=3, n_batches=5, enabled=False, log_every=2, tty=False)
        quiet.update(2, torch.tensor(1.0), torch.tensor(1), 2, 2, 15)
    assert caplog.records == []


def test_train_loss_and_lr_every_log_every_steps_in_wandb_only(fake_wandb, tmp_path):
    """log_every steps: the training curve between epochs (train/step_loss, train/step_lr) in W&B, charted
    over the step; metrics.jsonl keeps its one record per epoch and update."""
    over = [*TINY, "method=static", "log_every=5", "eval.train_samples=0", f"paths.runs={tmp_path}"]
    run(compose(over))
    (r,) = fake_wandb
    curve = [x for x in r.logged if "train/step_loss" in x]
    assert [x["step"] for x in curve] == list(range(5, 5 * len(curve) + 1, 5)) and len(curve) >= 4
    assert all(x["train/step_lr"] > 0 and x["train/step_loss"] > 0 for x in curve)
    assert r.metrics["train/step_loss"] == "step" and r.metrics["train/step_lr"] == "step"
    assert r.steps == sorted(r.steps) and len(set(r.steps)) == len(r.steps)  # W&B's step only grows
    folder = next(tmp_path.glob("digits-mlp-static-*"))
    assert not any("train/step_loss" in x for x in read_jsonl(folder / "metrics.jsonl"))
    epochs = [x for x in read_jsonl(folder / "metrics.jsonl") if "train/loss" in x]
    assert all(x["throughput/ms_per_step"] > 0 and 0 <= x["throughput/data_wait"] <= 1 for x in epochs)
