#!/usr/bin/env bash
# Builds causal-conv1d's CUDA extension (what Mamba's fused path, use_mamba_mem_eff_path, needs)
# from its sdist, on the GPU node, for that node's GPU architecture only, and installs it.
#   bash examples/mimo/scripts/build_causal_conv1d.sh SDIST OUT_DIR [PYTHON] [--target DIR]
# SDIST: causal_conv1d-1.7.0.tar.gz, fetched where there is an index with
#   CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE pip download --no-deps --no-binary :all: \
#       --no-build-isolation causal-conv1d==1.7.0
# Needs nvcc and the node's torch. Its setup.py compiles for every architecture the CUDA
# toolkit knows (nine with CUDA 13); one is what the node runs and builds several times faster.
# (H100, 16 cores: see docs/benchmarks.md.) The wheel is left in OUT_DIR for other nodes alike.
set -euo pipefail
sdist=${1:?usage: build_causal_conv1d.sh SDIST OUT_DIR [PYTHON] [--target DIR]}
out=${2:?usage: build_causal_conv1d.sh SDIST OUT_DIR [PYTHON] [--target DIR]}
py=${3:-python3}
shift $(( $# < 3 ? $# : 3 ))
arch=${CUDA_ARCH:-$("$py" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())')}
work=$(mktemp -d)
tar xzf "$sdist" -C "$work"
cd "$work"/causal_conv1d-*/
"$py" - "$arch" <<'PY'
import re, sys
arch = sys.argv[1]
setup = open("setup.py").read()
pair = re.compile(r'cc_flag\.append\("-gencode"\)\s*\n\s*cc_flag\.append\("arch=compute_(\d+),code=sm_\d+"\)')
kept = pair.sub(lambda m: m.group(0) if m.group(1) == arch else "pass", setup)
if f'arch=compute_{arch},' not in kept:
    sys.exit(f"build_causal_conv1d: setup.py has no sm_{arch} target")
open("setup.py", "w").write(kept)
PY
mkdir -p "$out"
CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-16} "$py" -m pip wheel -q --no-deps \
  --no-build-isolation --no-index -w "$out" .
"$py" -m pip install -q --no-deps --no-index "$@" "$out"/causal_conv1d-*.whl
echo "causal-conv1d built for sm_$arch: $(ls "$out"/causal_conv1d-*.whl)"
