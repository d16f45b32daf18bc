"""The same model, global batch and data in each layout the GPUs allow, one after the other, in
one table with ratios:

    python examples/mimo/scripts/bench_hetero.py --nproc N --encoder-gpus E \
        --warmup 8 --measure 16 -- TRAIN_HETERO_FLAGS

- hetero: the encoder on E GPUs (--encoder-dp E), the LLM on the other N - E (--llm-dp N - E);
- colocated: both modules on all N GPUs (--colocated, DP N each);
- LLM-only: the LLM alone on its N - E GPUs (N on one GPU): the upper bound of the LLM branch.

On one GPU (--nproc 1) hetero is impossible and colocated is compared with LLM-only. Each run
logs every --measure iterations after --warmup (rounded up to a multiple of --measure; the first
iterations compile kernels), so the figures are those of the last log interval: ms/iteration,
tokens/s/GPU, model TFLOP/s/GPU of the job and of each branch on its own GPUs (logger.py), peak
memory and the per-branch timers. TFLOP/s count the model's FLOPs: LLM-only's have no encoder.
Runs on CPU/gloo as a smoke test (--device cpu among the flags).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import List, Optional


def layouts(nproc: int, encoder_gpus: int) -> List[tuple]:
    """(name, world size, layout flags) of each layout N GPUs allow."""
    out = []
    if nproc >= 2:
        out.append(("hetero", nproc, ["--encoder-dp", str(encoder_gpus),
                                      "--llm-dp", str(nproc - encoder_gpus)]))
    out.append(("colocated", nproc, ["--colocated", "--encoder-dp", str(nproc),
                                     "--llm-dp", str(nproc)]))
    llm = nproc - encoder_gpus if nproc >= 2 else nproc
    out.append(("llm-only", llm, ["--llm-only", "--llm-dp", str(llm)]))
    return out


def run(nproc: int, flags: list, metrics: str, log: str) -> dict:
    """The last log interval's metrics row of one training run."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(nproc), "-m", "examples.mimo.train_hetero", *flags, "--metrics-file", metrics]
    with open(log, "w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True).returncode
    if code:
        sys.exit(f"bench_hetero: {' '.join(cmd)} failed (exit {code}); log: {log}")
    rows = [json.loads(line) for line in open(metrics) if line.strip()]
    return [r for r in rows if "interval_iteration_ms" in r][-1]


def fmt(value: Optional[float], spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def table(results: List[tuple]) -> str:
    base = next((r for name, _, r in results if name == "colocated"), None)
    head = ("| layout | GPUs | ms/iter | vs colocated | tokens/s/GPU | TFLOP/s/GPU | vs colocated "
            "| encoder TFLOP/s/GPU | LLM TFLOP/s/GPU | peak GiB (enc/llm/model) "
            "| fwd/bwd/bridge/grad-sync/optim ms (enc; llm; model) |")
    lines = [head, "| " + " | ".join("---" for _ in range(head.count("|") - 1)) + " |"]
    for name, gpus, r in results:
        timers, memory = [], []
        for label in ("encoder", "llm", "model"):
            if f"{label}_forward_ms" in r:
                timers.append("/".join(fmt(r[f"{label}_{k}_ms"]) for k in
                                       ("forward", "backward", "bridge", "grad_sync", "optimizer")))
            memory.append(fmt(r.get(f"{label}_peak_memory_gib"), ".2f"))
        ms, tflops = r["interval_iteration_ms"], r["tflops_per_gpu"]
        lines.append(
            f"| {name} | {gpus} | {ms:.1f} | {fmt(ms / base['interval_iteration_ms'] if base else None, '.3f')} "
            f"| {r['tokens_per_s_per_gpu']:.1f} | {fmt(tflops, '.2f')} "
            f"| {fmt(tflops / base['tflops_per_gpu'] if base else None, '.3f')} "
            f"| {fmt(r['encoder_tflops_per_gpu'], '.2f')} | {fmt(r['llm_tflops_per_gpu'], '.2f')} "
            f"| {'/'.join(memory)} | {'; '.join(timers)} |")
    return "\n".join(lines)


def main(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=1, help="GPUs (ranks) of the hetero and colocated runs.")
    p.add_argument("--encoder-gpus", type=int, default=1, help="The hetero encoder's GPUs.")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--measure", type=int, default=16)
    p.add_argument("--log-dir", default=None)
    p.add_argument("--profile-out", default=None,
                   help="write each run's flags and last interval row here, as JSON: the "
                        "measured profile of plan_layout.py --profile")
    p.add_argument("flags", nargs=argparse.REMAINDER, help="-- then train_hetero flags")
    a = p.parse_args(argv)
    if a.nproc < 1 or a.measure < 1 or a.warmup < 0:
        p.error("--nproc and --measure must be >= 1, --warmup >= 0")
    if a.nproc >= 2 and not 1 <= a.encoder_gpus < a.nproc:
        p.error(f"--encoder-gpus {a.encoder_gpus} must be in [1, --nproc {a.nproc})")
    warmup = -(-a.warmup // a.measure) * a.measure
    flags = [f for f in a.flags if f != "--"]
    for layout_flag in ("--encoder-dp", "--llm-dp", "--colocated", "--llm-only", "--train-iters",
                        "--log-interval"):
        if layout_flag in flags:
            p.error(f"{layout_flag} is set by the benchmark for each layout; leave it out")
    flags += ["--train-iters", str(warmup + a.measure), "--log-interval", str(a.measure)]
    logs = a.log_dir or tempfile.mkdtemp(prefix="bench_hetero_")
    os.makedirs(logs, exist_ok=True)
    results = []
    for name, gpus, extra in layouts(a.nproc, a.encoder_gpus):
        r = run(gpus, flags + extra, os.path.join(logs, f"{name}.jsonl"),
                os.path.join(logs, f"{name}.log"))
        results.append((name, gpus, r))
        print(f"{name}: {r['interval_iteration_ms']:.1f} ms/iteration", flush=True)
    print(f"iterations {warmup + 1}-{warmup + a.measure} of each run; logs in {logs}")
    if a.profile_out:
        runs = [{"layout": name, "world": gpus, "flags": flags + extra, "row": r}
                for (name, gpus, extra), (_, _, r) in zip(layouts(a.nproc, a.encoder_gpus), results)]
        with open(a.profile_out, "w") as f:
            json.dump({"runs": runs}, f, indent=1)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
