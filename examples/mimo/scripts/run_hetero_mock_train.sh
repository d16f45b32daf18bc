#!/usr/bin/env bash
# A short hetero training run on the mock model and data: encoder on rank 0, LLM on rank 1.
# Uses NCCL + bf16 when there is a GPU for every rank, else CPU/gloo in fp32. Extra arguments are
# passed to train_hetero.py and override the defaults below (argparse keeps the last value).
#   NPROC=3 bash examples/mimo/scripts/run_hetero_mock_train.sh --llm-dp 2
# HETERO_PYTHON=python3 skips the virtualenv set-up (for nodes prepared by install_wheelhouse.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
py=${HETERO_PYTHON:-$(bash "$root/examples/mimo/scripts/setup_env.sh" | tail -n 1)}
nproc=${NPROC:-2}
gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -ge "$nproc" ]; then device=(--device cuda --bf16); else device=(--device cpu); fi
# The default schedule is WSD; a --lr-decay-style of the caller's replaces all of it.
schedule=(--lr-decay-style WSD --lr-wsd-decay-iters 10 --lr-wsd-decay-style minus_sqrt)
for arg in "$@"; do
  case $arg in --lr-decay-style | --lr-decay-style=*) schedule=() ;; esac
done
# Relative paths (--save runs/x) are the caller's: the job runs in the caller's directory with
# the repository on the import path. The launcher dies with this script's `timeout` (a kill -9
# of it must not leave a job training on), and its ranks die with the launcher.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" HETERO_DIE_WITH_PARENT=1
# The job ends on its own when a rank fails; the outer timeout is a last resort.
exec timeout --signal=TERM --kill-after=30 "${HETERO_TIMEOUT_S:-3600}" \
  "$py" -m examples.mimo.launch --standalone --nproc-per-node "$nproc" -- "${device[@]}" \
  --train-iters 30 --global-batch-size 8 --micro-batch-size 2 --seq-length 64 \
  --lr 2e-3 --min-lr 1e-4 --lr-warmup-iters 3 "${schedule[@]}" --log-interval 1 \
  --distributed-timeout-minutes 5 "$@"
