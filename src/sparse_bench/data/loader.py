"""A minimal batch iterator over tensors that already live on the target device.

The whole data set is a pair of tensors ``(x, y)`` on one device; a batch is an
``index_select`` (shuffled) or a slice (sequential) of them.  There are no
worker processes and no per-sample Python, which keeps small-image training
(MNIST, Fashion-MNIST, digits) bound by the model rather than by data loading.

Shuffling is reproducible without hidden state: the order used in epoch ``e``
is ``torch.randperm`` drawn from a fresh CPU generator seeded from
``(seed, e)`` alone, so a run resumed at epoch ``e`` sees exactly the batches
an uninterrupted run would have seen.

An optional ``transform(xb, generator)`` runs on every batch on the device
(augmentation, dtype conversion, normalisation).  Its ``generator`` lives on the
data device and is re-seeded for every batch from ``(seed, epoch, batch index)``
(:func:`mix_seed`), so random augmentation is as reproducible as the order.

Statistics batches (the extra training batches GSE, RigL under GSE's protocol, SNIP and GraSP
read at a mask update) come from :meth:`DeviceLoader.draw`: their own stream, a fresh
permutation and fresh augmentation for every ``key`` (the step of the update), seeded by
``(seed, key)`` alone. Drawing them never touches the epoch in progress, and a resumed run
draws exactly the batches the uninterrupted run drew.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

__all__ = ["BatchTransform", "DeviceLoader", "StatBatches", "epoch_seed", "mix_seed", "splitmix64"]

#: ``transform(xb, generator) -> xb``: applied to every batch; ``generator`` is on the data device.
BatchTransform = Callable[[Tensor, torch.Generator], Tensor]

#: Multiplier that spreads run seeds apart so that (seed, epoch) pairs do not collide
#: for any realistic number of epochs.
_SEED_STRIDE = 1_000_003


def epoch_seed(seed: int, epoch: int) -> int:
    """Generator seed for the shuffle of ``epoch`` in a run seeded with ``seed``.

    Folded into ``[0, 2**63)`` so that any Python int is a valid torch seed.
    """
    return (int(seed) * _SEED_STRIDE + int(epoch)) % (2**63)


_MASK64 = (1 << 64) - 1
#: Tag that keeps the per-batch augmentation stream apart from other uses of :func:`mix_seed`.
AUGMENT_STREAM = 0x417567
#: Tag of the statistics-batch stream (:meth:`DeviceLoader.draw`).
STATS_STREAM = 0x535441


def splitmix64(z: int) -> int:
    """One step of the splitmix64 mixer on 64-bit integers (the building block of :func:`mix_seed`)."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix_seed(*values: int) -> int:
    """A well-spread seed in ``[0, 2**63)`` from a tuple of integers (e.g. seed, epoch, batch).

    Pure integer arithmetic (splitmix64 over the values in turn), so it is the
    same on every machine and Python version; different tuples give unrelated seeds.
    """
    h = splitmix64(len(values))
    for v in values:
        h = splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


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
        transform: optional ``transform(xb, generator) -> xb`` applied to every
            batch of inputs on the device; ``generator`` is a generator on the
            data device seeded from ``(seed, epoch, batch index)``.  Without it,
            batches are views / copies of ``x`` as stored.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        transform: BatchTransform | None = None,
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
        self.transform = transform
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

    def batch_seed(self, batch: int, epoch: int | None = None) -> int:
        """Seed of the transform generator for ``batch`` of ``epoch`` (default: the current one)."""
        e = self.epoch if epoch is None else int(epoch)
        return mix_seed(self.seed, e, int(batch), AUGMENT_STREAM)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        perm = self.order()
        n = self.num_samples
        bs = self.batch_size
        epoch = self.epoch
        gen = torch.Generator(device=self.device) if self.transform is not None else None
        for b in range(len(self)):
            start = b * bs
            stop = min(start + bs, n)
            if perm is None:
                xb, yb = self.x[start:stop], self.y[start:stop]
            else:
                idx = perm[start:stop]
                xb, yb = self.x.index_select(0, idx), self.y.index_select(0, idx)
            if gen is not None:
                gen.manual_seed(self.batch_seed(b, epoch))
                xb = self.transform(xb, gen)
            yield xb, yb

    def draw(self, n: int, key: int) -> StatBatches:
        """`n` statistics batches of ``batch_size`` for `key`, independent of the epoch order.

        The samples are the first ``n * batch_size`` of a permutation seeded by
        ``(seed, key)``; each batch gets the training transform seeded by ``(seed, key, batch)``.
        The result can be iterated any number of times and yields the same batches each time.
        """
        return StatBatches(self, int(n), int(key))

    def _num_draws(self, n: int) -> int:
        return min(n, math.ceil(self.num_samples / self.batch_size))

    def _draw_batches(self, n: int, key: int) -> Iterator[tuple[Tensor, Tensor]]:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(mix_seed(self.seed, STATS_STREAM, key))
        perm = torch.randperm(self.num_samples, generator=gen).to(self.device)
        tgen = torch.Generator(device=self.device) if self.transform is not None else None
        bs = self.batch_size
        for b in range(min(n, math.ceil(self.num_samples / bs))):
            idx = perm[b * bs:(b + 1) * bs]
            xb, yb = self.x.index_select(0, idx), self.y.index_select(0, idx)
            if tgen is not None:
                tgen.manual_seed(mix_seed(self.seed, STATS_STREAM, key, b))
                xb = self.transform(xb, tgen)
            yield xb, yb

    def __repr__(self) -> str:
        return (
            f"DeviceLoader(num_samples={self.num_samples}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, seed={self.seed}, drop_last={self.drop_last}, "
            f"epoch={self.epoch}, device={self.device}, transform={self.transform!r})"
        )


class StatBatches:
    """A re-iterable set of statistics batches: ``len`` and iteration yielding ``(x, y)``.

    Iterating again re-creates the same batches (the draw is a pure function of the loader's
    seed and the key), so memory never holds more than one batch for the caller's loop.
    """

    def __init__(self, loader, n: int, key: int) -> None:
        self.loader, self.n, self.key = loader, int(n), int(key)
        self._len: int | None = None

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.loader._draw_batches(self.n, self.key)

    def __len__(self) -> int:
        if self._len is None:
            self._len = self.loader._num_draws(self.n)
        return self._len
