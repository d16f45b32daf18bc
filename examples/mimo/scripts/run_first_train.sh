#!/usr/bin/env bash
# The README's main job: the real pipeline at a size a 2-core CPU trains in about a minute. The
# Nemotron VLM's tiny-cpu shape (RADIO ViT + projector on rank 0, an attention/MoE LLM on rank 1)
# trains hetero on a generated energon dataset (images of shapes with captions, VQA and text;
# made on first use), evaluates on its validation split, saves, and ends with a summary line.
#   bash examples/mimo/scripts/run_first_train.sh [trainer flags...]
#   bash examples/mimo/scripts/run_first_train.sh --mock [flags...]   # mock model on mock data
# Where it writes: HETERO_RUN_DIR (default runs/first): data/, ckpt/ (run again: it resumes, and
# a finished run has nothing left to do), metrics.jsonl, tensorboard/. NCCL + bf16 when there is
# a GPU for each of the 2 ranks; CPU/gloo in fp32 otherwise. Flags after the name go to the
# trainer and override these (argparse keeps the last value).
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
if [ "${1:-}" = "--mock" ]; then
  shift
  exec bash "$root/examples/mimo/scripts/run_hetero_mock_train.sh" "$@"
fi
py=${HETERO_PYTHON:-$(bash "$root/examples/mimo/scripts/setup_env.sh" | tail -n 1)}
run=${HETERO_RUN_DIR:-runs/first}
mkdir -p "$run"
if [ ! -f "$run/data/blend.yaml" ]; then
  echo "making the sample dataset in $run/data (a few seconds, once)"
  "$py" "$root/examples/mimo/scripts/make_sample_energon_dataset.py" "$run/data" --samples 256 \
    > "$run/make_data.log" 2>&1 || { cat "$run/make_data.log" >&2; exit 1; }
fi
gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -ge 2 ]; then device=(--device cuda --bf16); else device=(--device cpu); fi
# As run_hetero_mock_train.sh: the caller's relative paths, ranks that die with the launcher.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" HETERO_DIE_WITH_PARENT=1
exec timeout --signal=TERM --kill-after=30 "${HETERO_TIMEOUT_S:-3600}" \
  "$py" -m examples.mimo.launch --standalone --nproc-per-node 2 -- "${device[@]}" \
  --model-provider nemotron_moe_vlm --model-preset tiny-cpu \
  --data-provider energon --data-path "$run/data/blend.yaml" \
  --tokenizer-model "$run/data/tokenizer" --num-workers 1 \
  --train-iters 40 --global-batch-size 8 --micro-batch-size 2 --seq-length 64 \
  --lr 3e-3 --min-lr 1e-4 --lr-warmup-iters 4 --eval-interval 20 --eval-iters 2 --log-interval 10 \
  --save "$run/ckpt" --load "$run/ckpt" --metrics-file "$run/metrics.jsonl" \
  --tensorboard-dir "$run/tensorboard" --distributed-timeout-minutes 5 "$@"
