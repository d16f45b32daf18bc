"""The interval log line (Megatron's format) and the per-iteration metrics file."""

from __future__ import annotations

import json
import time
from typing import Optional

import torch

from examples.mimo.training.hetero.state import TrainState
from examples.mimo.training.hetero.step import StepResult


class DataWait:
    """Wall time this process spends in ``next(data)``: what the data path costs a step, as an
    upper bound (a wait while the GPU still runs queued kernels costs nothing)."""

    def __init__(self, iterator):
        self.iterator = iterator
        self.seconds = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.iterator)
        finally:
            self.seconds += time.perf_counter() - start

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


class IntervalLogger:
    def __init__(self, *, enabled: bool, interval: int, total_iters: int, global_batch: int,
                 seq_length: int, world_size: int, metrics_file: Optional[str]):
        self.enabled = enabled
        self.interval = interval
        self.total_iters = total_iters
        self.global_batch = global_batch
        self.tokens_per_iter = global_batch * seq_length
        self.world_size = world_size
        self._metrics = open(metrics_file, "a") if enabled and metrics_file else None
        self._t0 = time.perf_counter()
        self._iters_in_interval = 0
        self._data_wait_s = 0.0

    def record(self, state: TrainState, result: StepResult, *, data_wait_s: float) -> None:
        iteration = state.iteration
        self._iters_in_interval += 1
        self._data_wait_s += data_wait_s
        if not self.enabled:
            return
        if self._metrics is not None:
            self._metrics.write(json.dumps({
                "iteration": iteration, "lm_loss": result.lm_loss, "grad_norm": result.grad_norm,
                "learning_rate": result.learning_rate, "skipped": result.skipped,
                "loss_tokens": result.loss_tokens, **result.moe_losses,
                "consumed_samples": state.consumed_samples,
                "skipped_iterations": state.skipped_iterations,
                "data_wait_ms": 1000.0 * data_wait_s}) + "\n")
            self._metrics.flush()
        if iteration % self.interval and iteration != self.total_iters:
            return
        now = time.perf_counter()
        ms = 1000.0 * (now - self._t0) / self._iters_in_interval
        data_ms = 1000.0 * self._data_wait_s / self._iters_in_interval
        self._t0, self._iters_in_interval, self._data_wait_s = now, 0, 0.0
        grad_norm = "n/a" if result.grad_norm is None else f"{result.grad_norm:.3f}"
        moe = "".join(f" {name}: {value:.6E} |" for name, value in result.moe_losses.items())
        print(f" iteration {iteration:8d}/{self.total_iters:8d} |"
              f" consumed samples: {state.consumed_samples:12d} |"
              f" elapsed time per iteration (ms): {ms:.1f} |"
              f" data wait (ms): {data_ms:.1f} |"
              f" learning rate: {result.learning_rate:.6E} |"
              f" global batch size: {self.global_batch:5d} |"
              f" lm loss: {result.lm_loss:.6E} |{moe}"
              f" grad norm: {grad_norm} |"
              f" number of skipped iterations: {state.skipped_iterations:3d} |"
              f" tokens/s/GPU: {self.tokens_per_iter / self.world_size / (ms / 1000.0):.1f}",
              flush=True)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()


def report_peak_memory(*, rank: int, module: str, device: torch.device) -> None:
    """Every rank's own line: the two grids hold different models, so their peaks differ."""
    if device.type != "cuda":
        return
    gib = 1024 ** 3
    print(f"[rank {rank}] {module} peak memory (GiB): allocated "
          f"{torch.cuda.max_memory_allocated(device) / gib:.2f}, reserved "
          f"{torch.cuda.max_memory_reserved(device) / gib:.2f}", flush=True)
