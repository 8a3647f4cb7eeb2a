"""A paper row run exactly as shipped is compared with its paper.

What defines a run is declared once (each key's role in the schema) and resume, the provenance's
recipe departures, the tables, sweep folder names and Hydra's ``exclude_keys`` derive from it; a
run's config and its experiment's recipe are typed alike, so an unmodified row has no departures;
protocol values the reference sets per density resolve to the run's density; and, through the
command line, an unmodified row lands in the table beside the published number."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import OmegaConf
from test_data import make_arrays, write_dataset

from sparse_bench import identity, schema, tables
from sparse_bench.cli import sweep_dirname_override
from sparse_bench.errors import ConfigError
from sparse_bench.provenance import departures, recipe_of
from sparse_bench.reproduce import command, density_values
from sparse_bench.run import validate

from conftest import CONF, cli_here, compose, tiered

ROW = "sm_mnist_lenet300_100"


def typed(overrides: list[str]) -> dict:
    """The config a run of `overrides` writes to config.json (checked and typed by the schema)."""
    return OmegaConf.to_container(validate(compose(overrides)))


# --- one declaration of what defines a run ----------------------------------------------------------
def test_every_top_level_key_and_group_declares_its_role():
    undeclared = [f.name for f in dataclasses.fields(schema.Root) if f.metadata.get("role") not in schema.ROLES]
    assert undeclared == [], f"declare role= for {undeclared} in sparse_bench.schema.Root"
    assert set(schema.GROUP_ROLES) == {"method", *schema.GROUPS}
    # every top-level key a run's config has is a schema key, hence declared
    run = typed([f"experiment={ROW}"])
    assert set(run) - set(schema.GROUP_ROLES) <= {f.name for f in dataclasses.fields(schema.Root)}


def test_hydra_and_sweep_folder_names_leave_out_what_the_roles_say():
    excluded = identity.folder_name_excluded()
    assert {"threads", "progress", "log_every", "device", "paths.runs", "logger", "logger.mode", "logger.project",
            "run_name", "sweep_name", "resume", "optimized_metric", "dataset.root", "dataset.num_workers", "seed",
            "density", "method", "model", "model.arch", "dataset"} <= set(excluded)
    assert not {"schedule.epochs", "optimizer.lr", "execution", "limit_train_batches", "method.prune_rate",
                "dataset.batch_size", "eval.train_samples"} & set(excluded)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[], return_hydra_config=True)
    assert list(cfg.hydra.job.config.override_dirname.exclude_keys) == excluded
    # a sweep's command line adds the keys it does not vary
    assert sweep_dirname_override(["-m", "density=0.1,0.2", "schedule.epochs=3"]) == [
        f"hydra.job.config.override_dirname.exclude_keys=[{','.join([*excluded, 'schedule.epochs'])}]"]


def test_resume_and_the_tables_compare_by_the_roles():
    base = typed([f"experiment={ROW}"])
    for override in ("threads=1", "progress=false", "logger=none", "device=cpu", "paths.runs=/x", "run_name=n",
                     "dataset.root=/data"):
        other = typed([f"experiment={ROW}", override])
        assert identity.run_identity(other) == identity.run_identity(base), override  # resume goes on
        assert identity.recipe(other) == identity.recipe(base), override
    for override in ("execution=sparse", "eval.train_samples=0", "dataset.test_batch_size=50"):  # detail
        other = typed([f"experiment={ROW}", override])
        assert identity.run_identity(other) != identity.run_identity(base), override  # resume refuses
        assert identity.recipe(other) == identity.recipe(base), override  # same table row, no departure
    for override in ("seed=1", "density=0.01"):  # axes: another run of the same recipe
        other = typed([f"experiment={ROW}", override])
        assert identity.run_identity(other) != identity.run_identity(base)
        assert identity.recipe(other) == identity.recipe(base)
    other = typed([f"experiment={ROW}", "schedule.epochs=5"])
    assert [k for k, _, _ in identity.diff(identity.recipe(base), identity.recipe(other))] == ["schedule.epochs"]


# --- departures: like with like ---------------------------------------------------------------------
NOT_DEPARTURES = ["dataset.root=/data/mnist", "threads=1", "progress=false", "log_every=7", "device=cpu",
                  "logger=none", "logger.mode=offline", "run_name=x", "sweep_name=y", "resume=false",
                  "optimized_metric=val/acc", "paths.runs=/tmp/elsewhere", "execution=sparse",
                  "eval.train_samples=0", "dataset.test_batch_size=50", "density=0.01", "seed=3"]


@pytest.mark.parametrize("override", tiered(NOT_DEPARTURES, every=3))
def test_an_unmodified_row_has_no_departures_whatever_the_volatile_keys(override):
    run = typed([f"experiment={ROW}", override])
    assert departures(recipe_of(ROW, run["density"], run["seed"]), run) == []


@pytest.mark.parametrize("overrides,expected", [
    (["schedule.epochs=5"], ["schedule.epochs=5"]),
    (["method.prune_rate=0.3", "limit_train_batches=2"], ["limit_train_batches=2", "method.prune_rate=0.3"]),
    (["dataset=fashion_mnist"], ["dataset=fashion_mnist"]),
    (["method=set"], ["method=set"]),
])
def test_a_real_change_is_a_departure(overrides, expected):
    run = typed([f"experiment={ROW}", *overrides])
    assert departures(recipe_of(ROW, run["density"], run["seed"]), run) == expected


@pytest.mark.parametrize("row", ["demo", "cmp_cifar10_wrn28_2_set", "gse_cifar100_resnet56_topkast",
                                 "sm_imagenet_resnet50", "acdc_imagenet_resnet50"])
def test_rows_as_shipped_have_no_departures(row):
    run = typed([f"experiment={row}"])
    assert departures(recipe_of(row, run["density"], run["seed"]), run) == []


# --- protocol values that depend on the density -------------------------------------------------------
@pytest.mark.parametrize("row,density,rate", [
    ("cmp_cifar10_wrn28_2_set", 0.1, 0.138), ("cmp_cifar10_wrn28_2_set", 0.3, 0.046),
    ("sm_imagenet_resnet50_set", 0.1, 0.14), ("sm_imagenet_resnet50_set", 0.2, 0.089),
])
def test_the_rewire_fraction_is_the_references_for_the_density_given(row, density, rate):
    # TimDettmers/sparse_learning imagenet/baseline/experiments/{wrnet,resnet}_experiments.yaml: one
    # --rewire-fraction per density's command
    run = typed([f"experiment={row}", f"density={density}"])
    assert run["method"]["prune_rate"] == rate
    assert departures(recipe_of(row, density, 0), run) == []


def test_a_density_the_reference_does_not_list_is_refused_in_one_line_and_a_hand_value_departs():
    with pytest.raises(ConfigError) as exc:
        typed(["experiment=cmp_cifar10_wrn28_2_set", "density=0.05"])
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("method.prune_rate depends on the density")
    assert "0.1, 0.2, 0.3, 0.4, 0.5" in msg and "method.prune_rate=<value>" in msg
    run = typed(["experiment=cmp_cifar10_wrn28_2_set", "density=0.05", "method.prune_rate=0.2"])
    assert run["method"]["prune_rate"] == 0.2
    assert recipe_of("cmp_cifar10_wrn28_2_set", 0.05, 0) is None  # no recipe at a density it does not list
    run = typed(["experiment=cmp_cifar10_wrn28_2_set", "density=0.2", "method.prune_rate=0.2"])
    assert departures(recipe_of("cmp_cifar10_wrn28_2_set", 0.2, 0), run) == ["method.prune_rate=0.2"]


def test_reproduce_runs_every_density_with_its_own_value():
    cmd = command("cmp_cifar10_wrn28_2_set", 1, None, [])
    densities = next(a for a in cmd if a.startswith("density=")).split("=", 1)[1].split(",")
    assert densities == ["0.1", "0.2", "0.3", "0.4", "0.5"]
    want = {"0.1": 0.138, "0.2": 0.07, "0.3": 0.046, "0.4": 0.034, "0.5": 0.028}
    for d in densities:  # each job of the sweep composes as the command gives it
        assert typed(["experiment=cmp_cifar10_wrn28_2_set", f"density={d}"])["method"]["prune_rate"] == want[d]
    assert density_values("cmp_cifar10_wrn28_2_set") == [f"density {d}: method.prune_rate={want[d]}"
                                                          for d in densities]
    assert density_values(ROW) == []


def test_cfg_job_resolve_shows_the_value_for_the_density(tmp_path, capsys, monkeypatch):
    from sparse_bench import cli as command_line

    monkeypatch.chdir(tmp_path)
    assert command_line.main(["experiment=cmp_cifar10_wrn28_2_set", "density=0.2", "--cfg", "job", "--resolve"]) == 0
    assert "  prune_rate: 0.07\n" in capsys.readouterr().out
    assert command_line.main(["experiment=cmp_cifar10_wrn28_2_set", "density=0.05", "--cfg", "job", "--resolve"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: method.prune_rate depends on the density")
    assert not list(tmp_path.iterdir())


# --- through the command line into the table -----------------------------------------------------------
def _cells_at(md: str, density: str) -> dict:
    """{row label: (ours, paper, Δ)} at one density of a Markdown table."""
    lines = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    at = header.index(f"d={density}")
    assert header[at + 1: at + 3] == ["paper", "Δ"]
    rows = ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])
    return {cells[0]: tuple(cells[at: at + 3]) for cells in rows}


def test_an_unmodified_row_lands_in_the_table_beside_its_paper(tmp_path, capsys):
    root = tmp_path / "mnist"
    write_dataset(root, make_arrays(), gz=True)
    row = [f"experiment={ROW}", f"dataset.root={root}"]
    # as shipped, but for the data root (and no W&B, which the recipe does not include)
    shipped = cli_here([*row, "logger=none"], cwd=tmp_path)
    assert shipped.returncode == 0, shipped.stderr
    folder = tmp_path / "runs" / "mnist-lenet300_100-sparse_momentum-d0.05-s0"
    log = (folder / "sparse_bench.log").read_text()
    assert "departures" not in log
    prov = json.loads((folder / "provenance.json").read_text())
    assert prov["experiment"] == ROW and prov["recipe_departures"] == []
    result = json.loads((folder / "results.json").read_text())
    assert result["paper"]["value"] == 1.53 and result["paper"]["metric"] == "test/error"
    # one sweep, two jobs: another seed with every volatile key changed at once (the same row), and
    # the same with a real change (its own marked row, no paper value)
    volatile = ["seed=1", "threads=1", "progress=false", "log_every=3", "device=cpu", "logger=none",
                "resume=false", "optimized_metric=val/acc", "eval.train_samples=0", "sweep_name=volatile"]
    sweep = cli_here(["-m", *row, *volatile, "schedule.epochs=100,2"], cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr
    provs = {json.loads(p.read_text())["recipe_departures"] == [] for p in
             (tmp_path / "runs" / "multirun" / "volatile").rglob("provenance.json")}
    assert provs == {True, False}
    assert tables.main([str(tmp_path / "runs"), "--out", str(tmp_path / "tables")]) == 0
    cells = _cells_at((tmp_path / "tables" / "sm_mnist.md").read_text(), "0.05")
    ours, paper, delta = cells["LeNet-300-100"]
    assert ours.endswith("(n=2)") and paper == "1.53 ± 0.02" and delta.startswith(("+", "-"))
    ours, paper, delta = cells[f"LeNet-300-100 {tables.DAGGER} [schedule.epochs=2]"]
    assert ours.endswith("(n=1)") and paper == "" and delta == ""
    capsys.readouterr()


def test_reproduce_passes_a_launcher_and_overrides_through_its_own_flags(capsys):
    from sparse_bench.reproduce import main

    assert main(["sm_mnist_lenet300_100", "--seeds", "1", "--launcher", "submitit_slurm", "--gpus", "4",
                 "--partition", "gpu", "--time-min", "60", "--set", "dataset.root=/data", "--dry-run", "--",
                 "hydra.launcher.account=lab"]) == 0
    cmd = capsys.readouterr().out.strip().splitlines()[-1]
    for part in ("hydra/launcher=submitit_slurm", "hydra.launcher.tasks_per_node=4", "hydra.launcher.gpus_per_node=4",
                 "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=60", "hydra.launcher.max_num_timeout=20",
                 "dataset.root=/data", "hydra.launcher.account=lab"):
        assert part in cmd.split(), part
    with pytest.raises(SystemExit, match="submitit"):
        main(["sm_mnist_lenet300_100", "--gpus", "2", "--dry-run"])
