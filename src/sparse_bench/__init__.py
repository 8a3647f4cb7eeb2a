"""sparse_bench: one trainer for sparse neural networks."""

from . import identity as _identity  # noqa: F401  (the config's ${sb.*} resolvers, with .resolvers)
from . import resolvers as _resolvers  # noqa: F401

__version__ = "0.1.0"
