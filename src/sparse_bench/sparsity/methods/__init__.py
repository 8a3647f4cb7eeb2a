"""The sparsity methods, one module each, registered by name."""

from .base import METHODS, Method, MethodContext, build_method, register  # noqa: F401
from . import dense, sparse_momentum  # noqa: F401  (registration side effects)
