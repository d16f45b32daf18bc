"""Where an iteration's time goes, per rank and per branch.

Spans are timed with CUDA events on the GPU (read once per iteration, after the step's own loss
sync, so timing adds no host sync) and with the wall clock on CPU. Each rank times its own
branch: forward (model forward and loss), bridge (waits in the communicator's send/recv: the
encoder waiting for gradients, the LLM waiting for embeddings), grad sync (DP all-reduce and
gradient normalisation), optimizer; backward is the schedule's span minus the other three, so
it also holds whatever the schedule does around them. ``branch_times`` gathers them at log
iterations only (one small all-gather).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import defaultdict
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

SPANS = ("forward", "bridge", "grad-sync", "optimizer", "schedule")
# communicator methods that block on the other branch
COMM_METHODS = ("recv_forward", "send_forward", "recv_backward", "send_backward",
                "send_forward_recv_backward", "send_backward_recv_forward")


class Timers:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._open: Dict[str, list] = defaultdict(list)  # name -> [(start, end), ...]
        self._ms: Dict[str, float] = defaultdict(float)
        self._depth: Dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def span(self, name: str):
        if self._depth[name]:  # a span inside one of its own name (nested communicator calls)
            yield
            return
        self._depth[name] += 1
        start = self._mark()
        try:
            yield
        finally:
            self._open[name].append((start, self._mark()))
            self._depth[name] -= 1

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            with self.span(name):
                return fn(*args, **kwargs)
        return timed

    def end_iteration(self) -> None:
        """Fold the iteration's spans into milliseconds (its events have completed by now)."""
        for name, pairs in self._open.items():
            for start, end in pairs:
                self._ms[name] += (start.elapsed_time(end) if self.cuda
                                   else 1000.0 * (end - start))
        self._open.clear()

    def take(self) -> Dict[str, float]:
        """Milliseconds per span since the last take, with backward derived."""
        ms = {name: self._ms.get(name, 0.0) for name in SPANS}
        ms["backward"] = max(0.0, ms["schedule"] - ms["forward"] - ms["bridge"] - ms["grad-sync"])
        self._ms.clear()
        return ms


def instrument_communicator(communicator, timers: Timers) -> None:
    """Times this rank's waits on the bridge; wraps the instance's own methods, not the class."""
    if communicator is None:
        return
    for name in COMM_METHODS:
        if hasattr(communicator, name):
            setattr(communicator, name, timers.wrap("bridge", getattr(communicator, name)))


def peak_memory_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 1024 ** 3 if device.type == "cuda" else 0.0


def branch_times(local: Dict[str, float], *, label: str, device: torch.device,
                 iterations: int) -> Dict[str, Dict[str, float]]:
    """Every rank's spans -> per branch label ("encoder", "llm"; "model" when colocated), the
    slowest rank's ms per iteration of each span and its peak memory (GiB). Collective over the
    world; the result on every rank."""
    mine = {k: v / max(iterations, 1) for k, v in local.items()} | {
        "peak_memory_gib": peak_memory_gib(device)}
    everyone: List[tuple] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (label, mine))
    out: Dict[str, Dict[str, float]] = {}
    for name, times in everyone:
        branch = out.setdefault(name, {})
        for k, v in times.items():
            branch[k] = max(branch.get(k, 0.0), v)
    return out


class StartupClock:
    """Wall time of each start-up phase up to the end of this process's first iteration (which
    holds kernel compilation on GPUs), reported once as the slowest rank's per phase, like
    Megatron's setup timers. The CUDA synchronisation per lap makes a phase own its GPU work; it
    happens a handful of times, before training."""

    def __init__(self):
        self.phases: Dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
        self._last = now

    def report(self) -> Optional[str]:
        """Collective: every rank calls it once; rank 0 gets the line, the others None."""
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.phases)
        if dist.get_rank() != 0:
            return None
        return startup_line(gathered)


def startup_line(per_rank: List[Dict[str, float]]) -> str:
    first = list(per_rank[0])
    slowest = {name: max(r.get(name, 0.0) for r in per_rank) for name in first}
    *setup, last = first
    return ("start-up, slowest rank per phase: "
            + ", ".join(f"{name} {slowest[name]:.1f} s" for name in setup)
            + f"; {last} {slowest[last]:.1f} s (slowest rank in all: "
            f"{max(sum(r.values()) for r in per_rank):.1f} s)")
