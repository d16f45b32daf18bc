"""Preemption-safe exits, as Megatron users know them: ``--exit-signal-handler`` (a signal makes
every rank finish its iteration, save, and exit 0) and ``--exit-duration-in-mins`` (the same
before the job's wall-clock limit).

A signal reaches one rank or all of them at slightly different iterations, so the ranks decide
together after each iteration: one small all-reduce (a host sync per iteration, only when either
flag is set). A second signal while the checkpoint is written only sets the flag again; the save
is atomic (checkpointing.py), so the previous checkpoint is never harmed.
"""

from __future__ import annotations

import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

# The job's clock starts with the process (Megatron counts from its own start too), not with
# training: model building and checkpoint loading use up the allocation as well.
PROCESS_START = time.monotonic()
SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")


class ExitConditions:
    def __init__(self, *, signal_name: Optional[str], duration_mins: Optional[float],
                 device: torch.device):
        self.signal_name, self.duration_mins, self.device = signal_name, duration_mins, device
        self.received = False
        if signal_name is not None:
            # Installed for the rest of the process: a signal that comes after the save, while
            # the process tears down, is then absorbed too.
            signal.signal(getattr(signal, signal_name), self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.received = True

    @property
    def enabled(self) -> bool:
        return self.signal_name is not None or self.duration_mins is not None

    def reason(self) -> Optional[str]:
        """Collective over the world, after an iteration: why every rank stops now, or None."""
        if not self.enabled:
            return None
        elapsed = (time.monotonic() - PROCESS_START) / 60.0
        timed_out = self.duration_mins is not None and elapsed >= self.duration_mins
        flags = torch.tensor([float(self.received), float(timed_out)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0].item():
            return f"{self.signal_name} received (--exit-signal-handler)"
        if flags[1].item():
            return f"--exit-duration-in-mins {self.duration_mins:g} reached"
        return None
