"""sparse_bench: one trainer for sparse neural networks."""

__version__ = "0.1.0"
