"""Every experiment file composes and carries its paper block, and every distinct (model, method,
input shape) among them trains on synthetic data of its real input shape with tiny limits (one
epoch of two batches of two samples). Experiments that differ only in their schedule, density,
number of classes or paper numbers share one training run, which keeps `make test` short."""

import math

import pytest

from sparse_bench.confdir import group_options
from sparse_bench.run import run, validate

from conftest import CONF, choices, compose, experiment_overrides, tiered

EXPERIMENTS = [e for e in group_options("experiment", CONF)]
SHAPES = {"mnist": [1, 28, 28], "fashion_mnist": [1, 28, 28], "digits": [1, 8, 8],
          "cifar10": [3, 32, 32], "cifar100": [3, 32, 32], "imagenet": [3, 224, 224]}
CLASSES = {"mnist": 10, "fashion_mnist": 10, "digits": 10, "cifar10": 10, "cifar100": 100, "imagenet": 1000}
# the few settings that must shrink with a one-epoch run (the run itself is otherwise the experiment's):
# the experiment files keep the papers' absolute epochs, which a 2-step run refuses; fractions fit it
F = "{unit:fraction,value:%s}"
SMOKE = {
    "synflow": ["method.iterations=2"],
    "acdc": [f"method.warmup={F % 0.1}", f"method.phase_length={F % 0.05}", f"method.final_dense={F % 0.1}",
             f"method.final_sparse={F % 0.15}"],
    "gmp": [f"method.start={F % 0.1}", f"method.end={F % 0.8}", f"method.frequency={F % 0.02}"],
    "lottery": ["method.n_rounds=1", "method.densities=null"],
    "gse": [f"method.end={F % 0.6}"],
    "set": ["method.end=null", "method.update_every=1"],
    "rigl": [f"method.end={F % 0.75}"],
    "topkast": ["method.explore_end=null"],
    "dsr": ["method.update_every=1", "method.end=null"],
    "deepr": ["method.temperature=1e-12", "method.end=null"],
}


def test_there_is_an_experiment_for_every_paper():
    names = set(EXPERIMENTS)
    for prefix in ("sm_mnist_", "sm_cifar10_", "sm_imagenet_", "cmp_mnist_", "cmp_cifar10_", "gse_cifar10_",
                   "gse_cifar100_", "gse_imagenet_", "acdc_imagenet_", "gmp_imagenet_", "acdc_cifar100_"):
        assert any(n.startswith(prefix) for n in names), prefix


@pytest.mark.parametrize("name", tiered([e for e in EXPERIMENTS if e != "demo"], 4, ids=str))
def test_experiment_has_a_paper_block(name):
    cfg = compose(experiment_overrides(name))
    validate(cfg)
    paper = cfg.paper
    assert paper.source and paper.table and paper.row and paper.metric in ("test/acc", "test/error")
    assert int(paper.seeds) >= 1
    for density, v in (paper.get("values") or {}).items():
        assert 0 < float(density) <= 1 and math.isfinite(float(v.value))
    # the source of the protocol: a repository and its file, or a stated departure
    assert "repository" in paper, f"{name}: paper.repository names the reference code (null: none, say why)"
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    if paper.repository is None:
        assert "Departure" in text, f"{name}: no reference script, and the file does not say how it departs"
    else:
        assert paper.get("file"), f"{name}: paper.file names the script behind the number"


def _distinct() -> list[str]:
    seen, out = set(), []
    for name, picked in zip(EXPERIMENTS, choices([experiment_overrides(name) for name in EXPERIMENTS])):
        key = (picked["model"], picked["method"], tuple(SHAPES[picked["dataset"]]))
        if key not in seen:
            seen.add(key)
            out.append(name)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", _distinct())
def test_experiment_trains_two_steps_on_its_input_shape(name, tmp_path):
    real = compose(experiment_overrides(name))
    ds, method = real.dataset.name, real.method.name
    over = [*experiment_overrides(name), "dataset=synthetic", f"dataset.input_shape={SHAPES[ds]}",
            f"dataset.num_classes={CLASSES[ds]}", "dataset.n_train=4", "dataset.n_test=2", "dataset.batch_size=2",
            "dataset.test_batch_size=2", "dataset.val_fraction=0", "schedule.epochs=1", "limit_train_batches=2",
            "eval.train_samples=0", "logger=none", "progress=false", "device=cpu", f"paths.runs={tmp_path}",
            "schedule.multiplier=1",  # a 2x or 5x row would train (and checkpoint) 2 or 5 epochs here
            *SMOKE.get(method, [])]
    if "augment" in compose(over).dataset:  # the experiment's CIFAR augmentation means nothing here
        over.append("~dataset.augment")
    final = run(compose(over))
    assert math.isfinite(final["test/loss"])
    if method != "dense":
        assert final["density/achieved"] < 1.0
