#!/usr/bin/env bash
# Installs the pinned requirements (and mamba-ssm) from a folder made by build_wheelhouse.sh,
# with no index: nothing is fetched from the network.
#   bash examples/mimo/scripts/install_wheelhouse.sh WHEEL_DIR [PYTHON]
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
dir=${1:?usage: install_wheelhouse.sh WHEEL_DIR [PYTHON]}
py=${2:-python3}
"$py" -m pip install --no-index --find-links "$dir" --ignore-requires-python \
  -r "$root/requirements.txt"
# The pure-Python mamba-ssm runs its Triton kernels with torch, triton and einops, all installed
# above; its declared extras (tilelang, transformers, ...) are not needed for training.
"$py" -m pip install --no-index --find-links "$dir" --no-deps mamba-ssm==2.3.2.post1
