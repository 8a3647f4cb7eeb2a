#!/usr/bin/env bash
# Fetches, where there is network, the wheels scripts/device_check.sh installs on a GPU machine that
# has none: hydra-core, omegaconf and hydra's parser runtime, for CPython 3.12 (the GPU machine's).
# antlr4-python3-runtime 4.9.3 exists only as a source archive: it is built into a wheel here.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$here/wheels"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  -d "$here/wheels" "hydra-core>=1.3,<1.4" "omegaconf>=2.3,<2.4"  # hydra-core 1.3 needs omegaconf < 2.4
python3 -m pip wheel -q --no-deps -w "$here/wheels" "antlr4-python3-runtime==4.9.3"
ls "$here/wheels"
