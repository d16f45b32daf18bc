"""Stop a run whose loss or gradients blow up while staying finite (non-finite ones are skipped
iterations, run.py).

The rule is Megatron's ``--check-for-spiky-loss`` / ``--check-for-large-grads`` test (its rerun
state machine's ``is_unexpectedly_large``): a value over ``--spiky-loss-factor`` (Megatron: 10)
times the largest of the last WINDOW values seen. Megatron reruns the iteration to tell a
hardware fault from a real spike; here there is no rerun: the run stops with exit status 1
and saves nothing more. The history starts empty with each job, so the first iteration after a
resume is not judged.

The loss lives on the last LLM stage and the grad norm where the optimizer ran, so the ranks
decide together: one all-reduce of six numbers per iteration (a host sync; the step already
has one for the loss and the grad norm), which also hands every rank the same numbers for the
same message.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

import torch
import torch.distributed as dist

WINDOW = 100


class DivergenceCheck:
    def __init__(self, *, loss: bool, grads: bool, factor: float, device: torch.device):
        self.factor, self.device = factor, device
        self.history = {"loss": deque(maxlen=WINDOW) if loss else None,
                        "grad": deque(maxlen=WINDOW) if grads else None}

    @property
    def enabled(self) -> bool:
        return any(h is not None for h in self.history.values())

    def _judge(self, kind: str, value: Optional[float]) -> list:
        """[spiky?, value, reference] for one quantity, as this rank sees it."""
        history = self.history[kind]
        if history is None or value is None:
            return [0.0, 0.0, 0.0]
        reference = max(history) if history else None
        if reference is not None and value > self.factor * reference:
            return [1.0, value, reference]
        history.append(value)
        return [0.0, 0.0, 0.0]

    def check(self, *, loss: Optional[float], grad_norm: Optional[float]) -> Optional[str]:
        """Collective over the world after an iteration: why the run diverged, or None."""
        if not self.enabled:
            return None
        mine = torch.tensor(self._judge("loss", loss) + self._judge("grad", grad_norm),
                            dtype=torch.float64, device=self.device)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        found = mine.tolist()
        for i, (name, flag) in enumerate((("lm loss", "--check-for-spiky-loss"),
                                          ("grad norm", "--check-for-large-grads"))):
            spiky, value, reference = found[3 * i:3 * i + 3]
            if spiky:
                return (f"{name} {value:.4g} is over {self.factor:g} x the largest of the last "
                        f"{WINDOW} iterations ({reference:.4g}; {flag}, --spiky-loss-factor)")
        return None
