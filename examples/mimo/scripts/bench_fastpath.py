"""LLM-only variants of one model side by side on one GPU: backends, micro-batch sizes, FP8,
recompute, fusions. Each variant is one training run; the table holds ratios to the first:

    python examples/mimo/scripts/bench_fastpath.py --warmup 4 --measure 8 --profile \\
        --variant "local=--transformer-impl local" \\
        --variant "te=--transformer-impl transformer_engine" -- COMMON_TRAIN_HETERO_FLAGS

Figures are those of iterations warmup+1 .. warmup+measure (the first iterations compile
kernels). With --profile, two more iterations run under torch's profiler afterwards
(profiling.py) and the table adds GPU busy time, kernels and host syncs per iteration; the
measured interval is not profiled. --megatron-yardstick NAME runs megatron-core's own training
loop on variant NAME's model and batch (megatron_yardstick.py; Python 3.12, TE, GPU) before and
after our variants, adds both as rows and prints our ms/iteration over their mean (and says when
the two differ by more than the 2 % the ratio is judged by: the host drifted). With
--yardstick-rounds R the two loops alternate R times (M O M ... O M), each of our runs is judged
by the two around it, and the verdict is the rounds' mean ratio with 95 % confidence bounds.
With --profile the last megatron.training run is profiled too, by megatron's own profiler
(compare_traces.py sets the two traces side by side). Runs on CPU as a smoke test (--device cpu
among the flags; no yardstick there).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from typing import List, Optional

LAYOUT = ["--llm-only", "--llm-dp", "1"]
PROFILED = 2
# ours / megatron.training must stay within this (issue 17); the bracketing runs must agree as
# closely, or the host's drift during the job, not the loops, decides the ratio
YARDSTICK_TOLERANCE = 0.02
YARDSTICK_MIN_ROUNDS = 3


def run(name: str, flags: List[str], *, logs: str, iteration: int,
        profile_from: Optional[int]) -> dict:
    """The metrics row of ``iteration`` (an interval row), plus the profile summary if any."""
    metrics = os.path.join(logs, f"{name}.jsonl")
    extra = []
    if profile_from is not None:
        extra = ["--profile", "--use-pytorch-profiler", "--profile-step-start", str(profile_from),
                 "--profile-step-end", str(profile_from + PROFILED), "--profile-dir",
                 os.path.join(logs, f"{name}-profile")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "examples.mimo.train_hetero", *flags, *extra, "--metrics-file", metrics]
    log = os.path.join(logs, f"{name}.log")
    with open(log, "w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True).returncode
    if code:
        from examples.mimo.scripts.megatron_yardstick import failure_line

        return {"error": f"exit {code}: {failure_line(open(log, errors='replace').read())}",
                "log": log}
    rows = [json.loads(line) for line in open(metrics) if line.strip()]
    row = next(r for r in rows if r.get("iteration") == iteration and "interval_iteration_ms" in r)
    if profile_from is not None:
        with open(os.path.join(logs, f"{name}-profile", "summary-rank-0.json")) as f:
            row["profile"] = json.load(f)
    return row


def yardstick(name: str, flags: List[str], *, warmup: int, measure: int, log: str,
              profile_dir: Optional[str] = None) -> dict:
    """megatron.training's ms/iteration on variant ``name``'s model and batch."""
    from examples.mimo.scripts.megatron_yardstick import run as megatron_run

    try:
        ms = megatron_run(flags, warmup=warmup, measure=measure, log=log,
                          profile_dir=profile_dir, profiled=PROFILED)
    except (RuntimeError, ValueError) as e:
        return {"error": str(e)[-300:], "log": log}
    print(f"megatron.training ({name}): {ms:.1f} ms/iteration", flush=True)
    return {"interval_iteration_ms": ms, "log": log}


def yardstick_rows(name: str, ours: List[dict], megatron: List[dict]) -> List[tuple]:
    """Rows for megatron.training's runs, which alternate with ours (M O M ... O M, one more of
    theirs), with our model FLOPs and tokens per iteration (the same model and batch), so their
    rates scale with the time. Prints each round's ratio (ours over the mean of the two runs
    around it) and, over several rounds, the verdict."""
    assert len(megatron) == len(ours) + 1
    several = len(ours) > 1
    labels = ([f"run {k}" for k in range(1, len(megatron) + 1)] if several
              else ["before", "after"])
    ok = next((r for r in ours if "error" not in r), None)
    rows = []
    for label, r in zip(labels, megatron):
        label = f"megatron.training ({name}, {label})"
        if "error" in r or ok is None:
            rows.append((label, r if "error" in r else {"error": f"variant {name} failed"}))
            continue
        scale = ok["interval_iteration_ms"] / r["interval_iteration_ms"]
        rows.append((label, r | {"tokens_per_s_per_gpu": ok["tokens_per_s_per_gpu"] * scale,
                                 "tflops_per_gpu": ok["tflops_per_gpu"] and
                                 ok["tflops_per_gpu"] * scale}))
    ratios = []
    for k, r in enumerate(ours):
        around = megatron[k:k + 2]
        if "error" in r or any("error" in m for m in around):
            continue
        where = f"{name}, round {k + 1}" if several else name
        ms = [m["interval_iteration_ms"] for m in around]
        mean = sum(ms) / 2
        ratios.append(r["interval_iteration_ms"] / mean)
        print(f"{where}: ours / megatron.training = {ratios[-1]:.3f} in ms/iteration "
              f"({r['interval_iteration_ms']:.1f} / {mean:.1f}, the mean of the runs before and "
              f"after ours, {ms[0]:.1f} and {ms[1]:.1f})", flush=True)
        drift = abs(ms[0] - ms[1]) / mean
        if drift > YARDSTICK_TOLERANCE:
            print(f"{where}: megatron.training's runs before and after ours differ by "
                  f"{100 * drift:.1f} %, more than the {100 * YARDSTICK_TOLERANCE:.0f} % "
                  f"tolerance: the host's speed drifted"
                  f"{'' if several else '; repeat the job'}", flush=True)
    if several:
        verdict(name, ratios)
    return rows


# One-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (beyond: the 30th, which
# errs wide).
T95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771,
       1.761, 1.753, 1.746, 1.740, 1.734, 1.729, 1.725, 1.721, 1.717, 1.714, 1.711, 1.708, 1.706,
       1.703, 1.701, 1.699, 1.697)


def verdict(name: str, ratios: List[float]):
    """The requirement judged on the mean of the rounds' ratios, with a 95 % confidence bound on
    each side. Alternating the loops turns the host's drift (seen on the H200: up to 25 % between
    runs minutes apart, more than any difference of the loops) into noise that the rounds average
    out; the bounds say when there were enough rounds to decide."""
    n = len(ratios)
    if n < YARDSTICK_MIN_ROUNDS:
        print(f"{name}: {n} rounds measured; a verdict needs {YARDSTICK_MIN_ROUNDS}: add rounds",
              flush=True)
        return
    mean = statistics.fmean(ratios)
    # Adjacent rounds share a megatron.training run: with independent run-to-run noise their
    # ratios correlate by 1/6, which widens the variance of the mean by less than 4/3.
    half = T95[min(n - 1, len(T95)) - 1] * statistics.stdev(ratios) * math.sqrt(4 / 3 / n)
    lo, hi, limit = mean - half, mean + half, 1 + YARDSTICK_TOLERANCE
    print(f"{name}: ours / megatron.training over {n} rounds: mean {mean:.3f} (rounds "
          f"{min(ratios):.3f}-{max(ratios):.3f}), one-sided 95 % bounds {lo:.3f} and {hi:.3f}",
          flush=True)
    print(f"{name}: " + (f"within the {limit:.2f} requirement (the upper bound is below it)"
                         if hi <= limit else
                         f"over the {limit:.2f} requirement (the lower bound is above it)"
                         if lo > limit else
                         f"undecided: the bounds straddle {limit:.2f}; add rounds"), flush=True)


def save(path: Optional[str], common: List[str], variants: List[tuple], results: List[tuple]):
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump({"common": common, "variants": dict(variants),
                       "rows": {n: r for n, r in results}}, f, indent=1)
        os.replace(path + ".tmp", path)


def fmt(value: Optional[float], spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def table(results: List[tuple], peak_tflops: Optional[float]) -> str:
    head = ("| variant | ms/iter | vs first | tokens/s | TFLOP/s | % of peak | peak GiB "
            "| GPU busy | kernels/iter | CUDA syncs/iter | .item()/iter |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    base = next((r for _, r in results if "error" not in r), None)
    for name, r in results:
        if "error" in r:
            lines.append(f"| {name} | {r['error']} |" + " |" * (head.count("|") - 3))
            continue
        ms, tf, p = r["interval_iteration_ms"], r["tflops_per_gpu"], r.get("profile")
        peak = max((v for k, v in r.items() if k.endswith("peak_memory_gib")), default=None)
        lines.append(
            f"| {name} | {ms:.1f} | {ms / base['interval_iteration_ms']:.3f} "
            f"| {r['tokens_per_s_per_gpu']:.0f} | {fmt(tf)} "
            f"| {fmt(100 * tf / peak_tflops if tf and peak_tflops else None)} | {fmt(peak, '.2f')} "
            f"| {fmt(100 * p['gpu_busy_fraction'] if p and p['gpu_busy_fraction'] else None, '.0f')}"
            f"{'%' if p and p['gpu_busy_fraction'] else ''} "
            f"| {fmt(p and p['kernels_per_iteration'], '.0f')} "
            f"| {fmt(p and sum(p['sync_calls_per_iteration'].values()), '.0f')} "
            f"| {fmt(p and p['item_calls_per_iteration'], '.0f')} |")
    return "\n".join(lines)


def main(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                   help="a named set of extra train_hetero flags; repeat for each variant")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--measure", type=int, default=8)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak, for the '%% of peak' column")
    p.add_argument("--megatron-yardstick", metavar="NAME", default=None,
                   help="also time megatron.training on variant NAME")
    p.add_argument("--yardstick-rounds", type=int, default=1, metavar="R",
                   help="alternate megatron.training and our yardstick variant R times "
                        "(M O M ... O M); R >= 3 gives a verdict on the mean ratio with 95 %% "
                        "confidence bounds")
    p.add_argument("--log-dir", default=None)
    p.add_argument("--json-out", default=None, help="every row, as JSON")
    p.add_argument("flags", nargs=argparse.REMAINDER, help="-- then train_hetero flags")
    a = p.parse_args(argv)
    if not a.variant or a.measure < 1 or a.warmup < 0 or a.yardstick_rounds < 1:
        p.error("give at least one --variant; --measure >= 1, --warmup >= 0, "
                "--yardstick-rounds >= 1")
    names = [spec.partition("=")[0] for spec in a.variant]
    if a.yardstick_rounds > 1 and a.megatron_yardstick is None:
        p.error(f"--yardstick-rounds {a.yardstick_rounds} needs --megatron-yardstick NAME")
    if a.megatron_yardstick is not None and a.megatron_yardstick not in names:
        p.error(f"--megatron-yardstick {a.megatron_yardstick} is not one of the variants {names}")
    variants = []
    for spec in a.variant:
        name, sep, flags = spec.partition("=")
        if not sep or not name:
            p.error(f"--variant {spec!r} must be NAME=FLAGS")
        variants.append((name, shlex.split(flags)))
    common = [f for f in a.flags if f != "--"]
    for flag in LAYOUT[:2] + ["--train-iters", "--log-interval", "--colocated", "--profile"]:
        if flag in common or any(flag in v for _, v in variants):
            p.error(f"{flag} is set by the benchmark; leave it out")
    warmup = -(-a.warmup // a.measure) * a.measure  # the measured interval is a logged one
    measured_end = warmup + a.measure
    logs = a.log_dir or tempfile.mkdtemp(prefix="bench_fastpath_")
    os.makedirs(logs, exist_ok=True)
    results = []
    yard, megatron_runs, ours_runs = a.megatron_yardstick, [], []
    if yard is not None:
        yard_flags = common + dict(variants)[yard]
        megatron_runs.append(yardstick(yard, yard_flags, warmup=warmup, measure=a.measure,
                                       log=os.path.join(logs, "megatron-1.log")))
    for k in range(1, (a.yardstick_rounds if yard is not None else 1) + 1):
        # round 1 runs every variant; later rounds only the yardstick's, between its runs
        for name, flags in (variants if k == 1 else [(yard, dict(variants)[yard])]):
            profiled = a.profile and k == 1
            iters = measured_end + (PROFILED if profiled else 0)
            label, log_name = (name, name) if k == 1 else (f"{name} (round {k})", f"{name}-round{k}")
            r = run(log_name, [*LAYOUT, *common, *flags, "--train-iters", str(iters),
                               "--log-interval", str(a.measure)], logs=logs,
                    iteration=measured_end, profile_from=measured_end if profiled else None)
            results.append((label, r))
            save(a.json_out, common, variants, results)  # each row as it comes: a run cut short keeps them
            print(f"{label}: " + (r["error"] if "error" in r
                                  else f"{r['interval_iteration_ms']:.1f} ms/iteration"), flush=True)
            if name == yard:
                ours_runs.append(r)
        if yard is not None:
            last = k == a.yardstick_rounds
            megatron_runs.append(yardstick(
                yard, yard_flags, warmup=warmup, measure=a.measure,
                log=os.path.join(logs, f"megatron-{k + 1}.log"),
                profile_dir=os.path.join(logs, "megatron-profile") if a.profile and last else None))
    if yard is not None:
        results += yardstick_rows(yard, ours_runs, megatron_runs)
    print(f"iterations {warmup + 1}-{measured_end} of each run; logs in {logs}")
    save(a.json_out, common, variants, results)
    print(table(results, a.peak_tflops))
    return 0 if all("error" not in r for _, r in results) else 1


if __name__ == "__main__":
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "../../..")))
    sys.exit(main(sys.argv[1:]))
