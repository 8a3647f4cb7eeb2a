"""ImageNet (ILSVRC-2012) from class folders, decoded by DataLoader worker processes.

Layout (what the usual preparation scripts produce)::

    <root>/train/<wnid>/*.JPEG      1,281,167 images in 1,000 class folders
    <root>/val/<wnid>/*.JPEG        50,000 images, sorted into the same class folders

Class indices follow the sorted folder names of ``train/`` (torchvision's
``ImageFolder`` convention, so index 0 is n01440764 on the real data); ``val/``
is scanned with the same mapping.  Any of torchvision's image extensions is
accepted, so tests can use small PNGs.

Pipeline: ``ImageFolder``'s scan gives the file list, which is stored compactly
(one bytes blob + offsets, so forked workers do not copy a million Python
objects); ``torch.utils.data.DataLoader`` with ``num_workers`` worker processes
(persistent, pinned memory on CUDA) decodes with PIL and transforms:

* train: random resized crop to ``image_size`` (scale 0.08-1, aspect 3/4-4/3,
  torchvision's algorithm: ten tries, then a centre crop), horizontal flip with
  probability 1/2, ``ToTensor``, normalise with the ImageNet mean/std;
* evaluation: resize the shorter side to ``round(image_size / 0.875)`` (256 for
  224), centre crop ``image_size``, ``ToTensor``, normalise.

Determinism: the sampler draws the epoch's order from a ``torch.Generator``
seeded by ``(seed, epoch)`` (a ``RandomSampler``, or a ``DistributedSampler``
when ``torch.distributed`` is initialised), and hands every index to the workers
together with a per-sample seed derived from ``(seed, epoch, index)``; the random
crop and flip draw from a generator with that seed, never from a worker's global
RNG.  So the batches of an epoch are the same for any ``num_workers`` and after a
resume.  Validation (``val_fraction > 0``) holds out the last
``round(val_fraction * n_c)`` training files of every class ``c`` (file order
within a class folder), since ImageFolder order is by class; the test split is ``val/``.

Statistics batches (:meth:`ImageFolderLoader.draw`, read by GSE, SNIP, GraSP and RigL under
GSE's protocol) come from a separate, short-lived ``DataLoader`` over a seeded draw of files
(order and augmentation seeds from ``(seed, key)``), never from the training iterator: with
persistent workers a second ``iter()`` of the training ``DataLoader`` would reset the shared
iterator and restart the epoch in progress. They are global batches on every rank.

Under ``torch.distributed`` the loaders are *sharded*: each rank reads its own
samples, the training batch per rank is ``batch_size / world_size`` (so
``dataset.batch_size`` stays the global batch) and evaluation splits the files
without padding.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from sparse_bench import schema as S
from sparse_bench.data.common import DataBundle, channel_stats, resolve_root
from sparse_bench.data.loader import STATS_STREAM, StatBatches, epoch_seed, mix_seed, splitmix64
from sparse_bench.errors import ConfigError, RunFailed

__all__ = [
    "EvalTransform",
    "ImageFolderLoader",
    "ImageList",
    "TrainTransform",
    "build_imagenet",
    "scan_split",
]

#: Tag separating the per-sample augmentation seeds from other uses of ``mix_seed``.
_SAMPLE_STREAM = 0x696D67


# --------------------------------------------------------------------------- file lists


class ImageList:
    """``(path, class index)`` pairs stored as one bytes blob, offsets and an int64 array."""

    def __init__(self, samples: Sequence[tuple[str, int]]) -> None:
        encoded = [os.fsencode(p) for p, _ in samples]
        self._blob = b"".join(encoded)
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self.targets = np.asarray([t for _, t in samples], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def path(self, i: int) -> str:
        return os.fsdecode(self._blob[self._offsets[i] : self._offsets[i + 1]])

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageList:
        return ImageList([(self.path(int(i)), int(self.targets[i])) for i in indices])


def _image_extensions() -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return IMG_EXTENSIONS


def _class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def scan_split(folder: Path, class_to_idx: dict[str, int] | None = None) -> tuple[ImageList, list[str]]:
    """Scan ``folder/<class>/*`` like ``torchvision.datasets.ImageFolder``.

    With ``class_to_idx`` (from the training split), the folder's classes must be a
    subset of it and labels use that mapping.  Raises :class:`ConfigError`.
    """
    from torchvision.datasets.folder import make_dataset

    exts = _image_extensions()
    if not folder.is_dir():
        raise ConfigError(
            f"dataset.root: {folder} is missing; dataset.root must hold train/<wnid>/*.JPEG and val/<wnid>/*.JPEG"
        )
    classes = _class_folders(folder)
    if not classes:
        loose = sum(1 for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(exts))
        hint = (f" but {loose} loose images: sort them into one folder per class (wnid)" if loose else "")
        raise ConfigError(
            f"dataset.root: no class folders in {folder}{hint}; dataset.root must hold "
            "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG"
        )
    if class_to_idx is None:
        mapping = {c: i for i, c in enumerate(classes)}
    else:
        unknown = [c for c in classes if c not in class_to_idx]
        if unknown:
            raise ConfigError(
                f"dataset.root: {folder} has class folders not in train/ ({', '.join(unknown[:3])}"
                f"{', ...' if len(unknown) > 3 else ''}); use the same class folders in train/ and val/"
            )
        mapping = {c: class_to_idx[c] for c in classes}
    try:
        samples = make_dataset(str(folder), mapping, extensions=exts, allow_empty=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"dataset.root: cannot scan {folder} ({type(exc).__name__}: {exc}); fix the folder") from None
    if class_to_idx is None:
        counts = np.bincount(np.asarray([t for _, t in samples], dtype=np.int64), minlength=len(mapping))
        empty = [c for c, i in mapping.items() if counts[i] == 0]
        if empty:
            raise ConfigError(
                f"dataset.root: class folder(s) without images in {folder} ({', '.join(empty[:3])}"
                f"{', ...' if len(empty) > 3 else ''}; extensions {', '.join(exts)}); remove them or add images"
            )
    if not samples:
        raise ConfigError(f"dataset.root: no images in the class folders of {folder}; add images ({', '.join(exts)})")
    return ImageList(samples), sorted(mapping, key=mapping.__getitem__)


# --------------------------------------------------------------------------- transforms


class UnreadableImage(RunFailed):
    """An image file that does not decode: one line naming it (exit status 1; the last finished
    epoch's checkpoint stays). Raised in a DataLoader worker it comes back wrapped in the worker's
    traceback; the message keeps only the line that names the file."""

    def __init__(self, message: str):
        lines = [line for line in str(message).strip().splitlines() if line.strip()]
        last = lines[-1] if lines else str(message)
        super().__init__(last.split("UnreadableImage: ", 1)[-1])


def _load_rgb(path: str):
    from PIL import Image

    try:
        with open(path, "rb") as fh:
            img = Image.open(fh)
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) and path not in str(exc) else ""
        raise UnreadableImage(f"cannot read the image {path} ({type(exc).__name__}{': ' + detail if detail else ''}); "
                              f"replace it with a readable image, or remove it and start over (resume=false)") from None


def _normalized(x: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> Tensor:
    """``dataset.normalize`` applied to a [0, 1] image tensor (null: as it is)."""
    import torchvision.transforms.functional as TF

    return x if mean is None else TF.normalize(x, list(mean), list(std))


class TrainTransform:
    """Random resized crop + horizontal flip + ToTensor + normalise, drawing from a given generator."""

    random = True

    def __init__(
        self,
        size: int,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
    ) -> None:
        self.size = int(size)
        self.mean, self.std = mean, std
        self.scale, self.ratio, self.flip = scale, ratio, bool(flip)

    def crop_params(self, height: int, width: int, u: list[float]) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop parameters ``(top, left, h, w)`` from 40 uniforms."""
        area = height * width
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for t in range(10):
            a, r, ui, uj = u[4 * t : 4 * t + 4]
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * a)
            aspect = math.exp(lo + (hi - lo) * r)
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return int(ui * (height - h + 1)), int(uj * (width - w + 1)), h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img, generator: torch.Generator) -> Tensor:
        import torchvision.transforms.functional as TF

        u = torch.rand(41, generator=generator, dtype=torch.float64).tolist()
        top, left, h, w = self.crop_params(img.height, img.width, u)
        img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
        if self.flip and u[40] < 0.5:
            img = TF.hflip(img)
        return _normalized(TF.to_tensor(img), self.mean, self.std)

    def __repr__(self) -> str:
        return f"TrainTransform(size={self.size}, scale={self.scale}, flip={self.flip})"


class EvalTransform:
    """Resize the shorter side, centre crop, ToTensor, normalise (no randomness)."""

    random = False

    def __init__(self, size: int, resize: int, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        self.size, self.resize = int(size), int(resize)
        self.mean, self.std = mean, std

    def __call__(self, img, generator: torch.Generator | None = None) -> Tensor:
        import torchvision.transforms.functional as TF

        img = TF.center_crop(TF.resize(img, self.resize, antialias=True), [self.size, self.size])
        return _normalized(TF.to_tensor(img), self.mean, self.std)

    def __repr__(self) -> str:
        return f"EvalTransform(resize={self.resize}, size={self.size})"


# --------------------------------------------------------------------------- dataset / sampler


class _SeededImages(Dataset):
    """Items are fetched by ``(index, sample_seed)`` so augmentation never touches global RNG."""

    def __init__(self, images: ImageList, transform: TrainTransform | EvalTransform) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        index, sample_seed = key
        img = _load_rgb(self.images.path(index))
        gen = torch.Generator().manual_seed(sample_seed) if self.transform.random else None
        return self.transform(img, gen), int(self.images.targets[index])


class _JpegBytes(Dataset):
    """``dataset.decoder=gpu``: items are a file's bytes and the crop the PIL path would take
    (the same 41 uniforms of the same sample seed, from the image's header size), decoded later
    in batches on the device (:class:`DeviceDecode`)."""

    def __init__(self, images: ImageList, transform: TrainTransform | EvalTransform) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor, int]:
        import torchvision
        from PIL import Image

        index, sample_seed = key
        path = self.images.path(index)
        data = torchvision.io.read_file(path)
        with Image.open(path) as img:  # the header only: no decoding here
            width, height = img.size
        if self.transform.random:
            u = torch.rand(41, generator=torch.Generator().manual_seed(sample_seed), dtype=torch.float64).tolist()
            top, left, h, w = self.transform.crop_params(height, width, u)
            flip = int(self.transform.flip and u[40] < 0.5)
        else:
            top, left, h, w, flip = 0, 0, height, width, 0
        return data, torch.tensor([top, left, h, w, flip]), int(self.images.targets[index])


def _collate_bytes(batch):
    """The files' bytes stay a list (their lengths differ); crops and labels are stacked."""
    return [b[0] for b in batch], torch.stack([b[1] for b in batch]), torch.tensor([b[2] for b in batch])


class DeviceDecode:
    """Decodes a batch of JPEG files with torchvision's batched decoder on `device` (nvJPEG on
    CUDA) and applies the transform's crop, resize, flip and normalisation there: the PIL path's
    augmentations (the same crops and flips), with torch's antialiased resize instead of PIL's."""

    def __init__(self, transform: TrainTransform | EvalTransform, device: torch.device) -> None:
        self.transform, self.device = transform, torch.device(device)

    def __call__(self, datas: list[Tensor], crops: Tensor) -> Tensor:
        import torchvision
        import torchvision.transforms.v2.functional as TF

        rgb = torchvision.io.ImageReadMode.RGB
        try:
            images = torchvision.io.decode_jpeg(datas, mode=rgb, device=self.device)
        except RuntimeError:  # a file in the batch that is no baseline JPEG (a PNG named .JPEG): one at a time
            images = [torchvision.io.decode_image(d, mode=rgb).to(self.device) for d in datas]
        size = self.transform.size
        out = []
        for img, (top, left, h, w, flip) in zip(images, crops.tolist()):
            if self.transform.random:
                img = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
                if flip:
                    img = TF.horizontal_flip(img)
            else:
                img = TF.center_crop(TF.resize(img, self.transform.resize, antialias=True), [size, size])
            out.append(img)
        x = torch.stack(out).float().div_(255.0)
        mean, std = self.transform.mean, self.transform.std
        if mean is not None:
            x = TF.normalize(x, list(mean), list(std))
        return x


class DaliDecode:
    """``dataset.decoder=dali``: the batch decoded by an NVIDIA DALI pipeline (nvJPEG through DALI's
    ``mixed`` decoder on CUDA, its CPU decoder otherwise) that decodes only the crop window the PIL
    path would take (``decoders.image_slice``), resizes it with DALI's antialiased resize, flips and
    normalises it: the same crops and flips as :class:`DeviceDecode`. Evaluation resizes the shorter
    side and centre-crops with DALI's operators. DALI is an optional extra (``pip install '.[dali]'``);
    the pipeline is built on the first batch and fed through external sources, so the order, the
    sharding and the per-sample seeds stay those of this module's sampler."""

    def __init__(self, transform: TrainTransform | EvalTransform, device: torch.device, max_batch: int) -> None:
        self.transform, self.device, self.max_batch = transform, torch.device(device), int(max_batch)
        self.pipe = None

    def _build(self):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        cuda = self.device.type == "cuda"
        device_id = None
        if cuda:
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        tf, size = self.transform, self.transform.size
        scale = [255.0 * m for m in tf.mean] if tf.mean is not None else [0.0, 0.0, 0.0]
        spread = [255.0 * s for s in tf.std] if tf.std is not None else [255.0, 255.0, 255.0]
        decoder = "mixed" if cuda else "cpu"

        @pipeline_def(batch_size=self.max_batch, num_threads=max(1, min(4, os.cpu_count() or 1)),
                      device_id=device_id, prefetch_queue_depth=1)
        def pipeline():
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8)
            if tf.random:
                anchor = fn.external_source(name="anchor", dtype=types.FLOAT)
                shape = fn.external_source(name="shape", dtype=types.FLOAT)
                mirror = fn.external_source(name="mirror", dtype=types.INT32)
                img = fn.decoders.image_slice(jpegs, anchor, shape, device=decoder, output_type=types.RGB,
                                              normalized_anchor=False, normalized_shape=False, axis_names="WH")
                img = fn.resize(img, resize_x=size, resize_y=size, antialias=True)
            else:  # torchvision's resize of the shorter side and centre crop, sizes computed on the host
                resized = fn.external_source(name="resized", dtype=types.FLOAT)
                anchor = fn.external_source(name="anchor", dtype=types.FLOAT)
                img = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
                img = fn.resize(img, size=resized, antialias=True)
                img = fn.slice(img, anchor, [float(size), float(size)], axis_names="WH",
                               normalized_anchor=False, normalized_shape=False)
                mirror = 0
            return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW",
                                            mean=scale, std=spread, mirror=mirror)

        pipe = pipeline()
        pipe.build()
        return pipe

    def __call__(self, datas: list[Tensor], crops: Tensor) -> Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        if self.pipe is None:
            self.pipe = self._build()
        self.pipe.feed_input("jpegs", [d.numpy() for d in datas])
        if self.transform.random:
            top, left, h, w, flip = crops.to(torch.int64).unbind(1)
            self.pipe.feed_input("anchor", list(torch.stack([left, top], 1).float().numpy()))
            self.pipe.feed_input("shape", list(torch.stack([w, h], 1).float().numpy()))
            self.pipe.feed_input("mirror", list(flip.to(torch.int32).numpy()))
        else:
            self._feed_centre_crops(crops)
        (out,) = self.pipe.run()
        if self.device.type == "cuda":
            out = out.as_tensor()
            x = torch.empty(out.shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(out, x, cuda_stream=torch.cuda.current_stream(self.device))
            return x
        out = out.as_tensor()
        x = torch.empty(out.shape(), dtype=torch.float32)
        feed_ndarray(out, x)
        return x


    def _feed_centre_crops(self, crops: Tensor) -> None:
        """Each image's resized (width, height) and centre-crop corner, as torchvision computes them."""
        import torchvision.transforms.functional as TF

        size, resized, anchor = self.transform.size, [], []
        for _, _, height, width, _ in crops.tolist():
            new_h, new_w = TF._compute_resized_output_size((height, width), [self.transform.resize])
            resized.append(np.array([new_h, new_w], dtype=np.float32))
            left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
            anchor.append(np.array([left, top], dtype=np.float32))
        self.pipe.feed_input("resized", resized)
        self.pipe.feed_input("anchor", anchor)


def dali_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


DECODERS = ("pil", "gpu", "dali")


class _ListSampler(Sampler):
    """Yields a fixed list of ``(index, sample_seed)`` keys (a statistics draw)."""

    def __init__(self, keys: list[tuple[int, int]]) -> None:
        self.keys = keys

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.keys)


class _Range:
    """A sized stand-in for the data set, all a sampler needs."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


class _SeededSampler(Sampler):
    """Yields ``(index, sample_seed)``; the order and seeds depend on ``(seed, epoch)`` only."""

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int, world: int, distributed: bool) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world, self.distributed = rank, world, distributed
        self.epoch = 0
        self._gen = torch.Generator()
        if shuffle and distributed:
            # DistributedSampler seeds with seed + epoch: the same (seed, epoch) -> order mapping as epoch_seed
            self.base: Sampler = DistributedSampler(
                _Range(n), num_replicas=world, rank=rank, shuffle=True,
                seed=epoch_seed(seed, 0), drop_last=False,
            )
        elif shuffle:
            self.base = RandomSampler(_Range(n), generator=self._gen)
        else:
            self.base = None  # sequential; a strided shard of it under DDP

    def __len__(self) -> int:
        if self.base is not None:
            return len(self.base)
        return len(range(self.rank, self.n, self.world))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if isinstance(self.base, DistributedSampler):
            self.base.set_epoch(self.epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.base is None:
            indices: Iterator[int] = iter(range(self.rank, self.n, self.world))
        else:
            self._gen.manual_seed(epoch_seed(self.seed, self.epoch))
            indices = iter(self.base)
        key = mix_seed(self.seed, self.epoch, _SAMPLE_STREAM)
        for i in indices:
            yield i, splitmix64(key ^ i) >> 1


# --------------------------------------------------------------------------- loader


def _dist_info() -> tuple[bool, int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


class ImageFolderLoader:
    """The trainer's loader protocol over image files: ``len``, ``set_epoch``, ``num_samples``,
    and iteration yielding ``(x, y)`` already on ``device``.

    Args:
        images: the split's files and labels.
        transform: :class:`TrainTransform` or :class:`EvalTransform`.
        batch_size: global batch size (divided among ranks under DDP).
        shuffle: new order each epoch from ``(seed, epoch)``.
        device: where batches are delivered (``non_blocking`` copies from pinned memory on CUDA).
        num_workers, persistent_workers, prefetch_factor: passed to ``DataLoader``.
        batch_key: config key of ``batch_size``; when given, it must divide among the
            ranks exactly (training), else each rank takes the ceiling (evaluation).
    """

    def __init__(
        self,
        images: ImageList,
        transform: TrainTransform | EvalTransform,
        batch_size: int,
        shuffle: bool,
        device: torch.device,
        seed: int = 0,
        drop_last: bool = False,
        num_workers: int = 8,
        persistent_workers: bool = True,
        prefetch_factor: int | None = None,
        batch_key: str | None = None,
        decoder: str = "pil",
    ) -> None:
        self.images = images
        self.decode = (DeviceDecode(transform, device) if decoder == "gpu"
                       else DaliDecode(transform, device, batch_size) if decoder == "dali" else None)
        self.transform = transform
        self.device = torch.device(device)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.num_workers = int(num_workers)
        self.sharded, rank, world = _dist_info()
        if batch_key is not None and batch_size % world:
            raise ConfigError(
                f"{batch_key}: {batch_size} is not divisible by the {world} processes; "
                f"set {batch_key} to a multiple of {world}"
            )
        self.batch_size = -(-int(batch_size) // world)  # per rank
        self.global_batch_size = int(batch_size)
        self.sampler = _SeededSampler(len(images), self.shuffle, self.seed, rank, world, self.sharded)
        self.epoch = 0
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs["persistent_workers"] = bool(persistent_workers)
            if prefetch_factor is not None:
                kwargs["prefetch_factor"] = int(prefetch_factor)
        self.loader = DataLoader(
            self._items(),
            batch_size=self.batch_size,
            sampler=self.sampler,
            num_workers=self.num_workers,
            drop_last=self.drop_last,
            **self._batching(),
            **kwargs,
        )

    def _items(self) -> Dataset:
        return (_JpegBytes if self.decode is not None else _SeededImages)(self.images, self.transform)

    def _batching(self) -> dict:
        """How items become batches: tensors pinned for the copy to CUDA, or the files' bytes listed
        for the device decoder."""
        if self.decode is not None:
            return {"pin_memory": False, "collate_fn": _collate_bytes}
        return {"pin_memory": self.device.type == "cuda"}

    def _on_device(self, batch) -> tuple[Tensor, Tensor]:
        if self.decode is not None:
            datas, crops, y = batch
            return self.decode(datas, crops), y.to(self.device, non_blocking=True)
        x, y = batch
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    @property
    def num_samples(self) -> int:
        """Images in this split (all ranks together)."""
        return len(self.images)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.sampler.set_epoch(self.epoch)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.sampler.set_epoch(self.epoch)
        for batch in self.loader:
            yield self._on_device(batch)

    def draw(self, n: int, key: int) -> StatBatches:
        """`n` statistics batches of the global batch size for `key` (see the module docstring)."""
        return StatBatches(self, int(n), int(key))

    def _num_draws(self, n: int) -> int:
        return min(n, math.ceil(len(self.images) / self.global_batch_size))

    def _draw_batches(self, n: int, key: int) -> Iterator[tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(mix_seed(self.seed, STATS_STREAM, key))
        count = self._num_draws(n) * self.global_batch_size
        order = torch.randperm(len(self.images), generator=gen)[:count].tolist()
        base = mix_seed(self.seed, STATS_STREAM, key, _SAMPLE_STREAM)
        keys = [(i, splitmix64(base ^ i) >> 1) for i in order]
        loader = DataLoader(self._items(), batch_size=self.global_batch_size, sampler=_ListSampler(keys),
                            num_workers=self.num_workers, **self._batching())
        for batch in loader:
            yield self._on_device(batch)

    def __repr__(self) -> str:
        return (
            f"ImageFolderLoader(num_samples={self.num_samples}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, seed={self.seed}, epoch={self.epoch}, workers={self.num_workers}, "
            f"device={self.device}, transform={self.transform!r})"
        )


# --------------------------------------------------------------------------- entry point


def _holdout(images: ImageList, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, val)``: the last ``round(fraction * n_c)`` files of every class go to val."""
    targets = images.targets
    train_idx, val_idx = [], []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        k = int(round(fraction * idx.size))
        train_idx.append(idx[: idx.size - k])
        val_idx.append(idx[idx.size - k :])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def build_imagenet(cfg: Any, device: torch.device, seed: int) -> DataBundle:
    """ImageNet loaders from ``dataset.root`` (see the module docstring)."""
    batch_size, test_batch_size, val_fraction = cfg.batch_size, cfg.test_batch_size, cfg.val_fraction
    root = resolve_root(cfg.root)
    if not root.is_dir():
        raise ConfigError(
            f"dataset.root: {root} does not exist; set dataset.root to the folder holding train/ and val/"
            + (" (ImageNet cannot be downloaded automatically)" if cfg.download else "")
        )
    image_size = cfg.image_size
    resize = int(round(image_size / 0.875)) if cfg.val_resize is None else cfg.val_resize
    if resize < image_size:  # two keys: checked here
        raise ConfigError(f"dataset.val_resize={resize} is smaller than dataset.image_size={image_size}; the eval "
                          f"centre crop needs val_resize >= image_size (null: round(image_size / 0.875))")
    if cfg.decoder == "dali" and not dali_available():
        raise ConfigError("dataset.decoder: dali needs NVIDIA DALI, which is not installed; "
                          "pip install '.[dali]', or set dataset.decoder=pil or gpu")
    num_workers, persistent, prefetch = cfg.num_workers, cfg.persistent_workers, cfg.prefetch_factor
    drop_last = cfg.drop_last
    mean, std = channel_stats(cfg, 3) or (None, None)

    train_images, classes = scan_split(root / "train")
    test_images, _ = scan_split(root / "val", {c: i for i, c in enumerate(classes)})
    val_images = None
    if val_fraction > 0:
        tr, va = _holdout(train_images, val_fraction)
        if va.size == 0:
            raise ConfigError(
                f"dataset.val_fraction: {val_fraction} holds out no image of {len(train_images)}; "
                "raise dataset.val_fraction or set it to 0"
            )
        if tr.size == 0:
            raise ConfigError(f"dataset.val_fraction: {val_fraction} leaves no training images; lower it")
        train_images, val_images = train_images.subset(tr), train_images.subset(va)

    train_tf = TrainTransform(image_size, mean, std)
    eval_tf = EvalTransform(image_size, resize, mean, std)
    common = {"device": device, "num_workers": num_workers, "prefetch_factor": prefetch, "decoder": cfg.decoder}

    def eval_loader(images: ImageList, shuffle: bool = False, persistent: bool = persistent) -> ImageFolderLoader:
        return ImageFolderLoader(images, eval_tf, test_batch_size, shuffle=shuffle, seed=seed,
                                 persistent_workers=persistent, **common)

    return DataBundle(
        train=ImageFolderLoader(train_images, train_tf, batch_size, shuffle=True, seed=seed, drop_last=drop_last,
                                persistent_workers=persistent, batch_key="dataset.batch_size", **common),
        val=eval_loader(val_images) if val_images is not None else None,
        test=eval_loader(test_images),
        input_shape=(3, image_size, image_size),
        num_classes=len(classes),
        name="imagenet",
        # the training images seen like the test set: a fixed random subset first (epoch 0 order)
        train_eval=eval_loader(train_images, shuffle=True, persistent=False),
    )



@dataclass
class ImageNetSchema(S.DataSchema):
    root: str = S.root()
    download: bool = S.keyed(role=S.VOLATILE)
    image_size: int = S.count(ge=1)
    val_resize: Optional[int] = S.count(ge=1, nullable=True)
    num_workers: int = S.count(ge=0, role=S.VOLATILE)
    persistent_workers: bool = S.keyed(role=S.VOLATILE)
    prefetch_factor: Optional[int] = S.count(ge=1, nullable=True, role=S.VOLATILE)
    decoder: str = S.choice(DECODERS, role=S.DETAIL,
                            hint="pil (CPU workers), gpu (batched on the training device) or dali (NVIDIA DALI)")


S.register("dataset", "imagenet", build_imagenet,
           ImageNetSchema)

#: the data sets this module builds, by ``dataset.name`` (merged into :data:`sparse_bench.data.registry.BUILDERS`)
BUILDERS = {"imagenet": build_imagenet}
