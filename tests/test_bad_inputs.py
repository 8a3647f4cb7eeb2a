"""The corpus of bad inputs: every one ends with a non-zero exit, one line naming the key (or the
path) and no traceback, before anything is created; none leaves a results.json claiming success.

The command-line cases run `sparse_bench.cli.main` in-process: they are refused by the check
before Hydra (composition plus the schema), so no run starts and each case costs a composition.
The cases that need data or files run `run(cfg)` on tiny inputs.
"""

from __future__ import annotations

import json

import pytest

from sparse_bench import cli
from sparse_bench.errors import ConfigError
from sparse_bench.run import run

from conftest import compose, tiered

# (override(s), what the one line must name)
CASES = [
    # top level
    (["density=1.5"], "density=1.5"), (["density=0"], "density=0"), (["density=-0.1"], "density=-0.1"),
    (["density=abc"], "density=abc"), (["density=nan"], "density=nan"), (["density="], "density"),
    (["seed=abc"], "seed=abc"), (["seed=1.5"], "seed=1.5"), (["seed=-1"], "seed=-1"),
    (["resume=maybe"], "resume=maybe"), (["progress=maybe"], "progress=maybe"),
    (["limit_train_batches=0"], "limit_train_batches=0"), (["limit_train_batches=abc"], "limit_train_batches"),
    (["threads=0"], "threads=0"), (["log_every=-1"], "log_every=-1"),
    (["optimized_metric=test/acc"], "optimized_metric=test/acc"),
    (["+densty=0.1"], "densty"), (["+foo.bar=1"], "foo"), (["device=tpu"], "device=tpu"),
    (["loss.label_smoothing=-0.1"], "loss.label_smoothing"), (["loss.label_smoothing=1.0"], "loss.label_smoothing"),
    (["loss.label_smoothing=1.5"], "loss.label_smoothing"), (["+loss.foo=1"], "loss.foo"),
    (["eval.train_samples=-1"], "eval.train_samples"), (["eval.test_every_epoch=maybe"], "eval.test_every_epoch"),
    (["run_name=../x"], "run_name"), (["run_name=/abs/x"], "run_name"), (["sweep_name=../x"], "sweep_name"),
    (["prunable.types=[Bogus]"], "prunable.types"),
    # optimizer
    (["optimizer.lr=-1"], "optimizer.lr=-1"), (["optimizer.lr=0"], "optimizer.lr=0"),
    (["optimizer.lr=abc"], "optimizer.lr=abc"), (["optimizer.momentum=abc"], "optimizer.momentum=abc"),
    (["optimizer.momentum=1.0"], "optimizer.momentum"), (["optimizer.momentum=-0.5"], "optimizer.momentum"),
    (["optimizer.weight_decay=-1"], "optimizer.weight_decay"), (["optimizer.nesterov=maybe"], "optimizer.nesterov"),
    (["+optimizer.foo=1"], "optimizer.foo"), (["optimizer=adam", "optimizer.betas=[2,0.9]"], "optimizer.betas"),
    (["optimizer=adam", "optimizer.betas=[0.9]"], "optimizer.betas"),
    (["optimizer=bogus"], "optimizer=bogus"),
    # schedule
    (["schedule.epochs=0"], "schedule.epochs=0"), (["schedule.epochs=1.5"], "schedule.epochs=1.5"),
    (["schedule.epochs=abc"], "schedule.epochs=abc"), (["schedule.multiplier=0"], "schedule.multiplier"),
    (["schedule.warmup_epochs=-1"], "schedule.warmup_epochs"), (["schedule.lr.kind=bogus"], "schedule.lr.kind"),
    (["schedule.lr.gamma=0"], "schedule.lr.gamma"), (["schedule.lr.step_size=0"], "schedule.lr.step_size"),
    (["schedule=multistep", "schedule.lr.milestones=[-1]"], "schedule.lr.milestones"),
    (["schedule=bogus"], "schedule=bogus"),
    # data sets
    (["dataset.batch_size=0"], "dataset.batch_size=0"), (["dataset.batch_size=abc"], "dataset.batch_size"),
    (["dataset.test_batch_size=0"], "dataset.test_batch_size"), (["dataset.val_fraction=1.0"], "dataset.val_fraction"),
    (["dataset.val_fraction=-0.1"], "dataset.val_fraction"), (["+dataset.foo=1"], "dataset.foo"),
    (["dataset.normalize.std=[0]"], "dataset.normalize.std"),
    (["dataset=cifar10", "dataset.augment.padding=40"], "dataset.augment.padding"),
    (["dataset=cifar10", "dataset.augment.pad_mode=bogus"], "dataset.augment.pad_mode"),
    (["dataset=cifar10", "dataset.augment.crop=maybe"], "dataset.augment.crop"),
    (["dataset=cifar10", "dataset.augment.flip=yes"], "dataset.augment.flip=yes"), (["dataset.root="], "dataset.root"),
    (["dataset=digits", "dataset.test_fraction=0"], "dataset.test_fraction"),
    (["dataset=synthetic", "dataset.input_shape=[0,28,28]"], "dataset.input_shape"),
    (["dataset=synthetic", "dataset.num_classes=1"], "dataset.num_classes"),
    (["dataset=imagenet", "dataset.num_workers=-1"], "dataset.num_workers"),
    (["dataset=bogus"], "dataset=bogus"),
    # models
    (["model=mlp", "model.hidden=[0]"], "model.hidden"), (["model=mlp", "model.hidden=[-5]"], "model.hidden"),
    (["model=mlp", "model.hidden=abc"], "model.hidden"), (["model=mlp", "model.dropout=2"], "model.dropout"),
    (["model=mlp", "model.dropout=-0.1"], "model.dropout"),
    (["model=wrn", "model.widen_factor=0"], "model.widen_factor"),
    (["model=resnet56", "model.width=0"], "model.width"), (["model=vit_cifar", "model.heads=0"], "model.heads"),
    (["+model.foo=1"], "model.foo"), (["model=bogus"], "model=bogus"),
    # methods
    (["method.prune_rate=abc"], "method.prune_rate=abc"), (["method.prune_rate=1.5"], "method.prune_rate"),
    (["method.prune_rate=0"], "method.prune_rate"), (["method.decay=bogus"], "method.decay"),
    (["method.update_every=0"], "method.update_every"), (["method.update_every=abc"], "method.update_every"),
    (["method.prune=bogus"], "method.prune"), (["method.growth=bogus"], "method.growth"),
    (["+method.foo=1"], "method.foo"), (["method.prune_rat=0.3"], "method.prune_rat"),
    (["method=rigl", "method.drop_fraction=abc"], "method.drop_fraction"),
    (["method=rigl", "method.drop_fraction=1.5"], "method.drop_fraction"),
    (["method=rigl", "method.update_every=0"], "method.update_every"),
    (["method=rigl", "method.end={unit:lightyear,value:1}"], "method.end.unit"),
    (["method=rigl", "method.end={unit:fraction,value:-1}"], "method.end.value"),
    (["method=gse", "method.alpha=0.9"], "method.alpha"), (["method=gse", "method.gamma=0"], "method.gamma"),
    (["method=gse", "method.sampling=bogus"], "method.sampling"),
    (["method=gse", "method.stat_batches=0"], "method.stat_batches"),
    (["method=set", "method.scope=bogus"], "method.scope"),
    (["method=dsr", "method.init_threshold=0"], "method.init_threshold"),
    (["method=dsr", "method.delta=1"], "method.delta"),
    (["method=deepr", "method.temperature=-1"], "method.temperature"), (["method=deepr", "method.l1=-1"], "method.l1"),
    (["method=topkast", "method.forward_density=0"], "method.forward_density"),
    (["method=gmp", "method.initial_sparsity=1"], "method.initial_sparsity"),
    (["method=gmp", "method.power=0"], "method.power"),
    (["method=acdc", "method.momentum_reset=bogus"], "method.momentum_reset"),
    (["method=lottery", "method.keep_per_round=1"], "method.keep_per_round"),
    (["method=lottery", "method.densities=[0,0.5]"], "method.densities"),
    (["method=lottery", "method.densities=[0.5,0.6]"], "method.densities"),
    (["method=gmp", "method.start=2"], "method.start=2"),
    (["method=deepr", "method.temperature=inf"], "method.temperature"),
    (["method=rigl", "method.exclude_pruned=yes"], "method.exclude_pruned"),
    (["method=synflow", "method.iterations=0"], "method.iterations"),
    (["method=synflow", "method.precision=float16"], "method.precision"),
    (["method=static", "method.init=bogus"], "method.init"), (["method=bogus"], "method=bogus"),
    (["experiment=bogus"], "experiment=bogus"),
    # logger
    (["logger.mode=bogus"], "logger.mode"), (["logger=bogus"], "logger=bogus"),
    # the command line itself
    (["density=[0.1"], "density=[0.1"), (["=0.1"], "=0.1"),
]


@pytest.mark.parametrize("args,named", tiered(CASES, 4, ids=lambda c: " ".join(c[0])))
def test_bad_command_line_is_refused_in_one_line(args, named, tmp_path, capsys):
    runs = tmp_path / "runs"
    code = cli.main([*args, "logger=none" if not any(a.startswith("logger") for a in args) else "progress=false",
                     f"paths.runs={runs}"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert named in err, err
    assert "Traceback" not in err
    assert not runs.exists()


def test_the_corpus_is_large():
    assert len(CASES) + len(RUN_CASES) >= 80


def test_bad_wandb_mode_in_the_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "bogus")
    code = cli.main(["logger=wandb", f"paths.runs={tmp_path / 'runs'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "WANDB_MODE=bogus" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


# cases that need data, a model or files: run(cfg) refuses them with one line naming the key or path
TINY = ["dataset=digits", "model=mlp", "schedule=constant", "schedule.epochs=1", "limit_train_batches=2",
        "logger=none", "progress=false", "device=cpu"]
RUN_CASES = [
    (["dataset=mnist", "model=lenet300_100", "dataset.root=NOWHERE"], "dataset.root"),
    (["dataset=fashion_mnist", "model=lenet300_100", "dataset.root=NOWHERE"], "dataset.root"),
    (["dataset=cifar10", "model=resnet56", "dataset.root=NOWHERE"], "dataset.root"),
    (["dataset=imagenet", "model=resnet50", "dataset.root=NOWHERE"], "dataset.root"),
    (["model=lenet300_100"], "model=lenet300_100 does not fit"),
    (["model=lenet5_caffe"], "model=lenet5_caffe does not fit"),
    (["density=1e-6", "method=static"], "density=1e-06 leaves"),
    (["method=rigl", "method.end={unit:epoch,value:50}"], "method.end"),
    (["method=acdc", "method.warmup={unit:epoch,value:5}"], "method.warmup"),
    (["device=cuda:7"], "device=cuda:7"),
    (["optimizer.momentum=0", "optimizer.nesterov=true"], "optimizer.nesterov"),
]


@pytest.mark.parametrize("args,named", tiered(RUN_CASES, 3, ids=lambda c: " ".join(c[0])))
def test_bad_input_that_needs_data_or_a_model(args, named, tmp_path):
    chosen = {a.split("=", 1)[0]: a for a in TINY}
    chosen.update({a.split("=", 1)[0]: a.replace("NOWHERE", str(tmp_path / "nowhere")) for a in args})
    cfg = compose([*chosen.values(), f"paths.runs={tmp_path / 'runs'}"])
    if named.startswith("device=cuda") and __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    with pytest.raises(ConfigError) as err:
        run(cfg)
    assert named in str(err.value) and "\n" not in str(err.value)
    for res in (tmp_path / "runs").rglob("results.json"):
        assert json.loads(res.read_text()).get("status") != "complete"
