#!/usr/bin/env bash
# Creates (or reuses) the project virtualenv and installs the pinned requirements into it.
# Idempotent: a stamp file records the hash of what is installed; a second run returns at once.
# Prints the venv's python path on its last line so callers can `PY=$(... | tail -1)`.
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
venv=${HETERO_VENV:-$root/.venv}
req=$root/requirements.txt
stamp=$venv/.hetero-installed
mamba="mamba-ssm==2.3.2.post1"
want=$( (cat "$req"; echo "$mamba") | sha256sum | cut -d' ' -f1)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "$venv/bin/python"
  exit 0
fi

sys_py=${PYTHON:-python3}
# A CUDA torch already on the system (GPU nodes, containers) is kept: the venv sees it.
if "$sys_py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "setup_env: keeping the system CUDA torch" >&2
  [ -x "$venv/bin/python" ] || "$sys_py" -m venv --system-site-packages "$venv"
  torch_spec=()
else
  [ -x "$venv/bin/python" ] || "$sys_py" -m venv "$venv"
  torch_spec=(torch==2.13.0)
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
# megatron-core 0.19.2 declares Python>=3.12 but builds and runs on 3.11.
"${pip[@]}" "${torch_spec[@]}" pybind11 setuptools wheel >&2
"${pip[@]}" --ignore-requires-python --no-build-isolation -r "$req" >&2
# mamba-ssm without its CUDA extensions: megatron-core's Mamba layers run its Triton kernels (GPU)
# and build anywhere. Its other declared needs (tilelang, transformers, ...) are not used.
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE "${pip[@]}" --no-deps --no-build-isolation \
  "$mamba" >&2
echo "$want" > "$stamp"
echo "$venv/bin/python"
