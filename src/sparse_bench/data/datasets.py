"""Data sets as device-resident tensors.

:func:`build_data` turns the ``dataset`` config group into a :class:`DataBundle`
of train / validation / test :class:`~sparse_bench.data.loader.DeviceLoader`
objects.  Supported data sets:

``mnist`` / ``fashion_mnist``
    Read from the four IDX files (plain or gzipped) with a small numpy parser;
    both torchvision's layout (``root/MNIST/raw``, ``root/FashionMNIST/raw``,
    ``root/raw``) and a flat folder are accepted.  ``download=true`` lets
    torchvision fetch missing files.
``digits``
    scikit-learn's bundled 8x8 digits (no network), with a fixed train/test
    split that depends on ``split_seed`` only.
``synthetic``
    Gaussian clusters around random class prototypes; deterministic in
    ``data_seed`` and learnable by a linear model.
``cifar10`` / ``cifar100``
    torchvision's python-pickle files (:mod:`sparse_bench.data.cifar`), kept as
    ``uint8`` on the device and augmented there batch by batch
    (:mod:`sparse_bench.data.augment`).
``imagenet``
    ``root/train/<wnid>/*``, ``root/val/<wnid>/*`` through a multi-worker
    ``DataLoader`` (:mod:`sparse_bench.data.imagenet`).

Validation data is the *last* ``round(val_fraction * n_train)`` training
samples, in file order (as in the sparse momentum paper); for ImageNet, whose
file order is by class, the last files of every class.  The ``dataset`` node is
checked and typed by its schema (``sparse_bench.schema``: types, ranges and the
defaults of the data set's YAML) before anything is read, so the readers take
typed values; what only the files can tell (missing or corrupt files, channel
counts, splits that leave a part empty) is a one-line
:class:`~sparse_bench.errors.ConfigError` naming the key and the fix.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sparse_bench.data.loader import DeviceLoader
from sparse_bench.errors import ConfigError

__all__ = [
    "DATASETS",
    "DataBundle",
    "build_data",
    "find_idx_files",
    "load_digits_split",
    "load_idx_split",
    "make_synthetic",
    "read_idx",
    "resolve_root",
]

#: Names accepted by ``dataset.name``.
DATASETS = ("mnist", "fashion_mnist", "digits", "synthetic", "cifar10", "cifar100", "imagenet")
_CIFAR = ("cifar10", "cifar100")

IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


@dataclass(frozen=True)
class _IdxSpec:
    """What distinguishes MNIST from Fashion-MNIST on disk and in defaults."""

    label: str  # for messages
    subdir: str  # torchvision's folder under root
    torchvision_class: str
    mean: float
    std: float


_IDX_SPECS = {
    "mnist": _IdxSpec("MNIST", "MNIST", "MNIST", 0.1307, 0.3081),
    "fashion_mnist": _IdxSpec("Fashion-MNIST", "FashionMNIST", "FashionMNIST", 0.2860, 0.3530),
}

#: role -> accepted base names (canonical first, then the dotted variant).
_IDX_FILES: dict[str, tuple[str, ...]] = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}

_DIGITS_MEAN, _DIGITS_STD = 0.3, 0.4


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

    def check(self) -> "DataBundle":
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
            raise ConfigError(f"the training split of {where} ({self.train.num_samples} samples) holds no whole "
                              f"batch of dataset.batch_size={getattr(self.train, 'global_batch_size', None) or self.train.batch_size} "
                              f"with dataset.drop_last=true; lower dataset.batch_size or set dataset.drop_last=false")
        return self


# --------------------------------------------------------------------------- normalisation


def _normalization(cfg: Any, channels: int, default: tuple[Any, Any] | None) -> tuple[list[float], list[float]] | None:
    """Per-channel (mean, std) from ``dataset.normalize`` (finite, std > 0: the schema checked them),
    or the data set's own statistics when it is null.

    Returns ``None`` when neither the config nor the data set asks for normalisation.
    """
    norm = cfg.normalize
    if norm is None:
        if default is None:
            return None
        return [default[0]], [default[1]]
    mean, std = [float(v) for v in norm.mean], [float(v) for v in norm.std]
    for key, vals in (("mean", mean), ("std", std)):  # the data's channel count: only known here
        if len(vals) not in (1, channels):
            raise ConfigError(
                f"dataset.normalize.{key}: has {len(vals)} values but the data has {channels} channel(s); "
                f"give 1 or {channels} values"
            )
    return mean, std


def _channel_stats(
    cfg: Any, channels: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[list[float], list[float]]:
    """Per-channel ``(mean, std)``, ``channels`` values each: ``dataset.normalize``, or the given
    statistics when it is null."""
    if cfg.normalize is None:
        return [float(m) for m in mean], [float(s) for s in std]
    stats = _normalization(cfg, channels, (list(mean), list(std)))
    assert stats is not None
    m, s = stats
    return (m * channels if len(m) == 1 else m), (s * channels if len(s) == 1 else s)


def _normalize(x: Tensor, stats: tuple[list[float], list[float]] | None) -> Tensor:
    """Apply per-channel ``(x - mean) / std`` along dim 1 of a float tensor (in place)."""
    if stats is None:
        return x
    mean, std = stats
    shape = (1, -1) + (1,) * (x.dim() - 2)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return x.sub_(m).div_(s)


# --------------------------------------------------------------------------- IDX files


def resolve_root(root: str | os.PathLike[str]) -> Path:
    """Absolute path of ``root``: relative to Hydra's original cwd during a Hydra run, else to cwd."""
    path = os.path.expanduser(str(root))
    try:
        from hydra.utils import to_absolute_path

        return Path(to_absolute_path(path))
    except Exception:  # Hydra missing or not initialised
        return Path(os.path.abspath(path))


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


def _candidate_dirs(root: Path, spec: _IdxSpec) -> list[Path]:
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
    spec = _IDX_SPECS[name]
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


def _missing_message(root: Path, spec: _IdxSpec) -> str:
    where = ", ".join(str(d) for d in _candidate_dirs(root, spec)[:2])
    if not root.exists():
        where += f"; {root} does not exist"
    return (
        f"dataset.root: no {spec.label} files found in {root} (looked for {_IDX_FILES['train_images'][0]}[.gz] "
        f"in {where}); put the four IDX files there or set dataset.download=true"
    )


def _download(root: Path, spec: _IdxSpec) -> None:
    """Let torchvision fetch the raw files into ``root/<subdir>/raw``."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, spec.torchvision_class)
    try:
        root.mkdir(parents=True, exist_ok=True)
        cls(str(root), train=True, download=True)
    except Exception as exc:  # network, permissions, checksum ...
        detail = " ".join(str(exc).split())[:200]
        raise ConfigError(
            f"dataset.download: downloading {spec.label} into {root} failed ({type(exc).__name__}: {detail}); "
            "check network access or put the four IDX files in dataset.root and set dataset.download=false"
        ) from None


def load_idx_split(cfg: Any, name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)`` as CPU uint8 images (N, H, W) and int64 labels."""
    spec = _IDX_SPECS[name]
    root = resolve_root(cfg.root)
    files = find_idx_files(root, name)
    if files is None:
        if not cfg.download:
            raise ConfigError(_missing_message(root, spec))
        _download(root, spec)
        files = find_idx_files(root, name)
        if files is None:
            raise ConfigError(_missing_message(root, spec) + " (download finished but wrote no files)")

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


def _idx_tensors(cfg: Any, name: str, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MNIST-like data as normalised float32 (N, 1, H, W) on ``device``."""
    spec = _IDX_SPECS[name]
    x_tr, y_tr, x_te, y_te = load_idx_split(cfg, name)
    stats = _normalization(cfg, 1, (spec.mean, spec.std))

    def prep(x: Tensor) -> Tensor:
        # Move the compact uint8 data, convert on the device.
        x = x.to(device).unsqueeze(1).to(torch.float32).div_(255.0)
        return _normalize(x, stats)

    return prep(x_tr), y_tr.to(device), prep(x_te), y_te.to(device)


# --------------------------------------------------------------------------- digits


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images (1797, 8, 8) with values 0..16 and their labels, as
    ``sklearn.datasets.load_digits()`` gives them. Read from the CSV file scikit-learn ships,
    found without importing scikit-learn, whose import costs about a second per process (every
    digits run pays it). If the file is not where it is expected, scikit-learn's own loader runs."""
    import importlib.util

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
            f"dataset.test_fraction: {test_fraction} leaves no test samples out of {n}; set e.g. dataset.test_fraction=0.2"
        )
    gen = torch.Generator().manual_seed(split_seed)
    perm = torch.randperm(n, generator=gen)
    tr, te = perm[: n - n_test], perm[n - n_test :]
    return x[tr], y[tr], x[te], y[te]


def _digits_tensors(cfg: Any, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x_tr, y_tr, x_te, y_te = load_digits_split(cfg)
    stats = _normalization(cfg, 1, (_DIGITS_MEAN, _DIGITS_STD))
    return (
        _normalize(x_tr.to(device), stats),
        y_tr.to(device),
        _normalize(x_te.to(device), stats),
        y_te.to(device),
    )


# --------------------------------------------------------------------------- synthetic


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


def _synthetic_tensors(cfg: Any, device: torch.device) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], int]:
    shape, num_classes = tuple(cfg.input_shape), cfg.num_classes
    x_tr, y_tr, x_te, y_te = make_synthetic(shape, num_classes, cfg.n_train, cfg.n_test, cfg.data_seed, cfg.noise)
    stats = _normalization(cfg, shape[0], None)
    tensors = (
        _normalize(x_tr.to(device), stats),
        y_tr.to(device),
        _normalize(x_te.to(device), stats),
        y_te.to(device),
    )
    return tensors, num_classes


# --------------------------------------------------------------------------- entry point


def _split_val(x: Tensor, y: Tensor, val_fraction: float) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
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


def _cifar_bundle(
    cfg: Any, name: str, device: torch.device, seed: int, batch_size: int, test_batch_size: int, val_fraction: float
) -> DataBundle:
    from sparse_bench.data.cifar import IMAGE_SHAPE, CIFAR_SPECS, cifar_transforms, load_cifar_split

    spec = CIFAR_SPECS[name]
    train_tf, eval_tf = cifar_transforms(cfg, name)
    drop_last = cfg.drop_last
    x_tr, y_tr, x_te, y_te = load_cifar_split(cfg, name)
    # uint8 on the device (4x smaller than float); the transforms convert and normalise per batch
    x_tr, y_tr, x_te, y_te = (t.to(device) for t in (x_tr, y_tr, x_te, y_te))
    x_tr, y_tr, x_va, y_va = _split_val(x_tr, y_tr, val_fraction)
    val = None
    if x_va is not None:
        val = DeviceLoader(x_va, y_va, test_batch_size, shuffle=False, transform=eval_tf)
    augmented = train_tf is not eval_tf
    return DataBundle(
        train=DeviceLoader(x_tr, y_tr, batch_size, shuffle=True, seed=seed, drop_last=drop_last, transform=train_tf),
        val=val,
        test=DeviceLoader(x_te, y_te, test_batch_size, shuffle=False, transform=eval_tf),
        input_shape=IMAGE_SHAPE,
        num_classes=spec.num_classes,
        name=name,
        train_eval=DeviceLoader(x_tr, y_tr, test_batch_size, shuffle=True, seed=seed, transform=eval_tf)
        if augmented else None,
    )


def build_data(cfg: Any, device: torch.device, seed: int) -> DataBundle:
    """Build the train / val / test loaders described by the ``dataset`` config group.

    Args:
        cfg: the ``dataset`` group (DictConfig or dict), checked here by its schema (a key given
            neither here nor by the caller takes the data set's YAML value).
        device: where every batch is delivered (and where tensor data sets live).
        seed: run seed; only the training order (and augmentation) depends on it.
    """
    from sparse_bench.plugins import target_of
    from sparse_bench.schema import check_option

    builder = target_of(cfg, "dataset")  # a user's data set, named by dataset._target_
    cfg = check_option("dataset", cfg)
    if builder is not None:
        bundle = builder(cfg, torch.device(device), seed)
        if not isinstance(bundle, DataBundle):
            raise ConfigError(f"dataset._target_={cfg.get('_target_')} must return a sparse_bench.data.DataBundle")
        return bundle.check()
    name = cfg.name
    device = torch.device(device)
    batch_size, test_batch_size, val_fraction = cfg.batch_size, cfg.test_batch_size, cfg.val_fraction

    if name in _CIFAR:
        return _cifar_bundle(cfg, name, device, seed, batch_size, test_batch_size, val_fraction).check()
    if name == "imagenet":
        from sparse_bench.data.imagenet import build_imagenet

        return build_imagenet(cfg, device, seed, batch_size, test_batch_size, val_fraction).check()

    if name in _IDX_SPECS:
        x_tr, y_tr, x_te, y_te = _idx_tensors(cfg, name, device)
        num_classes = 10
    elif name == "digits":
        x_tr, y_tr, x_te, y_te = _digits_tensors(cfg, device)
        num_classes = 10
    else:
        (x_tr, y_tr, x_te, y_te), num_classes = _synthetic_tensors(cfg, device)

    x_tr, y_tr, x_va, y_va = _split_val(x_tr, y_tr, val_fraction)
    val = None
    if x_va is not None:
        val = DeviceLoader(x_va, y_va, test_batch_size, shuffle=False)

    return DataBundle(
        train=DeviceLoader(x_tr, y_tr, batch_size, shuffle=True, seed=seed, drop_last=cfg.drop_last),
        val=val,
        test=DeviceLoader(x_te, y_te, test_batch_size, shuffle=False),
        input_shape=tuple(int(s) for s in x_tr.shape[1:]),
        num_classes=int(num_classes),
        name=str(name),
    ).check()
