"""Data sets as device-resident tensors and a deterministic batch iterator.

``build_data(cfg.dataset, device, seed)`` returns a :class:`DataBundle` whose
loaders yield ``(inputs, int64 labels)`` batches already on ``device``.
"""

from sparse_bench.data.datasets import DATASETS, DataBundle, build_data
from sparse_bench.data.loader import DeviceLoader

__all__ = ["DATASETS", "DataBundle", "DeviceLoader", "build_data"]
