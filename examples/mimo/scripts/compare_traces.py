"""Two torch-profiler Chrome traces side by side: per iteration the GPU busy time, kernels, and the
host time of each operator, largest differences first. For our run against megatron.training's
(bench_fastpath.py --megatron-yardstick NAME --profile writes both):

    python examples/mimo/scripts/compare_traces.py --iterations 2 \\
        LOGS/NAME-profile/rank-0.json.gz LOGS/megatron-profile/torch_profile/rank-0.json.gz

Same operators with the same counts but different host times mean the host ran at a different
speed, not that one loop does more; extra counts are extra work.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
from typing import Dict, List, Tuple

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATEGORIES = ("cpu_op", "cuda_runtime", "cuda_driver")


def load(path: str) -> List[dict]:
    with (gzip.open(path) if path.endswith(".gz") else open(path)) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def gpu_summary(events: List[dict], iterations: int) -> Dict[str, float]:
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in GPU_CATEGORIES)
    busy, start, end = 0.0, None, None
    for a, b in spans:  # union of the intervals
        if end is None or a > end:
            busy += 0.0 if end is None else end - start
            start, end = a, b
        else:
            end = max(end, b)
    busy += 0.0 if end is None else end - start
    return {"kernels": sum(e.get("cat") == "kernel" for e in events) / iterations,
            "gpu_busy_ms": busy / 1000 / iterations}


def host_ops(events: List[dict], iterations: int) -> Dict[str, Tuple[float, float]]:
    """Operator -> (host ms, calls) per iteration; nested operators count in each parent too."""
    ms, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") in HOST_CATEGORIES:
            ms[e["name"]] += e["dur"] / 1000
            calls[e["name"]] += 1
    return {n: (ms[n] / iterations, calls[n] / iterations) for n in ms}


def compare(a: List[dict], b: List[dict], *, iterations: int, top: int) -> str:
    ga, gb = gpu_summary(a, iterations), gpu_summary(b, iterations)
    lines = ["| per iteration | A | B | A / B |", "| --- | --- | --- | --- |"]
    for k in ga:
        lines.append(f"| {k} | {ga[k]:.1f} | {gb[k]:.1f} | {ga[k] / gb[k]:.3f} |" if gb[k] else
                     f"| {k} | {ga[k]:.1f} | {gb[k]:.1f} | - |")
    oa, ob = host_ops(a, iterations), host_ops(b, iterations)
    zero = (0.0, 0.0)
    names = sorted(set(oa) | set(ob), key=lambda n: -abs(oa.get(n, zero)[0] - ob.get(n, zero)[0]))
    lines += ["", "| operator (host) | A ms | B ms | A calls | B calls |", "| --- | --- | --- | --- | --- |"]
    for n in names[:top]:
        (ma, ca), (mb, cb) = oa.get(n, zero), ob.get(n, zero)
        lines.append(f"| {n[:80]} | {ma:.1f} | {mb:.1f} | {ca:.0f} | {cb:.0f} |")
    return "\n".join(lines)


def main(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace_a")
    p.add_argument("trace_b")
    p.add_argument("--iterations", type=int, default=2, help="iterations each trace holds")
    p.add_argument("--top", type=int, default=30)
    a = p.parse_args(argv)
    if a.iterations < 1 or a.top < 1:
        p.error(f"--iterations {a.iterations} and --top {a.top} must be >= 1")
    print(compare(load(a.trace_a), load(a.trace_b), iterations=a.iterations, top=a.top))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
