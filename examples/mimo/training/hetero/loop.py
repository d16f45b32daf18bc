"""The training loop (run.py builds what it uses): step, stop on divergence, save, stop on an
exit condition, evaluate; after the last iteration a final evaluation and save."""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist

from examples.mimo.training.hetero.logger import report_peak_memory
from examples.mimo.training.hetero.run import build_run
from examples.mimo.training.hetero.runtime import Runtime
from examples.mimo.training.hetero.timers import StartupClock


def train(rt: Runtime, *, startup: Optional[StartupClock] = None) -> list:
    """Run the configured iterations; returns the StepResults (losses only on the logging rank).
    ``startup``: the clock started with the process (train_hetero), else one started here."""
    run = build_run(rt, startup or StartupClock())
    state, last = run.state, run.cfg.schedule.train_iters
    stop = None
    try:
        while state.iteration < last:
            result = run.step()
            run.stop_if_diverged(result)
            if run.save_due():
                run.save()
            if run.exit_interval_reached():
                break  # ends as a finished run does
            stop = run.exit_reason()
            if stop is not None:
                break
            if state.iteration < last:
                run.evaluate()
        run.profiler.close(state.iteration)
        if stop is None:
            run.evaluate(force=True)  # as Megatron: once more after the last iteration
        run.save_final()
        run.exits.finish()
        run.summarize()
    finally:
        run.close()
    report_peak_memory(rank=dist.get_rank(), module=rt.topology.module_name, device=rt.device)
    return run.results
