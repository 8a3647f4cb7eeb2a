"""CIFAR-10 and CIFAR-100 from torchvision's python-pickle files, kept on the training device.

On disk (what ``torchvision.datasets.CIFAR10/100(download=True)`` leaves, and what
the original tarballs contain)::

    <root>/cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch, batches.meta
    <root>/cifar-100-python/train, test, meta

``dataset.root`` may name that folder itself or its parent.  Every data file is a
Python-2 pickle of a dict with byte-string keys: ``b'data'`` a ``uint8`` array
``(N, 3072)`` whose rows are the red, green and blue 32x32 planes one after the
other (so a row reshapes to ``(3, 32, 32)`` directly), and the labels as a list
of ints under ``b'labels'`` (CIFAR-10) or ``b'fine_labels'`` (CIFAR-100; the 20
coarse labels are not used).  The reader here unpickles with ``encoding='bytes'``
through an unpickler that only resolves the numpy names such arrays need, so a
tampered file cannot run code, and checks every array against the format.

Loaders (:func:`build_cifar`): the images stay ``uint8`` on the device (150 MB for CIFAR's 50,000
training images); each batch is augmented and normalised there by a
:mod:`~sparse_bench.data.augment` transform seeded from ``(seed, epoch, batch)``.
Validation data, when ``val_fraction > 0``, is the last ``round(val_fraction * N)``
training images in file order and is never augmented; the papers (sparse
momentum, GSE) report test accuracy, so the default is no validation split.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import MISSING
from torch import Tensor

from sparse_bench import schema as S
from sparse_bench.data.augment import CropFlip, Normalize
from sparse_bench.data.common import (
    DataBundle,
    channel_stats,
    device_bundle,
    find_or_download,
    resolve_root,
    torchvision_download,
)
from sparse_bench.errors import ConfigError

__all__ = [
    "CIFAR_SPECS",
    "IMAGE_SHAPE",
    "CifarSpec",
    "build_cifar",
    "cifar_transforms",
    "find_cifar_folder",
    "load_cifar_split",
    "read_cifar_file",
]

IMAGE_SHAPE = (3, 32, 32)


@dataclass(frozen=True)
class CifarSpec:
    """What distinguishes CIFAR-10 from CIFAR-100 on disk and in defaults."""

    label: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    meta_file: str
    names_key: bytes
    num_classes: int
    torchvision_class: str


CIFAR_SPECS = {
    "cifar10": CifarSpec(
        "CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
        b"labels", "batches.meta", b"label_names", 10, "CIFAR10",
    ),
    "cifar100": CifarSpec(
        "CIFAR-100", "cifar-100-python", ("train",), ("test",),
        b"fine_labels", "meta", b"fine_label_names", 100, "CIFAR100",
    ),
}


# --------------------------------------------------------------------------- reading


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only what pickled numpy arrays and Python-2 strings need."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> Any:
    try:
        raw = path.read_bytes()
        return _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # truncated, not a pickle, foreign objects ...
        detail = " ".join(str(exc).split())[:150]
        raise ConfigError(
            f"dataset.root: cannot read CIFAR file {path} ({type(exc).__name__}: {detail}); "
            "replace it with the file from the official python-version archive"
        ) from None


def read_cifar_file(path: str | Path, spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 (N, 3, 32, 32)`` and labels ``int64 (N,)`` from one CIFAR pickle file.

    Raises :class:`ConfigError` naming ``path`` when the file does not follow the format.
    """
    path = Path(path)
    obj = _unpickle(path)

    def bad(what: str) -> ConfigError:
        return ConfigError(f"dataset.root: {path} is not a {spec.label} batch file ({what}); replace the file")

    if not isinstance(obj, dict):
        raise bad(f"holds a {type(obj).__name__}, expected a dict")
    if b"data" not in obj or spec.label_key not in obj:
        keys = ", ".join(repr(k) for k in list(obj)[:6])
        raise bad(f"keys {keys}; expected b'data' and {spec.label_key!r}")
    data, labels = obj[b"data"], obj[spec.label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise bad(f"b'data' is {desc}, expected uint8 (N, 3072)")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise bad(f"{spec.label_key!r} is not a list of integers") from None
    if y.ndim != 1 or y.shape[0] != data.shape[0]:
        raise bad(f"{data.shape[0]} images but {y.size} labels")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= spec.num_classes):
        raise bad(f"label {int(y.max()) if y.max() >= spec.num_classes else int(y.min())} "
                  f"outside 0..{spec.num_classes - 1}")
    return np.ascontiguousarray(data).reshape(-1, *IMAGE_SHAPE), y


def _check_meta(path: Path, spec: CifarSpec) -> None:
    """If the meta file is there, it must list one name per class."""
    if not path.is_file():
        return
    obj = _unpickle(path)
    names = obj.get(spec.names_key) if isinstance(obj, dict) else None
    if not isinstance(names, list) or len(names) != spec.num_classes:
        count = len(names) if isinstance(names, list) else "no"
        raise ConfigError(
            f"dataset.root: {path} has {count} {spec.names_key!r} entries, expected {spec.num_classes} "
            f"(is it a {spec.label} folder?); replace the file"
        )


# --------------------------------------------------------------------------- locating


def _data_files(spec: CifarSpec) -> tuple[str, ...]:
    return spec.train_files + spec.test_files


def find_cifar_folder(root: Path, spec: CifarSpec) -> Path | None:
    """The folder holding the data files: ``root`` itself or ``root/<folder>``; ``None`` if neither.

    Raises :class:`ConfigError` when a folder holds some but not all of the files.
    """
    for folder in (root, root / spec.folder):
        if not folder.is_dir():
            continue
        present = [name for name in _data_files(spec) if (folder / name).is_file()]
        if len(present) == len(_data_files(spec)):
            return folder
        if present:
            missing = ", ".join(n for n in _data_files(spec) if n not in present)
            raise ConfigError(
                f"dataset.root: incomplete {spec.label} folder {folder} (missing {missing}); "
                f"put all of {', '.join(_data_files(spec))} there or set dataset.download=true"
            )
    return None


def _missing_message(root: Path, spec: CifarSpec) -> str:
    where = f"{root} and {root / spec.folder}"
    if not root.exists():
        where += f"; {root} does not exist"
    return (
        f"dataset.root: no {spec.label} files found (looked for {spec.train_files[0]} in {where}); "
        f"set dataset.root to the folder holding {spec.folder} (or to that folder) or set dataset.download=true"
    )


def _download(root: Path, spec: CifarSpec) -> None:
    """Let torchvision fetch and unpack the python-version archive into ``root``."""
    target = root.parent if root.name == spec.folder else root
    torchvision_download(spec.torchvision_class, target, spec.label, "unpack the archive into dataset.root")


def load_cifar_split(cfg: Any, name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``: CPU ``uint8 (N, 3, 32, 32)`` images and ``int64`` labels."""
    spec = CIFAR_SPECS[name]
    root = resolve_root(cfg.root)
    folder = find_or_download(lambda: find_cifar_folder(root, spec), lambda: _download(root, spec), cfg.download,
                              _missing_message(root, spec))
    _check_meta(folder / spec.meta_file, spec)

    def read(files: tuple[str, ...]) -> tuple[Tensor, Tensor]:
        parts = [read_cifar_file(folder / f, spec) for f in files]
        x = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        y = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        return torch.from_numpy(np.array(x, copy=True)), torch.from_numpy(y)

    x_tr, y_tr = read(spec.train_files)
    x_te, y_te = read(spec.test_files)
    return x_tr, y_tr, x_te, y_te


# --------------------------------------------------------------------------- transforms


def cifar_transforms(cfg: Any, name: str) -> tuple[CropFlip | Normalize, Normalize]:
    """``(train_transform, eval_transform)`` from ``dataset.augment`` and ``dataset.normalize``
    (checked by the schema: padding in [0, 31] for 32x32 images, pad_mode zeros or reflect).

    ``dataset.augment`` is ``{crop, padding, pad_mode, flip}``; ``{crop: false, flip: false}``
    turns augmentation off.
    """
    mean, std = channel_stats(cfg, 3) or (None, None)
    eval_tf = Normalize(mean, std, scale=255.0)
    aug = cfg.augment
    train_tf = CropFlip(mean, std, pad=aug.padding if aug.crop else 0, pad_mode=aug.pad_mode, flip=aug.flip,
                        scale=255.0)
    if train_tf.identity:
        return eval_tf, eval_tf
    return train_tf, eval_tf


# --------------------------------------------------------------------------- entry point


def build_cifar(cfg: Any, device: torch.device, seed: int) -> DataBundle:
    """CIFAR-10 or CIFAR-100 (``dataset.name``): ``uint8`` images on ``device``, augmented and
    normalised batch by batch (:func:`cifar_transforms`)."""
    train_tf, eval_tf = cifar_transforms(cfg, cfg.name)
    x_tr, y_tr, x_te, y_te = load_cifar_split(cfg, cfg.name)
    # uint8 on the device (4x smaller than float); the transforms convert and normalise per batch
    tensors = (x_tr.to(device), y_tr.to(device), x_te.to(device), y_te.to(device))
    return device_bundle(cfg, seed, tensors, CIFAR_SPECS[cfg.name].num_classes, train_tf, eval_tf)



@dataclass
class AugmentSchema:
    crop: bool = MISSING
    padding: int = S.count(ge=0, le=31, hint="pixels of padding for the random crop, e.g. 4")
    pad_mode: str = S.choice(("zeros", "reflect"), hint="zeros (GSE) or reflect (sparse momentum)")
    flip: bool = MISSING


@dataclass
class CifarSchema(S.DataSchema):
    root: str = S.root()
    download: bool = S.keyed(role=S.VOLATILE)
    augment: AugmentSchema = MISSING


for _name in CIFAR_SPECS:
    S.register("dataset", _name, build_cifar, CifarSchema)

#: the data sets this module builds, by ``dataset.name`` (merged into :data:`sparse_bench.data.registry.BUILDERS`)
BUILDERS = {"cifar10": build_cifar, "cifar100": build_cifar}
