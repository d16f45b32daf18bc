#!/usr/bin/env bash
# The LLaVA recipe, end to end, hetero (the tower and projector on rank 0, the language model on
# rank 1): stage 1 trains the projector alone from a Hugging Face llava folder, stage 2 everything
# from stage 1's checkpoint, and the result is exported as a Hugging Face llava folder. On a
# 2-core CPU it takes about a minute, on the shapes dataset and a tiny random llava (both made on
# first use). One summary line per stage at the end.
#   bash examples/mimo/scripts/run_llava_recipe.sh [trainer flags for both stages...]
# Environment (all optional):
#   HF_LLAVA    a llava folder to start from (default: a tiny random one made from TOKENIZER by
#               make_tiny_llava.py; LLAVA_FAMILY=llama-clip|qwen3-siglip picks its family)
#   DATA        --data-path of the hf data provider (default: make_llava_dataset.py's shapes,
#               2048 samples; BLANK_IMAGES=1 makes them with plain gray images, the control)
#   TOKENIZER   --tokenizer-model (default: HF_LLAVA when given, else the generated data's)
#   STAGE1_ITERS, STAGE2_ITERS  iterations of each stage (default 20 and 100)
#   NPROC       ranks (default 2: hetero 1 + 1; give the grid flags for more)
#   HETERO_RUN_DIR  where everything goes (default runs/llava): data/, hf_llava/, stage1/ and
#               stage2/ (checkpoints), stage{1,2}.log, stage{1,2}.jsonl (metrics), export/iter_N/
#               (the Hugging Face folder). Run again: each stage resumes (a finished one has
#               nothing left to do) and a finished export is kept.
#   HETERO_PYTHON, HETERO_TIMEOUT_S (per stage, default 3600)
# NCCL + bf16 when there is a GPU for each rank; CPU/gloo in fp32 otherwise. Flags after the name
# go to both stages and override the recipe's (argparse keeps the last value).
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
scripts=$root/examples/mimo/scripts
py=${HETERO_PYTHON:-$(bash "$scripts/setup_env.sh" | tail -n 1)}
run=${HETERO_RUN_DIR:-runs/llava}
nproc=${NPROC:-2}
mkdir -p "$run"

data=${DATA:-}
if [ -z "$data" ]; then
  data=$run/data/llava.json
  if [ ! -f "$data" ]; then
    blank=()
    if [ "${BLANK_IMAGES:-0}" = 1 ]; then blank=(--blank-images); fi
    echo "making the LLaVA-format shapes dataset in $run/data (a few seconds, once)"
    rm -rf "$run/data"
    "$py" "$scripts/make_llava_dataset.py" "$run/data" --samples 2048 "${blank[@]}" \
      > "$run/make_data.log" 2>&1 || { cat "$run/make_data.log" >&2; exit 1; }
  fi
fi
tokenizer=${TOKENIZER:-${HF_LLAVA:-}}
if [ -z "$tokenizer" ]; then
  if [ -n "${DATA:-}" ]; then
    echo "error: with DATA of your own, give TOKENIZER (or HF_LLAVA, whose tokenizer is used)" >&2
    exit 2
  fi
  tokenizer=$run/data/tokenizer
fi
hf=${HF_LLAVA:-}
if [ -z "$hf" ]; then
  hf=$run/hf_llava
  if [ ! -f "$hf/config.json" ]; then
    echo "making a tiny random Hugging Face llava in $hf (its vocabulary and <image> are $tokenizer's)"
    rm -rf "$hf"
    "$py" "$scripts/make_tiny_llava.py" "$hf" --tokenizer "$tokenizer" \
      --family "${LLAVA_FAMILY:-llama-clip}" > "$run/make_llava.log" 2>&1 \
      || { cat "$run/make_llava.log" >&2; exit 1; }
  fi
fi

gpus=0  # (no nvidia-smi: no GPU, and a second of torch's import saved)
if command -v nvidia-smi > /dev/null; then
  gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())')
fi
if [ "$gpus" -ge "$nproc" ]; then device=(--device cuda --bf16); else device=(--device cpu); fi
# As run_hetero_mock_train.sh: the caller's relative paths, ranks that die with the launcher.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" HETERO_DIE_WITH_PARENT=1
# Both stages: the shapes (and image token) come from the llava folder; a checkpoint being
# resumed takes precedence over its weights.
common=(--model-provider llava --load-from-hf "$hf" --data-provider hf --data-path "$data"
        --tokenizer-model "$tokenizer" --split "90,10" --global-batch-size 8 --micro-batch-size 2
        --seq-length 64 --log-interval 10 --distributed-timeout-minutes 5)

stage() {  # stage N FLAGS...: one run of the launcher, its output also in $run/stageN.log
  local n=$1
  shift
  echo "== stage $n"
  timeout --signal=TERM --kill-after=30 "${HETERO_TIMEOUT_S:-3600}" \
    "$py" -m examples.mimo.launch --standalone --nproc-per-node "$nproc" -- "${device[@]}" \
    "${common[@]}" "$@" --metrics-file "$run/stage$n.jsonl" 2>&1 | tee "$run/stage$n.log"
}

latest() {  # a run directory's latest saved iteration, empty before its first save
  cat "$1/latest_checkpointed_iteration.txt" 2> /dev/null || true
}

# Stage 1: the projector alone (tower and language model frozen), from the llava folder.
stage 1 --freeze-lm --freeze-vit --train-iters "${STAGE1_ITERS:-20}" --lr 1e-3 \
  --lr-warmup-iters 2 --eval-interval "${STAGE1_ITERS:-20}" --eval-iters 4 \
  --save "$run/stage1" --load "$run/stage1" "$@"
# Stage 2: everything trains, from stage 1's weights (new optimizer, iteration 0); run again, it
# resumes its own checkpoint instead.
if [ -n "$(latest "$run/stage2")" ]; then
  from=(--load "$run/stage2")
else
  from=(--load "$run/stage1" --finetune)
fi
stage 2 --train-iters "${STAGE2_ITERS:-100}" --lr 3e-3 --min-lr 1e-4 --lr-warmup-iters 4 \
  --eval-interval 50 --eval-iters 6 --save "$run/stage2" "${from[@]}" "$@"

iteration=$(latest "$run/stage2")
out=$run/export/iter_$(printf %07d "$iteration")
if [ ! -d "$out" ]; then
  echo "== export"
  "$py" -m examples.mimo.scripts.export_hf --load "$run/stage2" --out "$out" \
    --tokenizer "$tokenizer" > "$run/export.log" 2>&1 || { cat "$run/export.log" >&2; exit 1; }
fi

summary() {  # summary N WHAT: the stage's summary line, or what a run with nothing to do left
  local line
  line=$(grep -m 1 '^done: ' "$run/stage$1.log" || true)
  echo "stage $1 ($2): ${line:-nothing left to do (checkpoint $run/stage$1, iteration $(latest "$run/stage$1"))}"
}
echo "== summary"
summary 1 "projector only, from $hf"
summary 2 "everything, from stage 1"
echo "export: $out (a Hugging Face llava folder, with the tokenizer of $tokenizer)"
