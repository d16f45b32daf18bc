"""Run state as objects with ``state_dict``/``load_state_dict``; checkpointing.Checkpointer saves
each under a fixed key, so a new piece of state is one entry there."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: int = 0  # all of the run's, across resumes
    consecutive_skipped: int = 0  # ends the run at --max-consecutive-skipped-iters

    def advance(self, *, global_batch: int, skipped: bool) -> None:
        # A skipped iteration still consumes its samples: its data is not replayed (Megatron).
        self.iteration += 1
        self.consumed_samples += global_batch
        self.skipped_iterations += int(skipped)
        self.consecutive_skipped = self.consecutive_skipped + 1 if skipped else 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, int(state[f.name]))


class RNGState:
    """This rank's CPU and CUDA generators and megatron's CUDA RNG tracker: per rank, so it is
    restored only on the layout that wrote it."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state()
            state["tracker"] = tracker_states()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"])
            set_tracker_states(state["tracker"])


def tracker_states() -> dict:
    """A copy of megatron's CUDA RNG tracker's states as tensors. The graph-safe tracker CUDA
    graphs need (graphs.py) holds torch.Generator objects, which advance in place and which a
    checkpoint's weights_only load refuses; the plain tracker holds state tensors."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {name: state.get_state() if isinstance(state, torch.Generator) else state.clone()
            for name, state in get_cuda_rng_tracker().get_states().items()}


def set_tracker_states(saved: dict) -> None:
    """Restores ``tracker_states()``'s tensors into either kind of tracker."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    current = tracker.get_states()
    if any(isinstance(state, torch.Generator) for state in current.values()):
        if set(saved) != set(current):
            raise ValueError(f"RNG tracker states {sorted(saved)} do not match this run's "
                             f"{sorted(current)}")
        for name, generator in current.items():
            generator.set_state(saved[name])
    else:
        tracker.set_states(dict(saved))  # tracker_states() and a load hand over copies already
