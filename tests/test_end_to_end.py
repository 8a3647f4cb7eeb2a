"""Whole runs through `python -m sparse_bench` and `run(cfg)`: results, W&B, sweeps, resume."""

import json

import pytest
import torch

from sparse_bench.errors import ConfigError
from sparse_bench.run import run
from sparse_bench.train.checkpoint import load_checkpoint, save_checkpoint

from conftest import FASHION, Crash, cli, compose, killed_after, read_jsonl

TINY = ["dataset=digits", "model=mlp", "schedule=constant", "schedule.epochs=3", "density=0.3"]


def _results(folder):
    return json.loads((folder / "results.json").read_text())


def test_digits_run_with_offline_wandb(tmp_path):
    proc = cli([*TINY, "logger=wandb", f"paths.runs={tmp_path}", "progress=false"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "digits-mlp-sparse_momentum-d0.3-s0"
    res = _results(folder)
    assert res["status"] == "complete" and res["epochs"] == 3
    assert res["density"]["achieved"] == round(0.3 * res["prunable"]["total"]) / res["prunable"]["total"]
    assert set(res["density"]["per_layer"]) == {"net.0.weight", "net.2.weight", "net.4.weight"}
    assert res["final"]["test/acc"] > 0.5
    recs = read_jsonl(folder / "metrics.jsonl")
    assert [r["epoch"] for r in recs if "train/loss" in r] == [1, 2, 3]
    epochs = [r for r in recs if "train/loss" in r]
    for key in ("train/loss", "train/acc", "val/acc", "density/achieved", "density/net.0.weight", "lr"):
        assert key in epochs[0]
    assert "test/acc" in recs[-1] and "test/loss" in recs[-1]
    assert 0.0 <= epochs[0]["train/acc"] <= 1.0
    # sparse momentum's epoch-end updates (after epochs 1 and 2) are records of their own too
    assert [(r["epoch"], r["step"]) for r in recs if r.get("update")] == [(1, epochs[0]["step"]),
                                                                          (2, epochs[1]["step"])]
    assert res["wandb"]["mode"] == "offline"
    assert "method:sparse_momentum" in res["wandb"]["tags"] and "density:0.3" in res["wandb"]["tags"]
    assert list((folder / "wandb").glob("offline-run-*")), "an offline W&B run is left in the run folder"
    assert "epoch 3/3  loss " in proc.stderr + proc.stdout
    assert max(len(line) for line in (proc.stderr + proc.stdout).splitlines() if "] epoch " in line) <= 105
    # provenance: the code, the packages and the command that made the result
    prov = res["provenance"]
    assert len(prov["git"]["commit"] or "x" * 40) == 40 and prov["git"]["dirty"] in (True, False, None)
    assert {"torch", "hydra-core", "wandb", "timm", "sparse_bench"} <= set(prov["versions"])
    assert prov["command"].startswith("python -m sparse_bench ") and "density=0.3" in prov["command"]
    assert prov["experiment"] is None and prov["recipe_departures"] is None
    assert json.loads((folder / "provenance.json").read_text()) == prov
    assert res["flops"]["train_multiple"] == pytest.approx(2 / 3 * 0.3 + 1 / 3, rel=0.01)  # SNFS: 2 f_S + f_D


def test_synthetic_run(tmp_path):
    args = ["dataset=synthetic", "dataset.input_shape=[1,28,28]", "model=lenet300_100", "method=static",
            "schedule=constant", "schedule.epochs=2", "optimizer.lr=0.05", "density=0.2",
            "logger=none", f"paths.runs={tmp_path}"]
    proc = cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = _results(tmp_path / "synthetic-lenet300_100-static-d0.2-s0")
    assert res["density"]["achieved"] == round(0.2 * 266_200) / 266_200
    assert res["final"]["test/acc"] > 0.5
    # the synthetic generator makes any input shape, e.g. a conv net's 1x28x28 and a 3x32x32
    proc = cli(["dataset=synthetic", "dataset.input_shape=[1,28,28]", "model=lenet5_caffe", "method=static",
                "schedule=constant", "schedule.epochs=1", "limit_train_batches=2", "logger=none",
                f"paths.runs={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_sweep_gives_each_job_its_folder_and_wandb_group(tmp_path):
    args = ["-m", *TINY, "schedule.epochs=1", "limit_train_batches=3", "density=0.1,0.2", "seed=0,1",
            "logger=wandb", f"paths.runs={tmp_path}", "sweep_name=s1"]
    proc = cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = sorted(p for p in (tmp_path / "multirun" / "s1").iterdir()
                     if p.is_dir() and (p / "results.json").exists())
    assert len(folders) == 4
    seen = set()
    for f in folders:
        res = _results(f)
        seen.add((res["config"]["density"], res["config"]["seed"]))
        assert res["wandb"]["group"] == "s1"
        assert f"density:{res['config']['density']}" in res["wandb"]["tags"]
        assert res["density"]["achieved"] == pytest.approx(res["config"]["density"], abs=1e-4)
    assert seen == {(0.1, 0), (0.1, 1), (0.2, 0), (0.2, 1)}


@pytest.mark.skipif(not FASHION.exists(), reason=f"{FASHION} absent: install Debian's dataset-fashion-mnist")
def test_fashion_mnist_sparse_momentum_reaches_84_percent(tmp_path):
    args = ["dataset=fashion_mnist", f"dataset.root={FASHION}", "model=lenet300_100", "method=sparse_momentum",
            "density=0.05", "schedule.epochs=5", "logger=none", "progress=false", f"paths.runs={tmp_path}"]
    proc = cli(args, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = _results(tmp_path / "fashion_mnist-lenet300_100-sparse_momentum-d0.05-s0")
    assert res["final"]["test/acc"] >= 0.84
    assert abs(res["density"]["achieved"] - 0.05) <= 0.001 * 0.05
    assert res["prunable"]["total"] == 266_200



def _strip(recs):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in recs]


@pytest.mark.parametrize("method", ["sparse_momentum", "static"])
def test_resume_after_a_crash_ends_bit_identical(tmp_path, fast_overrides, monkeypatch, method):
    base = [*TINY, f"method={method}", "method.init=uniform"] + fast_overrides[:-1]
    full = compose(base + [f"paths.runs={tmp_path / 'a'}"])
    run(full)
    folder_a = tmp_path / "a" / full.run_name

    cfg = compose(base + [f"paths.runs={tmp_path / 'b'}"])
    with killed_after(monkeypatch, 1), pytest.raises(Crash):
        run(cfg)
    folder_b = tmp_path / "b" / cfg.run_name
    crashed = _results(folder_b)
    assert crashed["status"] == "failed" and "killed after epoch 1" in crashed["error"]
    assert len([r for r in read_jsonl(folder_b / "metrics.jsonl") if not r.get("update")]) == 1
    run(cfg)  # resume=auto picks up the checkpoint

    assert _strip(read_jsonl(folder_a / "metrics.jsonl")) == _strip(read_jsonl(folder_b / "metrics.jsonl"))
    ca = load_checkpoint(folder_a / "checkpoint.pt")
    cb = load_checkpoint(folder_b / "checkpoint.pt")
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    for ma, mb in zip(ca["method"]["masks"]["masks"], cb["method"]["masks"]["masks"]):
        assert torch.equal(ma, mb)
    assert _results(folder_a)["final"] == _results(folder_b)["final"]


def test_finished_runs_are_skipped_and_changed_configs_refused(tmp_path, fast_overrides):
    cfg = compose([*TINY, "schedule.epochs=2", *fast_overrides])
    first = run(cfg)
    folder = tmp_path / "runs" / cfg.run_name
    stamp = (folder / "results.json").stat().st_mtime_ns
    assert run(cfg) == first
    assert (folder / "results.json").stat().st_mtime_ns == stamp
    # an unfinished run with another config in the same folder is refused
    (folder / "results.json").unlink()
    with pytest.raises(ConfigError, match="optimizer.lr"):
        run(compose([*TINY, "schedule.epochs=2", "optimizer.lr=0.5", *fast_overrides]))
    again = run(compose([*TINY, "schedule.epochs=2", "resume=false", *fast_overrides]))
    assert again == first
    with pytest.raises(ConfigError, match="resume=true"):
        run(compose([*TINY, "resume=true", "run_name=fresh", *fast_overrides]))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1})

    def broken(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        save_checkpoint(path, {"epoch": 2})
    assert load_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
