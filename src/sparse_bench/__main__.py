"""`python -m sparse_bench [overrides]`: the Hydra entry point."""

from __future__ import annotations

import sys

from sparse_bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
