#!/usr/bin/env bash
# Builds a folder of wheels for GPU nodes without internet (common on SLURM clusters).
#   bash examples/mimo/scripts/build_wheelhouse.sh OUT_DIR [PYTHON]
# PYTHON must match the GPU node's interpreter (same minor version) and have the node's torch
# importable: the mamba-ssm build imports it, and the dependency closure is resolved with torch
# pinned to that version. torch and its CUDA runtime packages are left out (the node has them);
# if pip cannot find that torch version, point PIP_EXTRA_INDEX_URL at an index that has it.
# Produces: wheels for every pinned requirement and its missing dependencies (the megatron-core
# sdist built into one), and pure-Python (Triton-kernel) builds of mamba-ssm and causal-conv1d.
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
out=${1:?usage: build_wheelhouse.sh OUT_DIR [PYTHON]}
py=${2:-python3}
mkdir -p "$out"
"$py" -c 'import torch' || { echo "build_wheelhouse: $py cannot import torch" >&2; exit 2; }
report=$(mktemp)
pin=$(mktemp)
"$py" -c 'import torch; print("torch==" + torch.__version__)' > "$pin"
# The whole dependency closure, as a fresh node would need it, with the node's torch.
"$py" -m pip install --dry-run --ignore-installed --ignore-requires-python --quiet \
  --report "$report" -c "$pin" -r "$root/requirements.txt" >/dev/null
specs=$("$py" - "$report" <<'PY'
import json, sys
items = [i["metadata"] for i in json.load(open(sys.argv[1]))["install"]]
keep = [m for m in items
        if m["name"].lower() != "torch" and not m["name"].lower().startswith(("nvidia-", "cuda-"))]
print(" ".join("{name}=={version}".format(**m) for m in keep))
PY
)
src=$(mktemp -d)
# Published wheels are kept; an sdist (megatron-core) is built into a wheel by this interpreter.
# (pip 23's "pip wheel" disregards --ignore-requires-python for index packages; download does not.)
read -ra spec_list <<< "$specs"
[ -z "$specs" ] || "$py" -m pip download --no-deps --ignore-requires-python -d "$src" "${spec_list[@]}"
for f in "$src"/*; do
  case "$f" in
    *.whl) mv "$f" "$out"/ ;;
    *.tar.gz|*.zip) "$py" -m pip wheel --no-deps --ignore-requires-python -w "$out" "$f" ;;
  esac
done
# Pure-Python builds: their Triton kernels run on the GPU without the CUDA extensions.
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
CAUSAL_CONV1D_FORCE_BUILD=TRUE "$py" -m pip wheel --no-deps --no-build-isolation -w "$out" \
  mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0
ls -1 "$out"
