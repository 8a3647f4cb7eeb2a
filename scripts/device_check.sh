#!/usr/bin/env bash
# The GPU check in one command, on a machine whose Python has torch, torchvision and timm but no
# network: installs hydra-core and omegaconf from the wheels beside this script (fetched beforehand,
# where there is network, by scripts/download_wheels.sh), then runs scripts/device_check.py, which
# writes device_check.md into $OUT (or the current folder) in under 8 minutes.
#
#   scripts/download_wheels.sh          # once, with network: fills scripts/wheels/
#   scripts/device_check.sh [--smoke]   # on the GPU machine
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
site="${TMPDIR:-/tmp}/sparse-bench-site"
if ! python3 -c "import hydra, omegaconf" 2>/dev/null; then
  ls "$here"/wheels/*.whl >/dev/null 2>&1 || { echo "error: no wheels in $here/wheels; run scripts/download_wheels.sh where there is network" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$here"/wheels/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
cd "$root"
exec timeout 480 python3 scripts/device_check.py "$@"
