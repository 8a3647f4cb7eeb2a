"""What made a result: code version, package versions, command line, experiment and recipe.

``provenance(resolved)`` is written to ``provenance.json`` when a run starts and into
``results.json`` when it ends:

* ``git``: the commit of the checkout this package runs from and whether tracked files differ
  from it (``dirty``); both null for an installed copy outside a git checkout.
* ``versions``: python, torch, torchvision, hydra-core, omegaconf, wandb, timm, sparse_bench.
* ``command``: the command that reruns this job alone (``python -m sparse_bench`` plus the job's
  own overrides, one job of a sweep included); ``argv`` the process's command line as typed.
* ``experiment``: the ``experiment=`` choice (null without one), and ``recipe_departures``: the
  settings in which this run differs from that experiment's recipe at the same density and seed,
  as ``key=value`` (a whole group as ``dataset=fashion_mnist``), found by composing the
  experiment's config afresh, typing it by the same schema as the run's, and comparing the keys
  whose role is ``recipe`` (``sparse_bench.identity``): where the data lives, logging, device,
  threads, progress and measurement extras are not departures. Null when the recipe could not be
  composed (no experiment, or no Hydra).
"""

from __future__ import annotations

import logging
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from . import identity
from .confdir import conf_dir
from .errors import MissingInput
from .identity import diff, shown
from .schema import GROUP_ROLES, RECIPE
from .validation import check

log = logging.getLogger("sparse_bench")

PACKAGES = ("torch", "torchvision", "hydra-core", "omegaconf", "wandb", "timm", "sparse_bench")


def git_state(where: Path | None = None) -> dict:
    """{'commit', 'dirty'} of the checkout holding this package, or nulls outside one."""
    here = Path(where or Path(__file__).resolve().parent)

    def git(*args) -> str:
        return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel"))
        if not (top / "src" / "sparse_bench").is_dir():
            return {"commit": None, "dirty": None}
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if out.get("sparse_bench") is None:
        from . import __version__

        out["sparse_bench"] = __version__
    return out


def hydra_job() -> dict | None:
    """The running Hydra job's experiment choice, task overrides and what else the command line
    gave Hydra to find its configs (``--config-dir``, ``--config-name``, ``hydra.searchpath``), or
    None outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    choices = dict(hc.runtime.choices or {})
    options = []
    for source in hc.runtime.config_sources or []:
        if source.get("provider") == "command-line":
            options += ["--config-dir", str(source.get("path"))]
    if hc.job.config_name not in (None, "config"):
        options += ["--config-name", str(hc.job.config_name)]
    searchpath = [o for o in (hc.overrides.hydra or []) if o.lstrip("+~").startswith("hydra.searchpath")]
    return {"experiment": choices.get("experiment"), "overrides": list(hc.overrides.task or []),
            "options": options + searchpath, "config_name": hc.job.config_name or "config"}


def departures(recipe: dict, config: dict) -> list[str]:
    """`key=value` for every recipe key in which `config` differs from `recipe` (both typed by the
    schema); a group swapped for another option is one entry, ``group=option``."""
    groups = [g for g, role in GROUP_ROLES.items() if role == RECIPE]
    swapped = [g for g in groups if (recipe.get(g) or {}).get("name") != (config.get(g) or {}).get("name")]
    out = [f"{g}={(config.get(g) or {}).get('name')}" for g in swapped]
    for key, _, value in diff(identity.recipe(recipe), identity.recipe(config)):
        if key.split(".")[0] not in swapped:
            out.append(f"{key}={shown(value)}")
    return out


def recipe_of(experiment: str, density, seed, config_name: str = "config", init_from=None) -> dict | None:
    """The experiment's config at this density and seed (and, for a row that starts from a trained
    model, this run's ``init_from``: the row's input, not a departure), composed afresh and typed by
    the schema (None when it cannot be composed)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    overrides = [f"experiment={experiment}", f"density={density}", f"seed={seed}"]

    def composed(extra: list[str]) -> dict:
        if GlobalHydra.instance().is_initialized():  # the run's own search path (--config-dir ...)
            cfg = compose(config_name=config_name, overrides=overrides + extra)
        else:
            with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
                cfg = compose(config_name=config_name, overrides=overrides + extra)
        return OmegaConf.to_container(check(cfg))  # typed as the run's config is: like with like

    try:
        try:
            return composed([])
        except MissingInput as exc:  # a row whose input is the model it starts from: the run's is its input
            if init_from is None or exc.key != "init_from":
                raise
            return composed([f"init_from={init_from}"])
    except Exception as exc:  # an experiment that no longer composes: say so, record null
        log.info(f"provenance: the recipe of experiment={experiment} could not be composed ({type(exc).__name__})")
        return None


def provenance(resolved: dict, experiment: str | None = None, overrides: list[str] | None = None) -> dict:
    """The provenance block of a run (see the module docstring). `experiment` and `overrides`
    default to the running Hydra job's."""
    job = hydra_job()
    options: list[str] = []
    config_name = "config"
    if job is not None:
        experiment = job["experiment"] if experiment is None else experiment
        overrides = job["overrides"] if overrides is None else overrides
        options, config_name = job["options"], job["config_name"]
    recipe = (recipe_of(experiment, resolved.get("density"), resolved.get("seed"), config_name,
                        resolved.get("init_from"))
              if experiment else None)
    return {
        "git": git_state(),
        "versions": versions(),
        "command": (shlex.join(["python", "-m", "sparse_bench", *options, *overrides])
                    if overrides is not None else None),
        "argv": list(sys.argv),
        "experiment": experiment,
        "recipe_departures": departures(recipe, resolved) if recipe is not None else None,
    }
