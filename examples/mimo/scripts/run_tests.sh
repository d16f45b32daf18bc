#!/usr/bin/env bash
# Sets up the virtualenv if needed, then runs the test suite (CPU/gloo; GPU tests skip).
#   bash examples/mimo/scripts/run_tests.sh [pytest args]
# GPU tests: torchrun --nproc-per-node 2 -m pytest tests/unit_tests/models/test_hetero_gpu.py
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
py=${HETERO_PYTHON:-$(bash "$root/examples/mimo/scripts/setup_env.sh" | tail -n 1)}
cd "$root"
exec "$py" -m pytest "$@"
