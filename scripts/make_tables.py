#!/usr/bin/env python
"""Same as `python -m sparse_bench.tables`: run/sweep folders (and a W&B project) -> paper tables.

    scripts/make_tables.py runs/multirun/my_sweep --out tables --wandb-project me/sparse_bench
"""

import sys
from pathlib import Path

try:
    from sparse_bench.tables import main
except ImportError:  # a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from sparse_bench.tables import main

if __name__ == "__main__":
    sys.exit(main())
