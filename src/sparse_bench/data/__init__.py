"""Data sets as device-resident tensors and a deterministic batch iterator.

``build_data(cfg.dataset, device, seed)`` returns a :class:`DataBundle` whose
loaders yield ``(inputs, int64 labels)`` batches already on ``device``.

Modules: :mod:`~sparse_bench.data.registry` (``build_data`` and the data sets by name),
:mod:`~sparse_bench.data.common` (``DataBundle`` and what the data sets share),
:mod:`~sparse_bench.data.loader` (``DeviceLoader`` and the seed streams),
:mod:`~sparse_bench.data.augment` (batched device-side augmentation), and one module per data
set or family: :mod:`~sparse_bench.data.mnist` (MNIST, Fashion-MNIST),
:mod:`~sparse_bench.data.digits`, :mod:`~sparse_bench.data.synthetic`,
:mod:`~sparse_bench.data.cifar` (CIFAR-10, CIFAR-100), :mod:`~sparse_bench.data.imagenet`.
"""

from sparse_bench.data.common import DataBundle
from sparse_bench.data.loader import DeviceLoader
from sparse_bench.data.registry import BUILDERS, build_data

__all__ = ["BUILDERS", "DataBundle", "DeviceLoader", "build_data"]
