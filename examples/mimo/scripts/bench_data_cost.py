"""What a real data path costs a training step: the same model, batch and flags trained on mock
data and on an energon dataset (or, with --data-provider hf, local Hugging Face data), one run
after the other, ms/iteration compared.

    python examples/mimo/scripts/bench_data_cost.py --nproc 1 --iters 40 --skip 10 \
        --data-path DS/blend.yaml --tokenizer-model DS/tokenizer -- TRAIN_HETERO_FLAGS

Mock samples are made in the training process; energon reads, decodes, tokenizes and batches in
loader workers, hf in the training process. Two measures: the time the training process waits in ``next(data)`` per step
(the log's "data wait", an upper bound of the data path's cost), and the ratio of the median
step times (which also moves with the tokens themselves: MoE routing differs between mock and
real text). The first run compiles the GPU kernels, so both runs drop their first --skip
iterations.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

STEP = re.compile(r"iteration\s+(\d+)/\s*\d+ .*?elapsed time per iteration \(ms\): ([0-9.]+) \|"
                  r" data wait \(ms\): ([0-9.]+)")


def step_times(log: str, skip: int) -> tuple:
    """(step ms, data wait ms) of the iterations after ``skip``."""
    rows = [(float(ms), float(wait)) for it, ms, wait in STEP.findall(log) if int(it) > skip]
    return [r[0] for r in rows], [r[1] for r in rows]


def train(nproc: int, flags: list, log_path: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(nproc), "-m", "examples.mimo.train_hetero", *flags]
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    text = open(log_path).read()
    if proc.returncode:
        sys.exit(f"bench_data_cost: {' '.join(cmd)} failed (exit {proc.returncode}); log: {log_path}")
    return text


def main(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--skip", type=int, default=10, help="Warm-up iterations left out.")
    p.add_argument("--data-provider", choices=("energon", "hf"), default="energon")
    p.add_argument("--data-path", required=True)
    p.add_argument("--tokenizer-model", required=True)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--mock-text-vocab", type=int, default=None,
                   help="For the mock run (keep its text ids below the tokenizer's image id).")
    p.add_argument("--log-dir", default=None)
    p.add_argument("flags", nargs=argparse.REMAINDER, help="-- then train_hetero flags")
    a = p.parse_args(argv)
    if a.skip >= a.iters - 2:
        p.error(f"--skip {a.skip} leaves fewer than 2 of --iters {a.iters} to compare")
    flags = [f for f in a.flags if f != "--"] + ["--train-iters", str(a.iters), "--log-interval", "1"]
    real = ["--data-provider", a.data_provider, "--data-path", a.data_path, "--tokenizer-model",
            a.tokenizer_model] + (["--num-workers", str(a.num_workers)]
                                  if a.data_provider == "energon" else [])
    logs = a.log_dir or tempfile.mkdtemp(prefix="bench_data_cost_")
    os.makedirs(logs, exist_ok=True)
    mock = ["--data-provider", "mock"] + ([] if a.mock_text_vocab is None
                                          else ["--mock-text-vocab", str(a.mock_text_vocab)])
    rows = []
    for name, extra in (("mock", mock), (a.data_provider, real)):
        steps, waits = step_times(train(a.nproc, flags + extra, os.path.join(logs, f"{name}.log")),
                                  a.skip)
        rows.append((name, statistics.median(steps), statistics.mean(steps), statistics.mean(waits),
                     len(steps)))
    print(f"{'data':>8} {'median ms':>10} {'mean ms':>9} {'data wait ms':>13} {'wait/step':>10} {'steps':>6}")
    for name, med, mean, wait, n in rows:
        print(f"{name:>8} {med:>10.1f} {mean:>9.1f} {wait:>13.2f} {100 * wait / mean:>9.2f}% {n:>6}")
    mock_ms, real_ms = rows[0][1], rows[1][1]
    print(f"{a.data_provider} / mock median step time: {real_ms / mock_ms:.4f} "
          f"({100 * (real_ms / mock_ms - 1):+.2f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
