#!/usr/bin/env bash
# Builds a folder of wheels for GPU nodes without internet (common on SLURM clusters).
#   bash examples/mimo/scripts/build_wheelhouse.sh OUT_DIR [PYTHON]
# PYTHON must match the GPU node's interpreter (same minor version) and have torch importable:
# the mamba-ssm build imports it, and packages the node already has (torch, its CUDA libraries)
# are left out because pip resolves against this interpreter's installed packages.
# Produces: binary wheels for every pinned requirement and its missing dependencies, a wheel of
# the megatron-core sdist, and pure-Python (Triton-kernel) builds of mamba-ssm and causal-conv1d.
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
out=${1:?usage: build_wheelhouse.sh OUT_DIR [PYTHON]}
py=${2:-python3}
mkdir -p "$out"
"$py" -c 'import torch' || { echo "build_wheelhouse: $py cannot import torch" >&2; exit 2; }
report=$(mktemp)
# What the node would still need, resolved against this interpreter's installed packages.
"$py" -m pip install --dry-run --ignore-requires-python --quiet --report "$report" \
  -r "$root/requirements.txt" >/dev/null
"$py" - "$report" "$out" "$py" <<'PY'
import json, subprocess, sys
report, out, py = sys.argv[1:]
for item in json.load(open(report))["install"]:
    meta = item["metadata"]
    spec = f"{meta['name']}=={meta['version']}"
    if item["download_info"]["url"].endswith(".whl"):
        cmd = [py, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", out, spec]
    else:  # an sdist (megatron-core): build the wheel with this interpreter
        cmd = [py, "-m", "pip", "wheel", "--no-deps", "--ignore-requires-python", "-w", out, spec]
    subprocess.run(cmd, check=True)
PY
# Pure-Python builds: their Triton kernels run on the GPU without the CUDA extensions.
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
CAUSAL_CONV1D_FORCE_BUILD=TRUE "$py" -m pip wheel --no-deps --no-build-isolation -w "$out" \
  mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0
ls -1 "$out"
