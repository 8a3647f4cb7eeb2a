"""Methods, models and data sets from a user's own package, named in config by ``_target_``.

A config group option of the user's (in their ``--config-dir`` or on ``hydra.searchpath``) names
the Python object that implements it, the way Hydra's ``_target_`` does::

    # myconf/method/mymethod.yaml
    name: mymethod
    _target_: mylab.sparsity.MyMethod        # a sparse_bench.sparsity.methods.Method subclass

    # myconf/model/tiny.yaml
    name: tiny
    _target_: mylab.models.build_tiny         # builder(cfg, input_shape, num_classes) -> nn.Module

    # myconf/dataset/mydata.yaml
    name: mydata
    _target_: mylab.data.build                # builder(cfg, device, seed) -> sparse_bench.data.DataBundle

The package must be importable (installed, on PYTHONPATH, or the current folder under
``python -m sparse_bench``). Options without ``_target_`` are the built-in ones, looked up by
``name``.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from types import ModuleType

from .errors import ConfigError


def package_modules(package: str, path, skip: tuple[str, ...] = ()) -> list[ModuleType]:
    """Every module of the built-in package `package` (its ``__path__`` `path`) but those named in
    `skip`, imported: how the methods, models and data sets register themselves, so a new one is
    its module plus its YAML."""
    return [importlib.import_module(f"{package}.{info.name}") for info in pkgutil.iter_modules(path)
            if info.name not in skip]


def target_of(cfg, group: str):
    """The object `cfg._target_` names, or None when the option has no `_target_`."""
    target = cfg.get("_target_") if hasattr(cfg, "get") else None
    if not target:
        return None
    target = str(target)
    module_name, _, attr = target.rpartition(".")
    if not module_name:
        raise ConfigError(f"{group}._target_={target} must be a dotted path such as mypackage.module.Name")
    if "" not in sys.path and "." not in sys.path:
        sys.path.append("")  # the current folder, as `python -m` has it (the console script does not)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{group}._target_={target}: cannot import {module_name} ({exc}); install the package "
                          f"or add its folder to PYTHONPATH") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{group}._target_={target}: {module_name} has no {attr}") from None
