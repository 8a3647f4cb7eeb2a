"""MNIST and Fashion-MNIST: the four IDX files, read with a small numpy parser.

Both torchvision's layout (``root/MNIST/raw``, ``root/FashionMNIST/raw``, ``root/raw``) and a
flat folder are accepted, files plain or gzipped; ``download=true`` lets torchvision fetch
missing files. The images become normalised float32 ``(N, 1, H, W)`` tensors on the training
device; validation is the last ``round(val_fraction * N)`` training images
(:func:`~sparse_bench.data.common.split_val`).
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sparse_bench import schema as S
from sparse_bench.data.common import (
    DataBundle,
    channel_stats,
    device_bundle,
    find_or_download,
    normalize_,
    resolve_root,
    torchvision_download,
)
from sparse_bench.errors import ConfigError

__all__ = [
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "IDX_SPECS",
    "IdxSpec",
    "build_mnist",
    "find_idx_files",
    "load_idx_split",
    "read_idx",
]

IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


@dataclass(frozen=True)
class IdxSpec:
    """What distinguishes MNIST from Fashion-MNIST on disk and in defaults."""

    label: str  # for messages
    subdir: str  # torchvision's folder under root
    torchvision_class: str


IDX_SPECS = {
    "mnist": IdxSpec("MNIST", "MNIST", "MNIST"),
    "fashion_mnist": IdxSpec("Fashion-MNIST", "FashionMNIST", "FashionMNIST"),
}

#: role -> accepted base names (canonical first, then the dotted variant).
_IDX_FILES: dict[str, tuple[str, ...]] = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def read_idx(path: str | os.PathLike[str], expected_magic: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (optionally gzipped) into a uint8 array.

    Raises :class:`ConfigError` naming ``path`` when the file is truncated,
    not gzip despite its name, or has the wrong magic number.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        if raw[:2] == b"\x1f\x8b":  # gzip, whatever the suffix says
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise ConfigError(
            f"dataset.root: cannot read IDX file {path} ({type(exc).__name__}: {exc}); replace the file"
        ) from None
    if len(raw) < 4:
        raise ConfigError(f"dataset.root: corrupt IDX file {path} (only {len(raw)} bytes); replace the file")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise ConfigError(
            f"dataset.root: corrupt IDX file {path} (magic number 0x{magic:08x}, expected "
            f"0x{expected_magic:08x}); replace the file"
        )
    ndim = expected_magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(f"dataset.root: corrupt IDX file {path} (truncated header); replace the file")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise ConfigError(
            f"dataset.root: corrupt IDX file {path} (header says {dims} = {expected} bytes, "
            f"file has {len(raw)}); replace the file"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _candidate_dirs(root: Path, spec: IdxSpec) -> list[Path]:
    return [root, root / spec.subdir / "raw", root / "raw"]


def _find_in_dir(folder: Path) -> dict[str, Path]:
    """Role -> file for each of the four IDX files present in ``folder``."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for role, bases in _IDX_FILES.items():
        for base in bases:
            for name in (base, base + ".gz"):
                if (folder / name).is_file():
                    found[role] = folder / name
                    break
            if role in found:
                break
    return found


def find_idx_files(root: Path, name: str) -> dict[str, Path] | None:
    """The four IDX files of data set ``name`` under ``root``, or ``None`` if no folder has them all.

    Raises :class:`ConfigError` when a folder holds some but not all four files.
    """
    spec = IDX_SPECS[name]
    partial: tuple[Path, dict[str, Path]] | None = None
    for folder in _candidate_dirs(root, spec):
        found = _find_in_dir(folder)
        if len(found) == len(_IDX_FILES):
            return found
        if found and partial is None:
            partial = (folder, found)
    if partial is not None:
        folder, found = partial
        missing = ", ".join(f"{_IDX_FILES[r][0]}[.gz]" for r in _IDX_FILES if r not in found)
        raise ConfigError(
            f"dataset.root: incomplete {spec.label} files in {folder} (missing {missing}); "
            "put all four IDX files there or set dataset.download=true"
        )
    return None


def _missing_message(root: Path, spec: IdxSpec) -> str:
    where = ", ".join(str(d) for d in _candidate_dirs(root, spec)[:2])
    if not root.exists():
        where += f"; {root} does not exist"
    return (
        f"dataset.root: no {spec.label} files found in {root} (looked for {_IDX_FILES['train_images'][0]}[.gz] "
        f"in {where}); put the four IDX files there or set dataset.download=true"
    )


def _download(root: Path, spec: IdxSpec) -> None:
    """Let torchvision fetch the raw files into ``root/<subdir>/raw``."""
    torchvision_download(spec.torchvision_class, root, spec.label, "put the four IDX files in dataset.root")


def load_idx_split(cfg: Any, name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)`` as CPU uint8 images (N, H, W) and int64 labels."""
    spec = IDX_SPECS[name]
    root = resolve_root(cfg.root)
    files = find_or_download(lambda: find_idx_files(root, name), lambda: _download(root, spec), cfg.download,
                             _missing_message(root, spec))

    arrays = {}
    for role, path in files.items():
        magic = IDX_IMAGES_MAGIC if role.endswith("images") else IDX_LABELS_MAGIC
        arrays[role] = read_idx(path, magic)
    for split in ("train", "test"):
        imgs, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if imgs.shape[0] != labels.shape[0]:
            raise ConfigError(
                f"dataset.root: {files[f'{split}_images']} has {imgs.shape[0]} images but "
                f"{files[f'{split}_labels']} has {labels.shape[0]} labels; replace the mismatched file"
            )
        if labels.size and int(labels.max()) >= 10:
            raise ConfigError(
                f"dataset.root: {files[f'{split}_labels']} has label {int(labels.max())} (expected 0..9); "
                "replace the file"
            )
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise ConfigError(
            f"dataset.root: train images are {arrays['train_images'].shape[1:]} but test images are "
            f"{arrays['test_images'].shape[1:]}; use matching IDX files"
        )
    # np.frombuffer arrays are read-only; torch.from_numpy needs a writable copy.
    return (
        torch.from_numpy(arrays["train_images"].copy()),
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        torch.from_numpy(arrays["test_images"].copy()),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
    )


def build_mnist(cfg: Any, device: torch.device, seed: int) -> DataBundle:
    """MNIST or Fashion-MNIST (``dataset.name``) as normalised float32 ``(N, 1, H, W)`` on ``device``."""
    x_tr, y_tr, x_te, y_te = load_idx_split(cfg, cfg.name)
    stats = channel_stats(cfg, 1)

    def prep(x: Tensor) -> Tensor:
        # Move the compact uint8 data, convert on the device.
        x = x.to(device).unsqueeze(1).to(torch.float32).div_(255.0)
        return normalize_(x, stats)

    return device_bundle(cfg, seed, (prep(x_tr), y_tr.to(device), prep(x_te), y_te.to(device)), num_classes=10)



@dataclass
class IdxSchema(S.DataSchema):
    root: str = S.root()
    download: bool = S.keyed(role=S.VOLATILE)


for _name in IDX_SPECS:
    S.register("dataset", _name, build_mnist, IdxSchema)

#: the data sets this module builds, by ``dataset.name`` (merged into :data:`sparse_bench.data.registry.BUILDERS`)
BUILDERS = {"mnist": build_mnist, "fashion_mnist": build_mnist}
