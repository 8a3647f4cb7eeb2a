"""Synthetic data: Gaussian clusters around random class prototypes, deterministic in
``dataset.data_seed`` and learnable by a linear model; not normalised unless
``dataset.normalize`` asks for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, List

import torch
from torch import Tensor

from sparse_bench import schema as S
from sparse_bench.data.common import DataBundle, channel_stats, device_bundle, normalize_

__all__ = ["build_synthetic", "make_synthetic"]


def make_synthetic(
    input_shape: Sequence[int],
    num_classes: int,
    n_train: int,
    n_test: int,
    data_seed: int = 0,
    noise: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gaussian clusters: ``x = prototype[y] + noise * N(0, 1)``, all on CPU.

    Prototypes are drawn from ``N(0, 1)`` with the input shape; labels are
    exactly balanced (``i mod num_classes``) and randomly permuted.  Everything
    comes from one generator seeded with ``data_seed``, independent of the run seed.
    """
    gen = torch.Generator().manual_seed(int(data_seed))
    shape = tuple(int(s) for s in input_shape)
    protos = torch.randn((num_classes, *shape), generator=gen)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        y = torch.arange(n, dtype=torch.int64) % num_classes
        y = y[torch.randperm(n, generator=gen)]
        x = protos[y] + noise * torch.randn((n, *shape), generator=gen)
        return x, y

    x_tr, y_tr = draw(n_train)
    x_te, y_te = draw(n_test)
    return x_tr, y_tr, x_te, y_te


def build_synthetic(cfg: Any, device: torch.device, seed: int) -> DataBundle:
    """``dataset.n_train`` / ``n_test`` samples of ``dataset.input_shape`` in ``dataset.num_classes``
    classes, as float32 on ``device``; the first input dimension counts as the channels."""
    shape = tuple(cfg.input_shape)
    x_tr, y_tr, x_te, y_te = make_synthetic(shape, cfg.num_classes, cfg.n_train, cfg.n_test, cfg.data_seed, cfg.noise)
    stats = channel_stats(cfg, shape[0])
    tensors = (normalize_(x_tr.to(device), stats), y_tr.to(device), normalize_(x_te.to(device), stats), y_te.to(device))
    return device_bundle(cfg, seed, tensors, num_classes=cfg.num_classes)



@dataclass
class SyntheticSchema(S.DataSchema):
    input_shape: List[int] = S.widths(hint="e.g. [1,28,28] or [3,32,32]")
    num_classes: int = S.count(ge=2)
    n_train: int = S.count(ge=1)
    n_test: int = S.count(ge=1)
    data_seed: int = S.count(ge=0)
    noise: float = S.num(ge=0.0)


S.register("dataset", "synthetic", build_synthetic, SyntheticSchema)

#: the data sets this module builds, by ``dataset.name`` (merged into :data:`sparse_bench.data.registry.BUILDERS`)
BUILDERS = {"synthetic": build_synthetic}
