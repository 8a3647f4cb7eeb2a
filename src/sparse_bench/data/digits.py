"""scikit-learn's bundled 8x8 digits (1,797 images, no network), with a fixed train/test split
that depends on ``dataset.split_seed`` only.

The images become normalised float32 ``(N, 1, 8, 8)`` tensors on the training device;
validation is the last ``round(val_fraction * n_train)`` samples of the training part
(:func:`~sparse_bench.data.common.split_val`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sparse_bench import schema as S
from sparse_bench.data.common import DataBundle, channel_stats, device_bundle, normalize_
from sparse_bench.errors import ConfigError

__all__ = ["build_digits", "digits_arrays", "load_digits_split"]

#: Normalisation statistics of the images scaled to [0, 1] (one channel).


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images (1797, 8, 8) with values 0..16 and their labels, as
    ``sklearn.datasets.load_digits()`` gives them. Read from the CSV file scikit-learn ships,
    found without importing scikit-learn, whose import costs about a second per process (every
    digits run pays it). If the file is not where it is expected, scikit-learn's own loader runs."""
    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")
            if table.ndim == 2 and table.shape[1] == 65:
                return table[:, :64].reshape(-1, 8, 8), table[:, 64].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


def load_digits_split(cfg: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 8x8 digits as CPU float32 (N, 1, 8, 8) in [0, 1] and int64 labels.

    The split is a permutation from a generator seeded with ``dataset.split_seed``
    (default 0): the last ``round(test_fraction * N)`` permuted samples are the test set.
    """
    split_seed, test_fraction = cfg.split_seed, cfg.test_fraction
    images, target = digits_arrays()
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(np.asarray(target, dtype=np.int64))
    n = x.shape[0]
    n_test = int(round(test_fraction * n))
    if n_test < 1:
        raise ConfigError(
            f"dataset.test_fraction: {test_fraction} leaves no test samples out of {n}; "
            "set e.g. dataset.test_fraction=0.2"
        )
    gen = torch.Generator().manual_seed(split_seed)
    perm = torch.randperm(n, generator=gen)
    tr, te = perm[: n - n_test], perm[n - n_test :]
    return x[tr], y[tr], x[te], y[te]


def build_digits(cfg: Any, device: torch.device, seed: int) -> DataBundle:
    """The digits as normalised float32 ``(N, 1, 8, 8)`` on ``device``."""
    x_tr, y_tr, x_te, y_te = load_digits_split(cfg)
    stats = channel_stats(cfg, 1)
    tensors = (normalize_(x_tr.to(device), stats), y_tr.to(device), normalize_(x_te.to(device), stats), y_te.to(device))
    return device_bundle(cfg, seed, tensors, num_classes=10)



@dataclass
class DigitsSchema(S.DataSchema):
    test_fraction: float = S.num(gt=0.0, lt=1.0)
    split_seed: int = S.count(ge=0)


S.register("dataset", "digits", build_digits,
           DigitsSchema)

#: the data sets this module builds, by ``dataset.name`` (merged into :data:`sparse_bench.data.registry.BUILDERS`)
BUILDERS = {"digits": build_digits}
