"""Batched, device-side augmentation for small images (CIFAR).

The transforms here are ``transform(xb, generator) -> xb`` callables for
:class:`~sparse_bench.data.loader.DeviceLoader`: they receive a whole batch of
stored images (``uint8`` pixels ``(B, C, H, W)``) on the training device and a
generator on the same device, and return the float32, normalised batch the
model sees.  Nothing loops over samples in Python.

:class:`CropFlip` reproduces torchvision's CIFAR recipe
``RandomCrop(32, padding=4, padding_mode=...) -> RandomHorizontalFlip -> ToTensor -> Normalize``
in one gather:

* the 4-pixel border is never materialised: for every sample, output row ``i``
  reads padded row ``oy + i``, i.e. source row ``oy + i - pad``, mapped back
  into the image by reflection (``pad_mode=reflect``, as ``F.pad(mode='reflect')``:
  the edge pixel is not repeated) or marked as padding (``pad_mode=zeros``:
  torchvision's default ``fill=0``, a black pixel *before* normalisation, which
  becomes ``-mean/std`` afterwards);
* a flipped sample reads its crop window's columns right to left, so crop and
  flip are the same index arithmetic;
* the batch is gathered once with the per-sample flat indices, padding is
  zeroed with ``torch.where``, then converted to float and normalised.

Random draws, all from the given generator and in this order: crop row offsets
``oy`` (``B`` integers in ``[0, 2*pad]``), crop column offsets ``ox`` (same),
flip decisions (``B`` uniforms, flipped where ``< 0.5``).  Given the generator's
seed the output is fixed, which is what makes resumed runs see identical batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["PAD_MODES", "CropFlip", "Normalize", "crop_flip_indices"]

PAD_MODES = ("reflect", "zeros")


class Normalize:
    """``(x / scale - mean) / std`` per channel, as float32; ignores the generator.

    ``scale`` is 255 for ``uint8`` pixels (torchvision's ``ToTensor``) and 1 for
    data already in [0, 1].
    """

    def __init__(self, mean: Sequence[float] | None, std: Sequence[float] | None, scale: float = 255.0) -> None:
        self.mean = None if mean is None else [float(m) for m in mean]
        self.std = None if std is None else [float(s) for s in std]
        self.scale = float(scale)
        self._stats: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _stats_on(self, device: torch.device, ndim: int) -> tuple[Tensor, Tensor]:
        if device not in self._stats:  # built once per device: no host-to-device copy per batch
            self._stats[device] = (torch.tensor(self.mean, dtype=torch.float32, device=device),
                                   torch.tensor(self.std, dtype=torch.float32, device=device))
        m, s = self._stats[device]
        shape = (1, -1) + (1,) * (ndim - 2)
        return m.view(shape), s.view(shape)

    def __call__(self, xb: Tensor, generator: torch.Generator | None = None) -> Tensor:
        x = xb.to(torch.float32)
        if self.scale != 1.0:
            x = x / self.scale  # out of place: never modifies the stored data
        if self.mean is not None and self.std is not None:
            m, s = self._stats_on(x.device, x.dim())
            x = (x - m).div_(s)
        return x

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std}, scale={self.scale})"


def _source_index(pos: Tensor, size: int, pad_mode: str) -> tuple[Tensor, Tensor | None]:
    """Map unpadded coordinates ``pos`` (may be < 0 or >= size) into ``[0, size)``.

    Returns the index and, for ``zeros``, a bool mask of positions that lie in the image.
    """
    if pad_mode == "reflect":
        # reflection without repeating the edge: -1 -> 1, size -> size - 2 (valid while pad < size)
        idx = pos.abs()
        idx = torch.where(idx > size - 1, 2 * (size - 1) - idx, idx)
        return idx, None
    valid = (pos >= 0) & (pos < size)
    return pos.clamp(0, size - 1), valid


def crop_flip_indices(
    oy: Tensor, ox: Tensor, flip: Tensor, height: int, width: int, pad: int, pad_mode: str
) -> tuple[Tensor, Tensor | None]:
    """Flat source indices ``(B, H*W)`` into each ``H x W`` image, and the in-image mask (zeros mode).

    ``oy``/``ox`` are offsets into the image padded by ``pad`` on every side; ``flip``
    (bool, ``B``) reverses the columns of the crop window.
    """
    dev = oy.device
    ar_h = torch.arange(height, device=dev)
    ar_w = torch.arange(width, device=dev)
    rows = oy[:, None] + ar_h[None, :] - pad  # (B, H)
    cols_fwd = ox[:, None] + ar_w[None, :] - pad  # (B, W)
    cols = torch.where(flip[:, None], cols_fwd.flip(1), cols_fwd)
    r, r_ok = _source_index(rows, height, pad_mode)
    c, c_ok = _source_index(cols, width, pad_mode)
    flat = (r[:, :, None] * width + c[:, None, :]).reshape(r.shape[0], height * width)
    if r_ok is None:
        return flat, None
    valid = (r_ok[:, :, None] & c_ok[:, None, :]).reshape(r.shape[0], height * width)
    return flat, valid


class CropFlip:
    """Random ``pad``-padded crop back to the input size and random horizontal flip, then normalise.

    Args:
        mean, std: per-channel statistics for :class:`Normalize` (``None``: no normalisation).
        pad: padding on each side for the random crop (0 turns cropping off).
        pad_mode: ``reflect`` or ``zeros``.
        flip: flip each sample with probability 1/2.
        scale: pixel scale (255 for ``uint8`` input).
    """

    def __init__(
        self,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        pad: int = 4,
        pad_mode: str = "reflect",
        flip: bool = True,
        scale: float = 255.0,
    ) -> None:
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        if int(pad) < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        self.pad = int(pad)
        self.pad_mode = pad_mode
        self.flip = bool(flip)
        self.normalize = Normalize(mean, std, scale)

    @property
    def identity(self) -> bool:
        """True when the transform only normalises."""
        return self.pad == 0 and not self.flip

    def __call__(self, xb: Tensor, generator: torch.Generator) -> Tensor:
        if self.identity or xb.shape[0] == 0:
            return self.normalize(xb)
        b, c, h, w = xb.shape
        if self.pad_mode == "reflect" and self.pad >= min(h, w):
            raise ValueError(f"reflect padding {self.pad} needs images larger than {self.pad}, got {h}x{w}")
        dev = xb.device
        if self.pad > 0:
            oy = torch.randint(0, 2 * self.pad + 1, (b,), generator=generator, device=dev)
            ox = torch.randint(0, 2 * self.pad + 1, (b,), generator=generator, device=dev)
        else:
            oy = ox = torch.zeros(b, dtype=torch.int64, device=dev)
        if self.flip:
            flip = torch.rand((b,), generator=generator, device=dev) < 0.5
        else:
            flip = torch.zeros(b, dtype=torch.bool, device=dev)
        flat, valid = crop_flip_indices(oy, ox, flip, h, w, self.pad, self.pad_mode)
        src = xb.reshape(b, c, h * w)
        out = src.gather(2, flat[:, None, :].expand(b, c, h * w))
        if valid is not None:
            out = torch.where(valid[:, None, :], out, torch.zeros((), dtype=out.dtype, device=dev))
        return self.normalize(out.view(b, c, h, w))

    def __repr__(self) -> str:
        return f"CropFlip(pad={self.pad}, pad_mode={self.pad_mode!r}, flip={self.flip}, {self.normalize!r})"
