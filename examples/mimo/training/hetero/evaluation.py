"""Validation loss: global batches of the validation split through megatron-core's forward-only
schedule across the bridge, as Megatron's ``evaluate``.

Nothing of training is touched: no gradients or optimizer step, the model back in train mode,
and every RNG (torch CPU and CUDA, megatron's CUDA RNG tracker) restored, so a run with
interleaved evaluation trains bit for bit as one without (tested on CPU).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch

from examples.mimo.training.hetero.runtime import Runtime
from examples.mimo.training.hetero.state import set_tracker_states, tracker_states
from examples.mimo.training.hetero.step import global_totals, run_schedule


@contextlib.contextmanager
def rng_untouched(device: torch.device):
    saved = tracker_states() if device.type == "cuda" else None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
    if saved is not None:
        set_tracker_states(saved)


def evaluate(rt: Runtime, data: Iterator[dict], *, iters: int) -> Optional[Tuple[float, int]]:
    """(per-token validation loss, tokens) on the last LLM stage; None elsewhere."""
    totals = None
    rt.model.eval()
    try:
        with rng_untouched(rt.device), torch.no_grad():
            for _ in range(iters):
                batch = run_schedule(rt, data, timers=None, forward_only=True)
                if batch is not None:
                    totals = batch if totals is None else totals + batch
    finally:
        rt.model.train()
    totals = global_totals(rt, totals)
    if totals is None:
        return None
    return (totals[0] / totals[1].clamp(min=1)).item(), int(totals[1].item())
