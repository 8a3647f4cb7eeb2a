"""Models in and out: init_from (our runs and checkpoints, plain and safetensors state dicts, masks
too), the best epoch's checkpoint, sparse-bench-eval and sparse-bench-export / load_exported."""

import json
import subprocess
import sys

import pytest
import torch

from sparse_bench.errors import ConfigError
from sparse_bench.evaluation import evaluate
from sparse_bench.evaluation import main as eval_main
from sparse_bench.modelio import export, export_main, load_exported, read_start
from sparse_bench.run import build_parts, run, start_or_resume
from sparse_bench.train.checkpoint import load_checkpoint

from conftest import Crash, compose, killed_after, read_jsonl

BASE = ["dataset=digits", "model=mlp", "schedule=constant", "eval.train_samples=0", "logger=none",
        "progress=false", "device=cpu", "limit_train_batches=8"]
GMP = ["method=gmp", "density=0.2", "method.start={unit:epoch,value:1}", "method.end={unit:epoch,value:2}",
       "method.frequency={unit:epoch,value:1}", "schedule.epochs=2"]


def _run(tmp_path, name, over):
    cfg = compose([*BASE, *over, f"paths.runs={tmp_path}", f"run_name={name}"])
    run(cfg)
    return tmp_path / name


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("dense"), "dense", ["method=dense", "schedule.epochs=1"])


def _first_eval(tmp_path, over):
    """The test metrics of a GMP run started from `over`'s init_from, before any step or update."""
    cfg = compose([*BASE, *GMP, *over, f"paths.runs={tmp_path}", "run_name=start"])
    from sparse_bench.run import validate

    cfg = validate(cfg)
    from omegaconf import OmegaConf

    parts = build_parts(cfg, tmp_path / "start", OmegaConf.to_container(cfg))
    start_or_resume(parts, tmp_path / "start")
    return parts.trainer.evaluate(parts.data.test), parts


def test_a_dense_checkpoint_starts_gmp_where_the_dense_model_was(dense_run, tmp_path):
    done = json.loads((dense_run / "results.json").read_text())["final"]
    sd = {k: v for k, v in load_checkpoint(dense_run / "checkpoint.pt")["model"].items()}
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "timm_style.pth")
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "plain.safetensors"))
    for source in (dense_run, dense_run / "checkpoint.pt", tmp_path / "timm_style.pth",
                   tmp_path / "plain.safetensors"):
        (loss, acc), parts = _first_eval(tmp_path / source.name, [f"init_from={source}"])
        assert acc == done["test/acc"] and loss == pytest.approx(done["test/loss"], rel=1e-6), source
        assert parts.method.density_logs()["density/achieved"] == 1.0  # GMP starts dense: nothing pruned yet
    # a whole GMP run from it: its provenance and config say where it started
    out = _run(tmp_path, "gmp", [*GMP, f"init_from={dense_run}"])
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["init_from"]["kind"] == "checkpoint" and len(prov["init_from"]["sha256"]) == 64
    assert json.loads((out / "results.json").read_text())["config"]["init_from"] == str(dense_run)


def test_bad_init_from_is_one_line_before_data_is_read(dense_run, tmp_path):
    (tmp_path / "notes.txt").write_text("not a state dict\n")
    torch.save({"a": 1}, tmp_path / "no_tensors.pt")
    other = {"fc.weight": torch.zeros(3, 3)}
    torch.save(other, tmp_path / "other.pt")
    sd = load_checkpoint(dense_run / "checkpoint.pt")["model"]
    first = next(k for k in sd if k.endswith("weight"))
    torch.save({**sd, first: torch.zeros(2, 2)}, tmp_path / "shape.pt")
    cases = [  # (file, what the line says, whether it is refused before any data is read)
        (tmp_path / "missing.pt", "does not exist", True),
        (tmp_path / "notes.txt", "not a state dict", True),
        (tmp_path / "no_tensors.pt", "holds no state dict", True),
        (tmp_path / "other.pt", "missing in the file", False),  # names and shapes need the model, built
        (tmp_path / "shape.pt", f"shapes differ: {first}", False),  # once the data set gives its input shape
    ]
    for path, said, first_thing in cases:
        # a data root that does not exist: a file refused first never got to reading data
        data = ["dataset=fashion_mnist", "dataset.root=/nonexistent"] if first_thing else []
        with pytest.raises(ConfigError) as exc:
            run(compose([*BASE, *GMP, f"init_from={path}", f"paths.runs={tmp_path / 'r'}", *data]))
        line = str(exc.value)
        assert "\n" not in line and line.startswith("init_from") and said in line, line
    with pytest.raises(ConfigError, match="holds no masks"):
        run(compose([*BASE, *GMP, f"init_from={tmp_path / 'other.pt'}", "init_from_masks=true",
                     f"paths.runs={tmp_path / 'r'}"]))
    with pytest.raises(ConfigError, match="init_from_masks=true takes"):
        run(compose([*BASE, *GMP, "init_from_masks=true", f"paths.runs={tmp_path / 'r'}"]))
    # through the command line: exit 2, one line
    proc = subprocess.run([sys.executable, "-m", "sparse_bench", *BASE, *GMP, f"paths.runs={tmp_path / 'c'}",
                           f"init_from={tmp_path / 'other.pt'}"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "init_from" in proc.stderr


@pytest.mark.parametrize("execution", ["masked", "sparse"])
def test_eval_and_export_give_the_runs_own_results(tmp_path, execution):
    out = _run(tmp_path, "rigl", ["method=rigl", "density=0.1", "method.update_every=4", "schedule.epochs=2",
                                  f"execution={execution}"])
    res = json.loads((out / "results.json").read_text())
    metrics = evaluate(out)
    assert metrics["test/acc"] == res["final"]["test/acc"]
    assert metrics["test/loss"] == pytest.approx(res["final"]["test/loss"], rel=1e-6)
    assert metrics["density/achieved"] == res["density"]["achieved"]
    assert eval_main([str(out), "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["test/acc"] == res["final"]["test/acc"]

    assert export_main([str(out), "--out", str(tmp_path / "m.safetensors")]) == 0
    done = export(out, tmp_path / "m2.safetensors")
    assert done["nnz"] == round(res["density"]["achieved"] * res["prunable"]["total"])
    from omegaconf import OmegaConf

    from sparse_bench.data import build_data

    data = build_data(OmegaConf.create(res["config"]["dataset"]), torch.device("cpu"), 0)
    for mode in ("masked", "sparse"):
        model = load_exported(tmp_path / "m.safetensors", execution=mode)
        correct = n = 0
        with torch.no_grad():
            for x, y in data.test:
                correct += int((model(x).argmax(1) == y).sum())
                n += len(y)
        assert correct / n == res["final"]["test/acc"], mode
        assert sum(int(m.sum()) for m in model.exported_masks.values()) == done["nnz"]
    # the dense format: an ordinary state dict with zeros, which starts another run
    assert export_main([str(out), "--out", str(tmp_path / "dense.pt"), "--format", "dense"]) == 0
    sd = torch.load(tmp_path / "dense.pt", weights_only=True)
    assert sum(int((sd[n] != 0).sum()) for n in res["prunable"]["prunable"]) <= done["nnz"]
    start = read_start(tmp_path / "m.safetensors")
    assert start.kind == "export" and sum(int(m.sum()) for m in start.masks.values()) == done["nnz"]
    # init_from_masks: a static run takes these masks instead of drawing its own
    again = _run(tmp_path, "static", ["method=static", "density=0.1", "schedule.epochs=1",
                                      f"init_from={tmp_path / 'm.safetensors'}", "init_from_masks=true"])
    masks = load_checkpoint(again / "checkpoint.pt")["method"]["masks"]
    for name, m in zip(masks["names"], masks["masks"]):
        assert torch.equal(m, start.masks[name]), name


def test_best_and_last_checkpoints_and_test_on_best(tmp_path, monkeypatch):
    over = ["method=set", "density=0.2", "schedule.epochs=4", "dataset.val_fraction=0.2", "checkpoint.keep_best=true",
            "eval.test_on=best", "method.update_every=4"]
    a = _run(tmp_path / "a", "run", over)
    res = json.loads((a / "results.json").read_text())
    recs = [r for r in read_jsonl(a / "metrics.jsonl") if "val/acc" in r and not r.get("update")]
    best_epoch = max(range(len(recs)), key=lambda i: (recs[i]["val/acc"], i)) + 1
    assert res["best"]["epoch"] == best_epoch and res["best"]["metric"] == "val/acc"
    assert res["best"]["value"] == recs[best_epoch - 1]["val/acc"]
    assert load_checkpoint(a / "best.pt")["epoch"] == best_epoch
    assert evaluate(a, "best")["test/acc"] == res["final"]["test/acc"]  # tested on the best epoch's model
    final = read_jsonl(a / "metrics.jsonl")[-1]
    assert final["test/epoch"] == best_epoch

    # killed after epoch 2 and resumed: the same best and last checkpoints as the run that was not
    with killed_after(monkeypatch, 2), pytest.raises(Crash):
        _run(tmp_path / "b", "run", over)
    b = _run(tmp_path / "b", "run", over)
    assert json.loads((b / "results.json").read_text())["best"] == res["best"]
    for name in ("best.pt", "checkpoint.pt"):
        ca, cb = load_checkpoint(a / name), load_checkpoint(b / name)
        assert ca["epoch"] == cb["epoch"], name
        for k in ca["model"]:
            assert torch.equal(ca["model"][k], cb["model"][k]), (name, k)
    with pytest.raises(ConfigError, match="checkpoint.keep_best=true"):
        run(compose([*BASE, "eval.test_on=best", f"paths.runs={tmp_path / 'c'}"]))
    with pytest.raises(ConfigError, match="validation split"):
        run(compose([*BASE, "checkpoint.keep_best=true", "dataset.val_fraction=0", f"paths.runs={tmp_path / 'c'}"]))


def test_the_gmp_row_from_a_dense_model_names_its_input(tmp_path):
    """gmp_imagenet_resnet50_from_dense (IST-DASLab/ACDC imagenet_resnet50_gmp_sp*.yaml): without
    init_from one line naming it, exit 2; with one, the run's recipe is the row's (no departure)."""
    from omegaconf import OmegaConf

    from sparse_bench.provenance import departures, recipe_of
    from sparse_bench.run import validate

    proc = subprocess.run([sys.executable, "-m", "sparse_bench", "experiment=gmp_imagenet_resnet50_from_dense",
                           f"paths.runs={tmp_path}"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: init_from is not set"), proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    cfg = validate(compose(["experiment=gmp_imagenet_resnet50_from_dense", "init_from=/models/resnet50.pth"]))
    resolved = OmegaConf.to_container(cfg)
    recipe = recipe_of("gmp_imagenet_resnet50_from_dense", cfg.density, cfg.seed, init_from=cfg.init_from)
    assert departures(recipe, resolved) == []
    assert cfg.schedule.lr.milestones == [41, 47, 53, 59, 65, 71, 77, 83, 89] and cfg.method.initial_sparsity == 0.05
    other = validate(compose(["experiment=gmp_imagenet_resnet50_from_dense", "init_from=/models/resnet50.pth",
                              "optimizer.lr=0.1"]))
    assert departures(recipe, OmegaConf.to_container(other)) == ["optimizer.lr=0.1"]
