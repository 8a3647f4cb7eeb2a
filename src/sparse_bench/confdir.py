"""Where the config groups live.

They are the top-level ``conf/`` of a checkout, installed as the package data ``sparse_bench.conf``
(pyproject's package-dir mapping), so an editable install, a wheel and a checkout without
installing (``PYTHONPATH=src``) all find them here: through importlib.resources when the package
is installed, beside ``src/`` otherwise. Hydra is pointed at this folder (``cli``), so the command
line, the tests and the tools read one copy, and the schema fills a partial option in from it
(:func:`option_values`).
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
from pathlib import Path

from omegaconf import OmegaConf


def conf_dir() -> Path:
    """The folder of the config groups (``config.yaml`` and one folder per group)."""
    try:
        found = Path(str(importlib.resources.files("sparse_bench.conf")))
    except ModuleNotFoundError:  # a checkout on PYTHONPATH, not installed
        found = Path(__file__).resolve().parents[2] / "conf"
    return found


def group_options(group: str, root: Path | None = None) -> list[str]:
    """The options of a config group in one config folder (the package's by default)."""
    folder = (root or conf_dir()) / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def option_values(group: str, name) -> dict | None:
    """The values of the built-in option `name` of `group` (``conf/<group>/<name>.yaml``), None when
    there is no such file. These files are the only place a built-in option's defaults are written:
    a builder called directly (a test, a script) with a partial config gets them from here, as a run
    gets them from Hydra."""
    if not isinstance(name, str) or not name or "/" in name:
        return None
    path = conf_dir() / group / f"{name}.yaml"
    if not path.is_file():
        return None
    return OmegaConf.to_container(OmegaConf.load(path))


def config_values() -> dict:
    """The top-level values of ``conf/config.yaml`` (without Hydra's ``defaults`` list and without
    resolving interpolations): the one place the top-level defaults are written. A copy: the
    caller may change it."""
    return copy.deepcopy(_config_values())


@functools.cache
def _config_values() -> dict:
    node = OmegaConf.to_container(OmegaConf.load(conf_dir() / "config.yaml"), resolve=False)
    node.pop("defaults", None)
    return node
