"""Preemption-safe exits, as Megatron users know them: ``--exit-signal-handler`` (a signal makes
every rank finish its iteration, save, and exit 0) and ``--exit-duration-in-mins`` (the same
before the job's wall-clock limit).

A signal reaches one rank or all of them at slightly different iterations, so the ranks decide
together after each iteration: one small all-reduce (a host sync per iteration, only when either
flag is set). A second signal while the checkpoint is written only sets the flag again; the save
is atomic (checkpointing.py), so the previous checkpoint is never harmed.
"""

from __future__ import annotations

import os
import signal
import time
from typing import List, Optional

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

    def finish(self) -> None:
        """Training is over and saved: the signal is ignored for the rest of the process. Python
        restores the default action of a handled signal when the interpreter finalizes, so a
        SIGTERM arriving then (SLURM's ``--signal`` may come up to a minute early, or late)
        would turn a clean exit into death by signal; an ignored one stays ignored."""
        if self.signal_name is not None:
            ignore_signal(self.signal_name)

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


def leave_signal_to_ranks(torchrun_args, signal_name: str) -> None:
    """Make the launcher (torchrun's agent, in this process) pass ``signal_name`` on to its ranks
    instead of ending them.

    torchrun's agent turns SIGTERM, SIGINT, SIGHUP and SIGQUIT into "stop the workers": SIGTERM
    to each rank, SIGKILL 30 s later, exit status != 0. Any other signal (SIGUSR1) kills the agent
    itself. Under --exit-signal-handler that loses the save, so the agent is told not to handle
    this one signal (torchrun's --signals-to-handle) and this process forwards it to its direct
    children, the ranks. A rank that also got it from the scheduler (SLURM signals every process
    of a step) only sets its flag twice.
    """
    handled = getattr(torchrun_args, "signals_to_handle", None)
    if handled is None:
        raise ValueError("--exit-signal-handler: this torch's torchrun has no --signals-to-handle, "
                         "so it would end the ranks on the signal instead of letting them save")
    # never empty: torchrun would warn about a signal named ""
    torchrun_args.signals_to_handle = ",".join(
        s for s in (x.strip() for x in handled.split(",")) if s and s != signal_name) or "SIGQUIT"
    signal.signal(getattr(signal, signal_name), _forward_to_children)


def ignore_signal(signal_name: str) -> None:
    """For the rest of the process (ExitConditions.finish; the launcher once its ranks exited)."""
    signal.signal(getattr(signal, signal_name), signal.SIG_IGN)


def _forward_to_children(signum, frame) -> None:
    for pid in child_pids(os.getpid()):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def child_pids(parent: int) -> List[int]:
    """Direct children of ``parent``, from /proc (Linux; the ranks are started with Popen)."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        if int(stat[stat.rindex(")") + 2:].split()[1]) == parent:
            children.append(int(entry))
    return children


def die_with_parent() -> None:
    """This process gets SIGKILL when its parent ends (Linux's PR_SET_PDEATHSIG): a rank when its
    launcher is killed outright, the launcher when a wrapper that only times it is
    (run_hetero_mock_train.sh's ``timeout``). A parent that ended before this call leaves the
    process reparented, and then it exits at once. No-op where prctl is not available."""
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent or parent == 1:
        os._exit(1)
