#!/usr/bin/env bash
# Loss continuity across a checkpoint: trains ITERS straight, then ITERS/2 + save, then a fresh
# job that loads and finishes; prints both loss curves side by side, save/load times and size.
#   ITERS=50 NPROC=2 bash examples/mimo/scripts/check_save_resume.sh [train_hetero flags]
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
py=${HETERO_PYTHON:-$(bash "$root/examples/mimo/scripts/setup_env.sh" | tail -n 1)}
iters=${ITERS:-50}
nproc=${NPROC:-2}
work=${WORK_DIR:-$(mktemp -d)}
mkdir -p "$work"
gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -ge "$nproc" ]; then device=(--device cuda --bf16); else device=(--device cpu); fi
run() {
  timeout --signal=TERM --kill-after=30 "${HETERO_TIMEOUT_S:-1200}" \
    "$py" -m examples.mimo.launch --standalone --nproc-per-node "$nproc" -- \
    "${device[@]}" --train-iters "$iters" --log-interval 10 \
    --distributed-timeout-minutes 5 "$@"
}
cd "$root"
run --metrics-file "$work/straight.jsonl" "$@"
run --metrics-file "$work/resumed.jsonl" --save "$work/ckpt" --exit-interval $((iters / 2)) "$@"
run --metrics-file "$work/resumed.jsonl" --load "$work/ckpt" --save "$work/ckpt" "$@"
"$py" - "$work" <<'PY'
import json, sys
w = sys.argv[1]
a = [json.loads(l) for l in open(f"{w}/straight.jsonl")]
b = [json.loads(l) for l in open(f"{w}/resumed.jsonl")]
assert [r["iteration"] for r in a] == [r["iteration"] for r in b], "iterations differ"
worst = max(abs(x["lm_loss"] - y["lm_loss"]) / abs(x["lm_loss"]) for x, y in zip(a, b))
for x, y in zip(a, b):
    if x["iteration"] % 5 == 0 or x["iteration"] == len(a) // 2 + 1:
        print(f"iter {x['iteration']:4d}  straight {x['lm_loss']:.6f}  resumed {y['lm_loss']:.6f}")
print(f"max relative loss difference over {len(a)} iterations: {worst:.3e}")
PY
