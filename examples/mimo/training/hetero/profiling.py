"""Profiling chosen iterations, with Megatron's flags, and a summary of where the host stalls.

``--profile`` alone brackets iterations ``--profile-step-start`` + 1 .. ``--profile-step-end``
with cudaProfilerStart/Stop (for ``nsys profile --capture-range=cudaProfilerApi``); with
``--use-pytorch-profiler`` torch's profiler records them instead and writes ``rank-N.json.gz``
(a Chrome trace) and ``summary-rank-N.json`` per profiled rank: per iteration the wall time, GPU
busy time (union of kernel and copy intervals), kernel launches, host syncs (``.item()`` and the
CUDA runtime's synchronising calls), the largest GPU idle gaps, and on CUDA the source lines
outside torch that synchronise (torch's sync debug mode warns at each, with the Python stack;
waits on CUDA events are counted at ``torch.cuda.Event.synchronize``).
The profiler's own stacks are off: with gloo, torch 2.13 fails to decode the event names they
produce. Profiled iterations run slower; time the run with the logger, not with the profiler.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import json
import os
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

import torch

from examples.mimo.flags import QUIET, arg, derived, option, read

# CUDA runtime calls that block the host until the GPU catches up
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
ITEM_OP = "aten::_local_scalar_dense"  # every .item(), and int(t), float(t), bool(t) of a tensor
SYNC_WARNING = "called a synchronizing CUDA operation"  # torch.cuda.set_sync_debug_mode
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


GROUP = "profiling"


@dataclass(frozen=True)
class ProfileConfig:
    enabled: bool = option("--profile", QUIET, action="store_true",
                           help="Profile iterations --profile-step-start + 1 .. "
                                "--profile-step-end: cudaProfilerStart/Stop for nsys, or torch's "
                                "profiler with --use-pytorch-profiler.")
    use_pytorch_profiler: bool = option("--use-pytorch-profiler", QUIET, action="store_true")
    step_start: int = option("--profile-step-start", QUIET, type=int, default=10)
    step_end: int = option("--profile-step-end", QUIET, type=int, default=12)
    ranks: Tuple[int, ...] = option("--profile-ranks", QUIET, type=int, nargs="+", default=[0],
                                    help="Global ranks to profile.")
    # where the PyTorch profiler writes
    profile_dir: Optional[str] = derived(
        QUIET, arg("--profile-dir", default=None,
                    help="PyTorch profiler output (default: --tensorboard-dir/../torch_profile, "
                         "Megatron's place)."),
        default=None)


def from_args(args: argparse.Namespace, *, train_iters: int) -> ProfileConfig:
    cfg = ProfileConfig(**read(ProfileConfig, args),
                        profile_dir=args.profile_dir or (
                            os.path.join(args.tensorboard_dir, "..", "torch_profile")
                            if args.tensorboard_dir else None))
    if args.use_pytorch_profiler and not args.profile:
        raise ValueError("--use-pytorch-profiler only chooses the profiler; add --profile")
    if not cfg.enabled:
        return cfg
    if not 0 <= cfg.step_start < cfg.step_end <= train_iters:
        raise ValueError(f"--profile-step-start {cfg.step_start} and --profile-step-end "
                         f"{cfg.step_end} must satisfy 0 <= start < end <= --train-iters "
                         f"{train_iters}")
    if not cfg.use_pytorch_profiler and args.device == "cpu":
        raise ValueError("--profile without --use-pytorch-profiler marks the range for nsys, "
                         "which needs CUDA; on --device cpu add --use-pytorch-profiler")
    if cfg.use_pytorch_profiler and cfg.profile_dir is None:
        raise ValueError("--use-pytorch-profiler needs --profile-dir or --tensorboard-dir")
    return cfg


class Profiler:
    """Owned by the loop: ``before_step(completed)`` and ``after_step(completed)`` around each
    iteration, ``close()`` at the end (a run stopped early still writes what it recorded)."""

    def __init__(self, cfg: ProfileConfig, *, rank: int, device: torch.device):
        self.cfg = cfg
        self.rank = rank
        self.cuda = device.type == "cuda"
        self.active = cfg.enabled and (not cfg.ranks or rank in cfg.ranks)
        self._prof = None
        self._started: Optional[float] = None
        self._first = 0
        self._watching: Optional[contextlib.ExitStack] = None  # undoes _watch_syncs
        self._sites: collections.Counter = collections.Counter()

    def before_step(self, completed: int) -> None:
        if not self.active or completed != self.cfg.step_start:
            return
        self._sync()
        self._first = completed + 1
        if self.cfg.use_pytorch_profiler:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities)
            self._prof.start()
            if self.cuda:
                self._watch_syncs()
        else:
            torch.cuda.profiler.start()
        self._started = time.perf_counter()

    def after_step(self, completed: int) -> None:
        if self._started is not None and completed >= self.cfg.step_end:
            self._stop(completed)

    def close(self, completed: int) -> None:
        if self._started is not None:
            self._stop(completed)

    def _watch_syncs(self) -> None:
        self._sites = collections.Counter()
        self._watching = contextlib.ExitStack()
        self._watching.enter_context(warnings.catch_warnings())  # restores showwarning too
        warnings.simplefilter("always")
        shown = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None):
            if SYNC_WARNING not in str(message):
                return shown(message, category, filename, lineno, file, line)
            self._sites[_call_site(traceback.extract_stack()[:-1])] += 1

        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        self._watching.callback(torch.cuda.set_sync_debug_mode, "default")
        # The debug mode does not see waits on events (megatron's MoE dispatcher waits on one per
        # layer and micro-batch): count their callers too, for the profiled iterations only.
        wait = torch.cuda.Event.synchronize

        def event_wait(event):
            self._sites[_call_site(traceback.extract_stack()[:-1])] += 1
            return wait(event)

        torch.cuda.Event.synchronize = event_wait
        self._watching.callback(setattr, torch.cuda.Event, "synchronize", wait)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _stop(self, completed: int) -> None:
        self._sync()
        wall_ms = 1000.0 * (time.perf_counter() - self._started)
        self._started = None
        if self._prof is None:
            torch.cuda.profiler.stop()
            return
        sites = collections.Counter()
        if self._watching is not None:
            self._watching.close()
            self._watching, sites = None, self._sites
        self._prof.stop()
        iterations = completed - self._first + 1
        os.makedirs(self.cfg.profile_dir, exist_ok=True)
        summary = summarize(self._prof.events(), iterations=iterations, wall_ms=wall_ms,
                            sync_sites=sites)
        summary["iterations_profiled"] = [self._first, completed]
        path = os.path.join(self.cfg.profile_dir, f"summary-rank-{self.rank}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(path + ".tmp", path)
        self._prof.export_chrome_trace(os.path.join(self.cfg.profile_dir, f"rank-{self.rank}.json.gz"))
        self._prof = None
        print(f"profile of iterations {self._first}-{completed} (rank {self.rank}): "
              + one_line(summary) + f"; {path}", flush=True)


def _call_site(stack) -> str:
    """The innermost frame outside torch (and this module): the line that synchronised."""
    for frame in reversed(stack):
        path = frame.filename
        if "/torch/" not in path and not path.endswith(("profiling.py", "warnings.py")):
            for root in ("site-packages/", "dist-packages/"):
                path = path.split(root, 1)[-1]
            return f"{path}:{frame.lineno} ({frame.name})"
    return "?"


def _union(intervals: List[Tuple[float, float]]) -> List[Tuple[float, float]]:
    merged: List[List[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def summarize(events: Iterable, *, iterations: int, wall_ms: float,
              sync_sites: collections.Counter, top: int = 12) -> dict:
    """Per-iteration counts from torch profiler events (``profile.events()``) and the call sites
    torch's sync debug mode reported (``sync_sites``, empty on CPU)."""
    device, syncs, items, launches = [], collections.Counter(), 0, 0
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA:
            device.append((e.time_range.start, e.time_range.end, e.name))
        elif e.name in SYNC_CALLS:
            syncs[e.name] += 1
        elif e.name == ITEM_OP:
            items += 1
        elif e.name in LAUNCH_CALLS:
            launches += 1
    busy = _union([(a, b) for a, b, _ in device])
    # (idle microseconds, when the idle span began) between consecutive busy spans
    gaps = sorted(((start - end, end) for (_, end), (start, _) in zip(busy, busy[1:])), reverse=True)
    by_end = sorted((b, name) for _, b, name in device)
    by_start = sorted((a, name) for a, _, name in device)

    def neighbours(at: float) -> str:
        before = by_end[max(bisect.bisect_right(by_end, (at, "\uffff")) - 1, 0)][1]
        after = by_start[min(bisect.bisect_left(by_start, (at, "")), len(by_start) - 1)][1]
        return f"{before[:60]} -> {after[:60]}"

    n = max(iterations, 1)
    busy_ms = sum(b - a for a, b in busy) / 1000.0
    return {
        "iterations": iterations,
        "wall_ms_per_iteration": wall_ms / n,
        "gpu_busy_ms_per_iteration": busy_ms / n,
        "gpu_busy_fraction": busy_ms / wall_ms if wall_ms and device else None,
        "kernels_per_iteration": sum(1 for *_, name in device
                                     if not name.startswith(("Memcpy", "Memset"))) / n,
        "kernel_launch_calls_per_iteration": launches / n,
        "item_calls_per_iteration": items / n,
        "sync_calls_per_iteration": {k: v / n for k, v in sorted(syncs.items())},
        "gpu_idle_gaps_over_1ms_per_iteration": sum(1 for g, _ in gaps if g > 1000) / n,
        "gpu_idle_ms_in_gaps_over_1ms_per_iteration": sum(g for g, _ in gaps if g > 1000) / 1000 / n,
        "largest_gpu_idle_gaps": [{"ms": g / 1000, "between": neighbours(at)}
                                  for g, at in gaps[:top]],
        "sync_sites_per_iteration": {k: v / n for k, v in sync_sites.most_common(top)},
    }


def one_line(s: dict) -> str:
    busy = s["gpu_busy_fraction"]
    return (f"{s['wall_ms_per_iteration']:.1f} ms/iteration"
            + (f", GPU busy {100 * busy:.0f}%" if busy is not None else "")
            + f", {s['kernels_per_iteration']:.0f} kernels, {s['item_calls_per_iteration']:.0f} "
            f".item(), {sum(s['sync_calls_per_iteration'].values()):.0f} CUDA syncs per iteration")
