"""The data sets by name, and :func:`build_data`, which turns the ``dataset`` config group into a
:class:`~sparse_bench.data.common.DataBundle` of train / validation / test loaders.

:data:`BUILDERS` maps ``dataset.name`` to the data set's builder, ``builder(cfg, device, seed) ->
DataBundle`` (the signature of a user's data set, too):

``mnist`` / ``fashion_mnist``
    the four IDX files (:mod:`sparse_bench.data.mnist`).
``digits``
    scikit-learn's bundled 8x8 digits (:mod:`sparse_bench.data.digits`).
``synthetic``
    Gaussian clusters around random class prototypes (:mod:`sparse_bench.data.synthetic`).
``cifar10`` / ``cifar100``
    torchvision's python-pickle files, kept as ``uint8`` on the device and augmented there batch
    by batch (:mod:`sparse_bench.data.cifar`, :mod:`sparse_bench.data.augment`).
``imagenet``
    ``root/train/<wnid>/*``, ``root/val/<wnid>/*`` through a multi-worker ``DataLoader``
    (:mod:`sparse_bench.data.imagenet`).

A user's data set is named by ``dataset._target_`` instead (:mod:`sparse_bench.plugins`). The
``dataset`` node is checked and typed by its schema (``sparse_bench.schema``: types, ranges and
the defaults of the data set's YAML) before anything is read, so the builders take typed values;
what only the files can tell (missing or corrupt files, channel counts, splits that leave a part
empty) is a one-line :class:`~sparse_bench.errors.ConfigError` naming the key and the fix.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sparse_bench.data.common import DataBundle
from sparse_bench.errors import ConfigError
from sparse_bench.plugins import package_modules, target_of
from sparse_bench.schema import check_option

__all__ = ["BUILDERS", "DataBuilder", "build_data"]

#: ``builder(cfg, device, seed) -> DataBundle``: ``cfg`` is the checked ``dataset`` group.
DataBuilder = Callable[[Any, torch.device, int], DataBundle]

#: ``dataset.name`` -> builder of the data sets shipped here: every module of this package may define
#: ``BUILDERS = {name: builder}``, merged here, so a data set is one module plus its YAML in conf/dataset/
#: (and its option schema, registered beside the builder: ``schema.register("dataset", name, builder, schema)``).
BUILDERS: dict[str, DataBuilder] = {}
for _mod in package_modules(__package__, [str(Path(__file__).parent)], skip=(__name__.rsplit(".", 1)[-1],)):
    BUILDERS.update(getattr(_mod, "BUILDERS", {}))


def build_data(cfg: Any, device: torch.device, seed: int) -> DataBundle:
    """Build the train / val / test loaders described by the ``dataset`` config group.

    Args:
        cfg: the ``dataset`` group (DictConfig or dict), checked here by its schema (a key given
            neither here nor by the caller takes the data set's YAML value).
        device: where every batch is delivered (and where tensor data sets live).
        seed: run seed; only the training order (and augmentation) depends on it.
    """
    user = target_of(cfg, "dataset")  # a user's data set, named by dataset._target_
    cfg = check_option("dataset", cfg)
    builder = user if user is not None else BUILDERS[cfg.name]
    bundle = builder(cfg, torch.device(device), seed)
    if not isinstance(bundle, DataBundle):  # only a user's builder can return something else
        raise ConfigError(f"dataset._target_={cfg.get('_target_')} must return a sparse_bench.data.DataBundle")
    return bundle.check()
