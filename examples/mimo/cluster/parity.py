"""Compare a run's loss curve with its single-grid reference (sbatch_job.sh's last step).

    python -m examples.mimo.cluster.parity RUN_METRICS REFERENCE_METRICS [--rtol 1e-5]

A requeued run logs some iterations twice (those after the checkpoint it resumed from): they must
be bit for bit the same, as a resume is exact. Then each iteration's loss and grad norm must match
the reference's within --rtol (the layouts sum in different orders). Exit 1 naming the first
iteration that differs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Dict, List, Sequence


def curve(path: str) -> Dict[int, dict]:
    """Training rows by iteration; an iteration logged twice must have logged the same values."""
    rows: Dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line) if line.strip() else None
            if not row or "lm_loss" not in row:
                continue
            it = row["iteration"]
            if it in rows and rows[it]["lm_loss"] != row["lm_loss"]:
                raise ValueError(f"{path}: iteration {it} logged twice with different losses "
                                 f"({rows[it]['lm_loss']!r} and {row['lm_loss']!r}): the resume "
                                 f"was not exact")
            rows[it] = row
    return rows


def compare(run: Dict[int, dict], reference: Dict[int, dict], rtol: float) -> List[str]:
    problems = []
    if sorted(run) != sorted(reference):
        problems.append(f"iterations differ: run {min(run, default=0)}-{max(run, default=0)} "
                        f"({len(run)}), reference {min(reference, default=0)}-"
                        f"{max(reference, default=0)} ({len(reference)})")
    for it in sorted(set(run) & set(reference)):
        for key in ("lm_loss", "grad_norm"):
            a, b = run[it].get(key), reference[it].get(key)
            if a is None or b is None:
                continue
            if not math.isclose(a, b, rel_tol=rtol, abs_tol=0.0):
                problems.append(f"iteration {it}: {key} {a!r} vs reference {b!r}")
    return problems


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m examples.mimo.cluster.parity")
    p.add_argument("run")
    p.add_argument("reference")
    p.add_argument("--rtol", type=float, default=1e-5)
    args = p.parse_args(argv)
    try:
        run, reference = curve(args.run), curve(args.reference)
    except (OSError, ValueError) as err:
        print(f"parity: error: {err}", file=sys.stderr)
        return 1
    problems = compare(run, reference, args.rtol)
    if problems:
        print(f"parity: FAILED ({len(problems)} difference(s)); first: {problems[0]}", file=sys.stderr)
        return 1
    worst = max((abs(run[i]["lm_loss"] - reference[i]["lm_loss"]) / abs(reference[i]["lm_loss"])
                 for i in run), default=0.0)
    print(f"parity: {len(run)} iterations match the single-grid reference "
          f"(largest relative loss difference {worst:.2e}, rtol {args.rtol:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
