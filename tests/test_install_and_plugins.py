"""An installable tool that follows Hydra's conventions: user config folders and packages, the
console script and its tab completion, a non-editable install run from elsewhere, parallel and
Optuna sweeps."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, cli, cli_here

TINY = ["schedule=constant", "schedule.epochs=1", "limit_train_batches=3", "eval.train_samples=0",
        "logger=none", "progress=false", "device=cpu"]
BIN = Path(sys.executable).parent


@pytest.fixture
def user_project(tmp_path):
    """A researcher's folder: a package with a method and a model, and a config folder using them."""
    (tmp_path / "mylab").mkdir()
    (tmp_path / "mylab" / "__init__.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn
        from sparse_bench.sparsity.methods.dense import Static

        class HalfStatic(Static):
            """A static mask that logs its own key at every epoch end."""
            def on_epoch_end(self, epoch, step):
                return {"mylab/epoch_end": epoch}

        def build_tiny(cfg, input_shape, num_classes):
            n = 1
            for s in input_shape:
                n *= s
            return nn.Sequential(nn.Flatten(), nn.Linear(n, int(cfg.hidden)), nn.ReLU(),
                                 nn.Linear(int(cfg.hidden), num_classes))
    '''))
    conf = tmp_path / "myconf"
    for group in ("method", "model", "experiment"):
        (conf / group).mkdir(parents=True)
    (conf / "method" / "halfstatic.yaml").write_text("name: halfstatic\n_target_: mylab.HalfStatic\ninit: uniform\n")
    (conf / "model" / "tiny.yaml").write_text("name: tiny\n_target_: mylab.build_tiny\nhidden: 16\n")
    (conf / "experiment" / "mine.yaml").write_text(textwrap.dedent("""\
        # @package _global_
        defaults:
          - override /dataset: digits
          - override /model: tiny
          - override /method: halfstatic
        density: 0.25
    """))
    return tmp_path


def test_user_config_dir_with_own_method_model_and_experiment(user_project):
    proc = cli(["--config-dir", str(user_project / "myconf"), "experiment=mine", *TINY,
                f"paths.runs={user_project / 'runs'}"], cwd=user_project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((user_project / "runs" / "digits-tiny-halfstatic-d0.25-s0" / "results.json").read_text())
    assert res["status"] == "complete"
    assert res["density"]["achieved"] == pytest.approx(0.25, abs=1e-3)
    assert set(res["prunable"]["prunable"]) == {"1.weight", "3.weight"}
    # the provenance's rerun command finds the user's configs again (it says --config-dir)
    command = shlex.split(res["provenance"]["command"])
    assert command[:5] == ["python", "-m", "sparse_bench", "--config-dir", str(user_project / "myconf")]
    again = cli(command[3:], cwd=user_project)
    assert again.returncode == 0 and "run already complete" in again.stderr + again.stdout, again.stderr[-2000:]


def test_user_config_on_hydra_searchpath(user_project):
    proc = cli([f"hydra.searchpath=[file://{user_project / 'myconf'}]", "experiment=mine", *TINY,
                f"paths.runs={user_project / 'runs'}"], cwd=user_project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((user_project / "runs" / "digits-tiny-halfstatic-d0.25-s0" / "results.json").read_text())
    assert f"hydra.searchpath=[file://{user_project / 'myconf'}]" in shlex.split(res["provenance"]["command"])


def test_group_check_knows_the_users_options(user_project):
    proc = cli_here(["--config-dir", str(user_project / "myconf"), "method=nope", *TINY], cwd=user_project)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert line.startswith("error: method=nope is unknown") and "halfstatic" in line and "rigl" in line
    assert len(line.splitlines()) == 1


def test_missing_user_package_is_one_line(user_project):
    (user_project / "myconf" / "model" / "ghost.yaml").write_text("name: ghost\n_target_: nolab.build\n")
    proc = cli(["--config-dir", str(user_project / "myconf"), "model=ghost", "dataset=digits", *TINY,
                f"paths.runs={user_project / 'runs'}"], cwd=user_project)
    assert proc.returncode == 2
    assert "model._target_=nolab.build: cannot import nolab" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_console_script_tab_completion():
    script = BIN / "sparse-bench"
    if not script.exists():
        pytest.skip("the console script is not installed (run make install)")
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    bash = textwrap.dedent("""\
        eval "$(sparse-bench -sc install=bash)"
        COMP_LINE="sparse-bench method=rig"; COMP_POINT=${#COMP_LINE}
        COMP_WORDS=(sparse-bench method=rig); COMP_CWORD=1
        hydra_bash_completion; echo "${COMPREPLY[@]}"
    """)
    out = subprocess.run(["bash", "-c", bash], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["method=rigl"], out.stderr[-2000:]


def test_dense_runs_ignore_density_and_a_density_sweep_trains_dense_once(tmp_path):
    proc = cli_here(["-m", "method=dense", "density=0.1,0.2", "dataset=digits", "model=mlp", *TINY,
                f"paths.runs={tmp_path}", "sweep_name=d"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = [p for p in (tmp_path / "multirun" / "d").iterdir() if p.is_dir()]
    assert [p.name for p in folders] == ["digits-mlp-dense-s0"]
    assert "run already complete" in proc.stdout + proc.stderr


def test_optimized_metric_may_not_be_the_test_set(tmp_path):
    proc = cli_here(["optimized_metric=test/acc", "dataset=digits", "model=mlp", *TINY], cwd=tmp_path)
    assert proc.returncode == 2 and "optimized_metric=test/acc" in proc.stderr


@pytest.mark.slow
def test_joblib_sweep_shares_the_cores(tmp_path):
    proc = cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1", "dataset=digits",
                "model=mlp", *TINY, f"paths.runs={tmp_path}", "sweep_name=j"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cores = len(os.sched_getaffinity(0))
    logs = sorted((tmp_path / "multirun" / "j").glob("*/sparse_bench.log"))
    assert len(logs) == 2
    for log in logs:
        assert f"| {max(1, cores // 2)} threads" in log.read_text()


@pytest.mark.slow
def test_optuna_sweep_optimises_a_validation_metric(tmp_path):
    proc = cli(["-m", "hparams_search=rigl", "hydra.sweeper.n_trials=2", "dataset=digits", "model=mlp",
                "method.update_every=5", *TINY, f"paths.runs={tmp_path}", "sweep_name=o"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "multirun" / "o"
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    vals = [json.loads(p.read_text())["final"]["val/acc"] for p in sweep.glob("*/results.json")]
    assert len(vals) == 2 and best["best_value"] == pytest.approx(max(vals))


@pytest.mark.slow
def test_non_editable_install_runs_from_any_folder(tmp_path):
    src = tmp_path / "checkout"
    for folder in ("src", "conf"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(site), str(src)], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), WANDB_MODE="offline")
    where = subprocess.run([sys.executable, "-c", "import sparse_bench; from sparse_bench.confdir import conf_dir; "
                            "print(sparse_bench.__file__); print(conf_dir())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True)
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr
    assert where.stdout.splitlines()[1] == str(site / "sparse_bench" / "conf"), where.stdout  # the wheel's copy
    proc = subprocess.run([str(site / "bin" / "sparse-bench"), "dataset=digits", "model=mlp", "method=set", *TINY,
                           "paths.runs=runs"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (elsewhere / "runs" / "digits-mlp-set-d0.05-s0" / "results.json").exists()
