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
the two differ by more than the 2 % the ratio is judged by: the host drifted); with --profile
the second one is profiled too, by megatron's own profiler (compare_traces.py sets the two traces
side by side). Runs on CPU as a smoke test (--device cpu among the flags; no yardstick there).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from typing import List, Optional

LAYOUT = ["--llm-only", "--llm-dp", "1"]
PROFILED = 2
# ours / megatron.training must stay within this (issue 17); the bracketing runs must agree as
# closely, or the host's drift during the job, not the loops, decides the ratio
YARDSTICK_TOLERANCE = 0.02


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


def yardstick_rows(name: str, ours: dict, before: dict, after: dict) -> List[tuple]:
    """Rows for the two megatron.training runs that bracket ours, with our model FLOPs and
    tokens per iteration (the same model and batch), so their rates scale with the time."""
    rows = []
    for when, r in (("before", before), ("after", after)):
        label = f"megatron.training ({name}, {when})"
        if "error" in r or "error" in ours:
            rows.append((label, r if "error" in r else {"error": f"variant {name} failed"}))
            continue
        scale = ours["interval_iteration_ms"] / r["interval_iteration_ms"]
        rows.append((label, r | {"tokens_per_s_per_gpu": ours["tokens_per_s_per_gpu"] * scale,
                                 "tflops_per_gpu": ours["tflops_per_gpu"] and
                                 ours["tflops_per_gpu"] * scale}))
    if not any("error" in r for _, r in rows):
        ms = [r["interval_iteration_ms"] for _, r in rows]
        mean = sum(ms) / 2
        print(f"{name}: ours / megatron.training = {ours['interval_iteration_ms'] / mean:.3f} in "
              f"ms/iteration ({ours['interval_iteration_ms']:.1f} / {mean:.1f}, the mean of the "
              f"runs before and after ours, {ms[0]:.1f} and {ms[1]:.1f})", flush=True)
        drift = abs(ms[0] - ms[1]) / mean
        if drift > YARDSTICK_TOLERANCE:
            print(f"{name}: megatron.training's runs before and after ours differ by "
                  f"{100 * drift:.1f} %, more than the {100 * YARDSTICK_TOLERANCE:.0f} % "
                  f"tolerance: the host's speed drifted; repeat the job", flush=True)
    return rows


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
    p.add_argument("--log-dir", default=None)
    p.add_argument("--json-out", default=None, help="every row, as JSON")
    p.add_argument("flags", nargs=argparse.REMAINDER, help="-- then train_hetero flags")
    a = p.parse_args(argv)
    if not a.variant or a.measure < 1 or a.warmup < 0:
        p.error("give at least one --variant; --measure >= 1, --warmup >= 0")
    names = [spec.partition("=")[0] for spec in a.variant]
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
    if a.megatron_yardstick is not None:  # before ours; again after, to show any drift
        yard_flags = common + dict(variants)[a.megatron_yardstick]
        before = yardstick(a.megatron_yardstick, yard_flags, warmup=warmup, measure=a.measure,
                           log=os.path.join(logs, "megatron-before.log"))
    for name, flags in variants:
        iters = measured_end + (PROFILED if a.profile else 0)
        r = run(name, [*LAYOUT, *common, *flags, "--train-iters", str(iters),
                       "--log-interval", str(a.measure)], logs=logs, iteration=measured_end,
                profile_from=measured_end if a.profile else None)
        results.append((name, r))
        save(a.json_out, common, variants, results)  # each row as it comes: a run cut short keeps them
        print(f"{name}: " + (r["error"] if "error" in r
                             else f"{r['interval_iteration_ms']:.1f} ms/iteration"), flush=True)
    if a.megatron_yardstick is not None:
        after = yardstick(a.megatron_yardstick, yard_flags, warmup=warmup, measure=a.measure,
                          log=os.path.join(logs, "megatron-after.log"),
                          profile_dir=os.path.join(logs, "megatron-profile") if a.profile else None)
        results += yardstick_rows(a.megatron_yardstick, dict(results)[a.megatron_yardstick],
                                  before, after)
    print(f"iterations {warmup + 1}-{measured_end} of each run; logs in {logs}")
    save(a.json_out, common, variants, results)
    print(table(results, a.peak_tflops))
    return 0 if all("error" not in r for _, r in results) else 1


if __name__ == "__main__":
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "../../..")))
    sys.exit(main(sys.argv[1:]))
