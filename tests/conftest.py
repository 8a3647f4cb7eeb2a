"""Shared test helpers: config composition and running the CLI in a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_bench.confdir import conf_dir

ROOT = Path(__file__).resolve().parents[1]
CONF = conf_dir()
FASHION = Path("/usr/share/datasets/fashion-mnist")

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest workers on two cores (pytest-xdist): each worker, and every process
    # a test starts (inheriting OMP_NUM_THREADS), computes on one torch thread, so they do not fight
    # over the cores; tests that are about threads set their own
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def compose(overrides: list[str]):
    """The config `python -m sparse_bench <overrides>` would run, without Hydra's run dir."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def experiment_overrides(name: str) -> list[str]:
    """The overrides that run experiment `name`: the row, and a placeholder for each input the row
    leaves to the user (a key whose value is ``${sb.required:...}``, e.g. the dense model a
    ``*_from_dense`` row prunes)."""
    from omegaconf import OmegaConf

    # read from the row's own file (composing all rows at collection time took half a minute)
    raw = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{name}.yaml"), resolve=False)
    inputs = []

    def walk(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, str) and v.startswith("${sb.required:"):
                inputs.append(f"{prefix}{k}")

    walk({k: v for k, v in raw.items() if k != "defaults"})
    return [f"experiment={name}", *(f"{k}=/inputs/{k}" for k in inputs)]


class Crash(RuntimeError):
    """A run killed right after an epoch's checkpoint was written (tests of resume)."""


@contextlib.contextmanager
def killed_after(monkeypatch, epoch: int):
    """Inside: every run raises Crash right after writing the checkpoint of `epoch`; outside,
    Trainer.save is the real one again."""
    from sparse_bench.train import trainer as trainer_mod

    real_save = trainer_mod.Trainer.save

    def save_then_crash(self):
        real_save(self)
        if self.epoch == epoch:
            raise Crash(f"killed after epoch {epoch}")

    monkeypatch.setattr(trainer_mod.Trainer, "save", save_then_crash)
    try:
        yield
    finally:
        monkeypatch.setattr(trainer_mod.Trainer, "save", real_save)


def choices(runs: list[list[str]]) -> list[dict]:
    """For each list of overrides, the group options (``hydra.runtime.choices``) `compose` would
    pick, from Hydra's defaults list alone (a fifth of the time of composing, for parametrising at
    collection time)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        return [dict(loader.compute_defaults_list("config", o, RunMode.RUN).overrides.known_choices) for o in runs]


def cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "sparse_bench", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def cli_here(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m sparse_bench <args>` run from `cwd` by the command line's own entry point
    (``cli.main``: the precheck, Hydra, the job, the exit status) in this process, its stdout and
    stderr captured: what `cli` returns, without a new interpreter's import of torch (seconds a
    test). Tests about the process itself (signals, installs, launchers, W&B's service) use `cli`."""
    import contextlib
    import io
    import logging
    import signal

    import torch

    from sparse_bench import cli as entry

    out, err = io.StringIO(), io.StringIO()
    here, argv, threads = os.getcwd(), sys.argv[:], torch.get_num_threads()
    handlers, on_term = logging.getLogger().handlers[:], signal.getsignal(signal.SIGTERM)
    on_usr1 = signal.getsignal(signal.SIGUSR1)
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = entry.main(list(args))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(here)
        sys.argv = argv
        torch.set_num_threads(threads)
        logging.getLogger().handlers[:] = handlers
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGUSR1, on_usr1)
    return subprocess.CompletedProcess(["sparse_bench", *args], code, out.getvalue(), err.getvalue())


def run_in_process(args: list[str]) -> dict:
    """`python -m sparse_bench <args>` run in this process with one torch thread (as a torchrun
    rank runs with OMP_NUM_THREADS=1): the single-process reference a DDP test starts while its
    torchrun job is still running, instead of a third process start after it."""
    import torch

    from sparse_bench.run import run

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(compose(args))
    finally:
        torch.set_num_threads(before)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and tensors: intra-op threads only add contention on a busy machine
    (a module asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fast_overrides(tmp_path):
    """Overrides for a tiny CPU run writing into a temporary runs folder."""
    return ["logger=none", "progress=false", "device=cpu", f"paths.runs={tmp_path / 'runs'}"]


# names whose use means a test starts other processes (the CLI, torchrun, pip): such tests are
# `slow`, left out of `make test-fast` (the quick tier while working) and run by `make test`
_PROCESS_HELPERS = {"cli", "subprocess", "_torchrun", "spawn"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        fn = getattr(item, "function", None)
        names = set(getattr(getattr(fn, "__code__", None), "co_names", ()))
        if names & _PROCESS_HELPERS:
            item.add_marker(pytest.mark.slow)


def tiered(values, every: int = 4, ids=None):
    """Parameters for a long parametrized test: all of them run in `make test`, one in `every`
    also in the quick tier (the others are marked slow)."""
    out = []
    for i, v in enumerate(values):
        args = v if isinstance(v, tuple) else (v,)
        out.append(pytest.param(*args, id=None if ids is None else ids(v),
                                marks=() if i % every == 0 else pytest.mark.slow))
    return out


@pytest.fixture(autouse=True)
def _no_hydra_job_left_behind():
    """A test that runs the command line in this process (``cli.main``) leaves Hydra's job config
    and global state set; later tests in the same worker then see a Hydra job that is over."""
    yield
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().cfg = None
    GlobalHydra.instance().clear()


@pytest.fixture(autouse=True)
def _no_process_group_variables_left_behind():
    """A test must not leave torchrun's variables in this worker's environment: every later run
    (and every process it starts) would take itself for one rank of a distributed job and wait."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    before = {k: os.environ.get(k) for k in keys}
    yield
    leaked = [k for k in keys if os.environ.get(k) != before[k]]
    assert not leaked, f"the test left {leaked} set in the environment"
