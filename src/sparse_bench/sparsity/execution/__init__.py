"""Sparse execution: sparse layers, their kernels, and the engine that runs a method with them."""

from .engine import EXECUTIONS, Execution, build_model_for, execution_mode  # noqa: F401
from .layers import SparseConv2d, SparseLayer, SparseLinear  # noqa: F401
