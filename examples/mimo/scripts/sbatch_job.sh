#!/usr/bin/env bash
# The body of every sbatch_<shape>.sh job (they exec it; run it yourself inside an allocation):
#   bash examples/mimo/scripts/sbatch_job.sh SHAPE [extra train_hetero flags]
#
# One srun task per node runs examples.mimo.launch (torchrun) with the rendezvous on the first
# host of the allocation; grid sizes come from the node count (examples/mimo/cluster/presets.py).
# Everything of the job lives in its run directory, $HETERO_RUNS/<job name>-<job id>:
#   logs/node-<n>.log (appended across requeues), checkpoints/, metrics.jsonl, tensorboard/.
# A requeued job (same id) resumes from its own checkpoints: --load = --save.
#
# Stopping early, without losing work:
# - the ranks run with --exit-signal-handler: SIGTERM (SLURM's `#SBATCH --signal=TERM@S` before
#   the limit, `scancel --signal=TERM <job>`, or the SIGTERM that precedes KillWait's SIGKILL on
#   scancel and preemption) makes every rank finish its iteration, save, and exit 0; the launcher
#   passes the signal to its ranks instead of stopping them;
# - --exit-duration-in-mins: the job's remaining time less HETERO_EXIT_MARGIN_MINS (default 10,
#   more than the scripts' --signal lead); a run that stops short of --train-iters with at most
#   the margin left requeues itself (at most HETERO_MAX_RESTARTS times, default 20).
#
# Environment (all optional but the data of the production shapes):
#   HETERO_ROOT        the repository (default: the directory sbatch was called from)
#   HETERO_PYTHON      its Python (default: $HETERO_ROOT/.venv/bin/python; python3 in a container)
#   HETERO_RUNS        where run directories go (default: $HETERO_ROOT/runs)
#   HETERO_RUN_DIR     this run's directory (continue another job's run)
#   HETERO_PROCS_PER_NODE  ranks per node (default: the node's GPUs; 2 on CPU nodes, gloo)
#   HETERO_CONTAINER_IMAGE  run the tasks in this image (pyxis: srun --container-image);
#   HETERO_CONTAINER_MOUNTS extra mounts (the repository and the run directory are mounted)
#   HETERO_DATA_PATH, HETERO_TOKENIZER  --data-path and --tokenizer-model for energon shapes
#   HETERO_PORT        the rendezvous port (default: 20000 + job id mod 20000)
set -euo pipefail
shape=${1:?usage: sbatch_job.sh SHAPE [train_hetero flags]}
shift
: "${SLURM_JOB_ID:?sbatch_job.sh runs inside a SLURM allocation (sbatch or salloc)}"
root=${HETERO_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ ! -f "$root/examples/mimo/train_hetero.py" ]; then
  echo "error: HETERO_ROOT=$root is not the repository (submit from its root or set HETERO_ROOT)" >&2
  exit 2
fi
image=${HETERO_CONTAINER_IMAGE:-}
if [ -n "$image" ]; then py=${HETERO_PYTHON:-python3}; else py=${HETERO_PYTHON:-$root/.venv/bin/python}; fi
nodes=${SLURM_JOB_NUM_NODES:-1}
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
restart=${SLURM_RESTART_COUNT:-0}
run_dir=${HETERO_RUN_DIR:-${HETERO_RUNS:-$root/runs}/${SLURM_JOB_NAME:-hetero}-$SLURM_JOB_ID}
mkdir -p "$run_dir/logs"
ckpt=$run_dir/checkpoints

gpus=${SLURM_GPUS_ON_NODE:-}
if [ -z "$gpus" ] && command -v nvidia-smi > /dev/null; then
  gpus=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)
fi
if [ "${gpus:-0}" -gt 0 ]; then device=cuda; else device=cpu; fi
per_node=${HETERO_PROCS_PER_NODE:-${gpus:-0}}
if [ "$per_node" -le 0 ]; then per_node=2; fi

data=()
if [ -n "${HETERO_DATA_PATH:-}" ]; then data+=(--data-path "$HETERO_DATA_PATH"); fi
if [ -n "${HETERO_TOKENIZER:-}" ]; then
  data+=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$HETERO_TOKENIZER")
fi
margin=${HETERO_EXIT_MARGIN_MINS:-10}
max_restarts=${HETERO_MAX_RESTARTS:-20}
time_left() {  # squeue's remaining time of this job ([days-][hours:]minutes:seconds, UNLIMITED)
  squeue -h -j "$SLURM_JOB_ID" -o %L 2> /dev/null || true
}
# Defines flags, reference and train_iters; an impossible shape for this allocation is one line.
assignments=$(cd "$root" && "$py" -m examples.mimo.cluster.presets job "$shape" --nodes "$nodes" \
  --per-node "$per_node" --device "$device" --time-left "$(time_left)" \
  --exit-margin-mins "$margin" -- "${data[@]}" "$@")
declare -a flags reference
train_iters=0
eval "$assignments"

run_step() {  # run_step NAME FLAGS...: one srun step of the launcher on every node
  local name=$1
  shift
  local port=${HETERO_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  local container=()
  if [ -n "$image" ]; then
    container=(--container-image "$image" --container-workdir "$root"
               --container-mounts "$root:$root,$run_dir:$run_dir${HETERO_CONTAINER_MOUNTS:+,$HETERO_CONTAINER_MOUNTS}")
  fi
  # The step's output goes to the run directory (appended: a requeued job adds to it). srun is
  # left in the background so that this shell can take the SIGTERM of a scancel or preemption
  # (trap below) and keep waiting while the ranks save.
  srun --ntasks-per-node 1 --kill-on-bad-exit=1 --chdir "$root" --open-mode append \
    --output "$run_dir/logs/$name-node-%n.log" "${container[@]}" \
    "$py" -m examples.mimo.launch --nnodes "$nodes" --nproc-per-node "$per_node" \
    --rdzv-backend c10d --rdzv-endpoint "$head_node:$port" --rdzv-id "$SLURM_JOB_ID-$name-$restart" \
    -- "$@" &
  local pid=$!
  local status=0
  while :; do
    wait "$pid" && status=0 || status=$?
    kill -0 "$pid" 2> /dev/null || break  # still running: wait was cut short by a signal
  done
  return "$status"
}
trap 'echo "job: SIGTERM: the ranks finish their iteration and save"' TERM

latest() {  # the run's latest saved iteration, 0 before the first save
  cat "$ckpt/latest_checkpointed_iteration.txt" 2> /dev/null || echo 0
}

echo "job $SLURM_JOB_ID (restart $restart): $shape on $nodes node(s) x $per_node $device rank(s); run directory $run_dir; resuming from iteration $(latest)"
start=$SECONDS
status=0
run_step train "${flags[@]}" --save "$ckpt" --load "$ckpt" --exit-signal-handler \
  --metrics-file "$run_dir/metrics.jsonl" --tensorboard-dir "$run_dir/tensorboard" || status=$?
done_iters=$(latest)
echo "job $SLURM_JOB_ID: training exited $status after $(((SECONDS - start) / 60)) min; latest checkpoint: iteration $done_iters of $train_iters"
if [ "$status" -ne 0 ]; then
  exit "$status"
fi
if [ "$done_iters" -lt "$train_iters" ]; then
  # Stopped early with a checkpoint. Near SLURM's limit (at most the margin left: stopped by
  # --exit-duration-in-mins or the time-limit signal) the job requeues itself; otherwise it was
  # scancel or preemption, and SLURM decides; the job ends here with 0.
  left=$(cd "$root" && "$py" -m examples.mimo.cluster.presets minutes-left "$(time_left)")
  if [ -n "$left" ] && awk -v l="$left" -v m="$margin" 'BEGIN { exit !(l <= m) }'; then
    if [ "$restart" -lt "$max_restarts" ]; then
      echo "job $SLURM_JOB_ID: stopped before the time limit at iteration $done_iters ($left min left); requeueing"
      scontrol requeue "$SLURM_JOB_ID"
    else
      echo "job $SLURM_JOB_ID: stopped before the time limit; not requeued (HETERO_MAX_RESTARTS=$max_restarts restarts done)"
    fi
  fi
  exit 0
fi
if [ "${#reference[@]}" -gt 0 ]; then
  # The same steps on one grid (colocated on the same ranks): the hetero losses must match.
  mkdir -p "$run_dir/reference"
  rm -f "$run_dir/reference/metrics.jsonl"  # a requeue during the reference starts it anew
  run_step reference "${reference[@]}" --metrics-file "$run_dir/reference/metrics.jsonl"
  (cd "$root" && "$py" -m examples.mimo.cluster.parity "$run_dir/metrics.jsonl" \
    "$run_dir/reference/metrics.jsonl")
fi
