"""What every data set shares: the :class:`DataBundle` the trainer receives, ``dataset.root``
resolution, normalisation statistics, the train/validation split and the one way tensor data
sets become a bundle of :class:`~sparse_bench.data.loader.DeviceLoader` objects.

Normalisation: ``dataset.normalize`` (``{mean, std}``, one value or one per channel; finite and
std > 0, the schema checked them) or, when it is null, the data set's own statistics, which each
data set's module holds. Validation data is the *last* ``round(val_fraction * n_train)`` training
samples in file order (as in the sparse momentum paper); ImageNet, whose file order is by class,
holds out per class (:mod:`sparse_bench.data.imagenet`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparse_bench.data.loader import BatchTransform, DeviceLoader
from sparse_bench.errors import ConfigError

__all__ = ["DataBundle", "Stats", "channel_stats", "device_bundle", "normalize_", "resolve_root", "split_val"]

#: Per-channel ``(mean, std)``.
Stats = tuple[Sequence[float], Sequence[float]]


@dataclass
class DataBundle:
    """Everything the trainer needs to know about the data.

    Loaders follow one protocol (:class:`DeviceLoader`, or
    :class:`~sparse_bench.data.imagenet.ImageFolderLoader` for ImageNet): ``len()``
    batches, ``set_epoch(epoch)``, ``num_samples``, and iteration yielding
    ``(inputs, int64 labels)`` on the training device.

    ``train_eval`` is the training data with the evaluation transform (no
    augmentation, fixed order), for measuring the training set like the test
    set; ``None`` when ``train`` itself is not augmented.
    """

    train: Any
    val: Any | None
    test: Any
    input_shape: tuple[int, ...]
    num_classes: int
    name: str
    train_eval: Any | None = None

    def check(self) -> DataBundle:
        """Refuse data that would train or measure nothing (one line naming the split): an empty
        split, a training split without one whole batch, fewer than two classes."""
        where = f"dataset={self.name}"
        if int(self.num_classes) < 2:
            raise ConfigError(f"{where} has {self.num_classes} class; a classifier needs at least 2 (an image "
                              f"folder needs one sub-folder per class); check dataset.root")
        for split, loader in (("training", self.train), ("test", self.test), ("validation", self.val)):
            if loader is None:
                continue
            n = int(getattr(loader, "num_samples", 1))
            if n == 0:
                fix = "lower dataset.val_fraction" if split == "validation" else "check dataset.root"
                raise ConfigError(f"the {split} split of {where} holds no samples; {fix}")
        if len(self.train) == 0:
            batch_size = getattr(self.train, "global_batch_size", None) or self.train.batch_size
            raise ConfigError(f"the training split of {where} ({self.train.num_samples} samples) holds no whole "
                              f"batch of dataset.batch_size={batch_size} "
                              f"with dataset.drop_last=true; lower dataset.batch_size or set dataset.drop_last=false")
        return self


def resolve_root(root: str | os.PathLike[str]) -> Path:
    """Absolute path of ``root``: relative to Hydra's original cwd during a Hydra run, else to cwd."""
    path = os.path.expanduser(str(root))
    try:
        from hydra.utils import to_absolute_path

        return Path(to_absolute_path(path))
    except Exception:  # Hydra missing or not initialised
        return Path(os.path.abspath(path))


# --------------------------------------------------------------------------- normalisation


def torchvision_download(class_name: str, target: Path, label: str, instead: str) -> None:
    """Let torchvision's data set class `class_name` fetch its files into `target`; any failure
    (network, permissions, checksum) is one line saying what to do `instead`."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, class_name)
    try:
        target.mkdir(parents=True, exist_ok=True)
        cls(str(target), train=True, download=True)
    except Exception as exc:  # network, permissions, checksum ...
        detail = " ".join(str(exc).split())[:200]
        raise ConfigError(f"dataset.download: downloading {label} into {target} failed ({type(exc).__name__}: "
                          f"{detail}); check network access or {instead} and set dataset.download=false") from None


def find_or_download(find: Callable[[], Any], download: Callable[[], None], allowed: bool, missing: str) -> Any:
    """What ``find()`` locates under a data set's root; when it finds nothing, ``download()`` and look
    again if ``dataset.download`` is true (`allowed`), else the one-line `missing` refusal."""
    found = find()
    if found is None:
        if not allowed:
            raise ConfigError(missing)
        download()
        found = find()
        if found is None:
            raise ConfigError(missing + " (download finished but wrote no files)")
    return found


def channel_stats(cfg: Any, channels: int) -> tuple[list[float], list[float]] | None:
    """Per-channel ``(mean, std)``, ``channels`` values each, from ``dataset.normalize`` (the data
    set's YAML gives its statistics); null: no normalisation.

    Raises :class:`ConfigError` when ``dataset.normalize`` gives neither 1 nor ``channels`` values,
    which only the data can tell.
    """
    norm = cfg.normalize
    if norm is None:
        return None
    mean, std = [float(v) for v in norm.mean], [float(v) for v in norm.std]
    for key, vals in (("mean", mean), ("std", std)):
        if len(vals) not in (1, channels):
            raise ConfigError(
                f"dataset.normalize.{key}: has {len(vals)} values but the data has {channels} channel(s); "
                f"give 1 or {channels} values"
            )
    return (mean * channels if len(mean) == 1 else mean), (std * channels if len(std) == 1 else std)


def normalize_(x: Tensor, stats: tuple[list[float], list[float]] | None) -> Tensor:
    """Apply per-channel ``(x - mean) / std`` along dim 1 of a float tensor (in place)."""
    if stats is None:
        return x
    mean, std = stats
    shape = (1, -1) + (1,) * (x.dim() - 2)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return x.sub_(m).div_(s)


# --------------------------------------------------------------------------- splits and bundles


def split_val(x: Tensor, y: Tensor, val_fraction: float) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``(x_train, y_train, x_val, y_val)``: validation is the last ``round(val_fraction * n)`` samples."""
    n_train = x.shape[0]
    n_val = int(round(val_fraction * n_train))
    if n_val >= n_train:
        raise ConfigError(
            f"dataset.val_fraction: {val_fraction} leaves no training samples out of {n_train}; "
            "lower dataset.val_fraction"
        )
    if n_val == 0:
        return x, y, None, None
    cut = n_train - n_val
    return x[:cut], y[:cut], x[cut:], y[cut:]


def device_bundle(
    cfg: Any,
    seed: int,
    tensors: tuple[Tensor, Tensor, Tensor, Tensor],
    num_classes: int,
    train_transform: BatchTransform | None = None,
    eval_transform: BatchTransform | None = None,
) -> DataBundle:
    """The bundle of a data set held as tensors on the training device.

    ``tensors`` is ``(x_train, y_train, x_test, y_test)``; validation is split off the training
    tensors by ``dataset.val_fraction`` (:func:`split_val`). Training batches are shuffled from
    ``seed`` and go through ``train_transform``, evaluation batches through ``eval_transform``
    (``None``: batches as stored). When the two transforms differ (augmented training),
    ``train_eval`` sees the training tensors through ``eval_transform``.
    """
    batch_size, test_batch_size = cfg.batch_size, cfg.test_batch_size
    x_tr, y_tr, x_te, y_te = tensors
    x_tr, y_tr, x_va, y_va = split_val(x_tr, y_tr, cfg.val_fraction)
    val = None
    if x_va is not None:
        val = DeviceLoader(x_va, y_va, test_batch_size, shuffle=False, transform=eval_transform)
    train_eval = None
    if train_transform is not eval_transform:
        train_eval = DeviceLoader(x_tr, y_tr, test_batch_size, shuffle=True, seed=seed, transform=eval_transform)
    return DataBundle(
        train=DeviceLoader(x_tr, y_tr, batch_size, shuffle=True, seed=seed, drop_last=cfg.drop_last,
                           transform=train_transform),
        val=val,
        test=DeviceLoader(x_te, y_te, test_batch_size, shuffle=False, transform=eval_transform),
        input_shape=tuple(int(s) for s in x_tr.shape[1:]),
        num_classes=int(num_classes),
        name=str(cfg.name),
        train_eval=train_eval,
    )
