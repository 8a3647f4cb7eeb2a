"""A minimal batch iterator over tensors that already live on the target device.

The whole data set is a pair of tensors ``(x, y)`` on one device; a batch is an
``index_select`` (shuffled) or a slice (sequential) of them.  There are no
worker processes and no per-sample Python, which keeps small-image training
(MNIST, Fashion-MNIST, digits) bound by the model rather than by data loading.

Shuffling is reproducible without hidden state: the order used in epoch ``e``
is ``torch.randperm`` drawn from a fresh CPU generator seeded from
``(seed, e)`` alone, so a run resumed at epoch ``e`` sees exactly the batches
an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["DeviceLoader", "epoch_seed"]

#: Multiplier that spreads run seeds apart so that (seed, epoch) pairs do not collide
#: for any realistic number of epochs.
_SEED_STRIDE = 1_000_003


def epoch_seed(seed: int, epoch: int) -> int:
    """Generator seed for the shuffle of ``epoch`` in a run seeded with ``seed``.

    Folded into ``[0, 2**63)`` so that any Python int is a valid torch seed.
    """
    return (int(seed) * _SEED_STRIDE + int(epoch)) % (2**63)


class DeviceLoader:
    """Iterate over ``(x, y)`` in mini-batches without leaving the device.

    Args:
        x: inputs, first dimension indexes samples.
        y: targets, same length as ``x`` and on the same device.
        batch_size: samples per batch (the last batch may be smaller unless
            ``drop_last``).
        shuffle: draw a new permutation every epoch (see :meth:`set_epoch`).
        seed: run seed; with the epoch number it fully determines the order.
        drop_last: drop the final incomplete batch.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        if x.device != y.device:
            raise ValueError(f"x is on {x.device} but y is on {y.device}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x = x
        self.y = y
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        """Number of samples in the underlying tensors."""
        return int(self.x.shape[0])

    @property
    def device(self) -> torch.device:
        """Device that holds the data (and every yielded batch)."""
        return self.x.device

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration uses."""
        self.epoch = int(epoch)

    def order(self, epoch: int | None = None) -> Tensor | None:
        """Sample order for ``epoch`` (default: the current one) on the data device.

        Returns ``None`` when the loader does not shuffle (identity order).
        The result depends on ``(seed, epoch)`` only.
        """
        if not self.shuffle:
            return None
        e = self.epoch if epoch is None else int(epoch)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(epoch_seed(self.seed, e))
        perm = torch.randperm(self.num_samples, generator=gen)
        return perm.to(self.device)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        perm = self.order()
        n = self.num_samples
        bs = self.batch_size
        for b in range(len(self)):
            start = b * bs
            stop = min(start + bs, n)
            if perm is None:
                yield self.x[start:stop], self.y[start:stop]
            else:
                idx = perm[start:stop]
                yield self.x.index_select(0, idx), self.y.index_select(0, idx)

    def __repr__(self) -> str:
        return (
            f"DeviceLoader(num_samples={self.num_samples}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, seed={self.seed}, drop_last={self.drop_last}, "
            f"epoch={self.epoch}, device={self.device})"
        )
