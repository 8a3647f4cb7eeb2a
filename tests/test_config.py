"""Every config group option composes; bad input fails early with one clear line."""

import pytest

from sparse_bench.cli import precheck
from sparse_bench.confdir import group_options
from sparse_bench.errors import ConfigError
from sparse_bench.run import run, validate
from sparse_bench.schema import GROUP_ROLES

from conftest import CONF, cli_here, compose, experiment_overrides, tiered

GROUPS = (*GROUP_ROLES, "experiment")
OPTIONS = [(g, o) for g in GROUPS if g != "experiment" for o in group_options(g, CONF)]


def test_every_group_has_options():
    for group in GROUPS:
        assert group_options(group, CONF), f"conf/{group} is empty"


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes(group, option):
    cfg = compose([f"{group}={option}"])
    assert cfg[group].name == option
    validate(cfg)


@pytest.mark.parametrize("experiment", tiered(group_options("experiment", CONF), 4, ids=str))
def test_every_experiment_composes(experiment):
    cfg = compose(experiment_overrides(experiment))
    validate(cfg)


def test_unknown_group_option_is_caught_before_hydra():
    with pytest.raises(ConfigError, match=r"method=bogus is unknown; choose one of: .*sparse_momentum"):
        precheck(["-m", "method=sparse_momentum,bogus"])
    with pytest.raises(ConfigError, match=r"method=bogus is unknown; choose one of: .*sparse_momentum"):
        precheck(["method=bogus"])
    precheck(["-m", "method=static,sparse_momentum", "density=0.1", "+foo=1"])


@pytest.mark.parametrize("override,match", [
    ("density=1.5", r"density=1.5 must be in \(0, 1\]"),
    ("density=0", r"density=0.0 must be in \(0, 1\]"),
    ("density=abc", "density=abc is not a number"),
    ("schedule.epochs=0", "schedule.epochs"),
    ("resume=maybe", "resume=maybe"),
    ("limit_train_batches=-1", "limit_train_batches"),
])
def test_bad_values_fail_validation(override, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose([override]))


def test_model_that_does_not_fit_fails_before_training(tmp_path, fast_overrides):
    cfg = compose(["dataset=digits", "model=lenet5_caffe", *fast_overrides])
    with pytest.raises(ConfigError, match="model=lenet5_caffe does not fit"):
        run(cfg)
    assert not (tmp_path / "runs" / cfg.run_name / "metrics.jsonl").exists()


def test_missing_mnist_files_say_where_they_looked(tmp_path, fast_overrides):
    cfg = compose([f"dataset.root={tmp_path / 'nowhere'}", *fast_overrides])
    with pytest.raises(ConfigError, match="dataset.root") as err:
        run(cfg)
    assert "nowhere" in str(err.value) and "download" in str(err.value)


@pytest.mark.parametrize("args,match", [
    (["method=bogus"], "method=bogus is unknown"),
    (["density=1.5", "dataset=digits", "model=mlp"], "density=1.5 must be in (0, 1]"),
    (["dataset=digits", "model=lenet300_100"], "model=lenet300_100 does not fit"),
])
def test_cli_bad_input_is_one_line_and_nonzero_exit(tmp_path, args, match):
    proc = cli_here([*args, "logger=none", f"paths.runs={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert match in err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in proc.stderr
