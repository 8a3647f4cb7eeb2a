"""sparse_bench: one trainer for sparse neural networks."""

from . import resolvers as _resolvers  # noqa: F401  (the config's ${sb.*} resolvers)

__version__ = "0.1.0"
