"""sparse_bench: one trainer for sparse neural networks."""

from . import identity as _identity  # noqa: F401  (the config's ${sb.*} resolvers, with .resolvers)
from . import resolvers as _resolvers  # noqa: F401

__version__ = "0.1.0"


def __getattr__(name: str):
    """``sparse_bench.load_exported`` (a model written by sparse-bench-export) and
    ``sparse_bench.load_checkpoint`` (a checkpoint's state, verified), imported when first used."""
    if name == "load_exported":
        from .modelio import load_exported

        return load_exported
    if name == "load_checkpoint":
        from .train.checkpoint import load_checkpoint

        return load_checkpoint
    raise AttributeError(f"module 'sparse_bench' has no attribute {name!r}")
