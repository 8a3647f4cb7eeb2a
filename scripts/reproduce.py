#!/usr/bin/env python
"""Same as `sparse-bench-reproduce` / `python -m sparse_bench.reproduce`: launch a paper row's sweep."""

import sys

from sparse_bench.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
