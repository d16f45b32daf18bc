"""The interval log line (Megatron's format), the per-iteration metrics file and TensorBoard.

Throughput is counted for the hetero layout: each branch's model FLOPs (the provider's
``flops``) over the GPUs it runs on, and the job's over all of them. Upstream's LLM-only
formula divided by every GPU of the job undercounts a hetero run and says nothing of balance.
"""

from __future__ import annotations

import json
import math
import time
from typing import Callable, Dict, Optional

import torch

from examples.mimo.interfaces import StepFlops
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


def throughput(*, seconds_per_iter: float, flops: StepFlops, tokens_per_iter: int,
               encoder_gpus: int, llm_gpus: int, world: int) -> Dict[str, Optional[float]]:
    """Tokens/s and model TFLOP/s per GPU of the job, and of each branch on its own GPUs (all
    of them when colocated: then the two shares add up to the job's)."""
    per_s = 1.0 / seconds_per_iter
    return {
        "tokens_per_s_per_gpu": tokens_per_iter * per_s / world,
        "tflops_per_gpu": (flops.encoder + flops.llm) * per_s / world / 1e12,
        "encoder_tflops_per_gpu": flops.encoder * per_s / encoder_gpus / 1e12 if encoder_gpus else None,
        "llm_tflops_per_gpu": flops.llm * per_s / llm_gpus / 1e12,
    }


def flop_rate(tflops: Optional[float]) -> str:
    """Model FLOP/s with three significant digits in the unit that keeps them (a CPU run's 0.0
    TFLOP/s is 12.3 GFLOP/s): "356 TFLOP/s", "12.3 GFLOP/s"."""
    if tflops is None:
        return "-"
    for unit, scale in (("TFLOP/s", 1.0), ("GFLOP/s", 1e-3), ("MFLOP/s", 1e-6)):
        if tflops >= scale or unit == "MFLOP/s":
            return f"{tflops / scale:.3g} {unit}"
    raise AssertionError("unreachable")


def _three_digits(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"  # 2180, not 2.18e+03


class IntervalLogger:
    def __init__(self, *, enabled: bool, interval: int, total_iters: int, global_batch: int,
                 seq_length: int, encoder_gpus: int, llm_gpus: int, world: int,
                 flops: Callable[[float], StepFlops], tokens_per_image: int,
                 metrics_file: Optional[str], tensorboard_dir: Optional[str], config_text: str):
        self.enabled = enabled
        self.interval = interval
        self.total_iters = total_iters
        self.global_batch = global_batch
        self.tokens_per_iter = global_batch * seq_length
        self.encoder_gpus, self.llm_gpus, self.world = encoder_gpus, llm_gpus, world
        self.flops = flops  # images in an iteration -> its StepFlops
        self.tokens_per_image = tokens_per_image
        self._metrics = open(metrics_file, "a") if enabled and metrics_file else None
        self._tb = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=tensorboard_dir)
            self._tb.add_text("config", config_text)
        self._t0 = self._last = time.perf_counter()
        self._iters_in_interval = 0
        self._data_wait_s = 0.0
        self._image_tokens = 0.0
        self._moe_keys: set = set()
        self._start = time.perf_counter()
        self._losses: list = []  # (iteration, lm loss) of this job's first and last iteration
        self._validation: Optional[tuple] = None  # (iteration, loss) of the last evaluation

    @property
    def iterations_since_line(self) -> int:
        """Iterations the next log line covers, the one being recorded included."""
        return self._iters_in_interval + 1

    def due(self, iteration: int) -> bool:
        """A log-line iteration (every rank asks: the branch timings are gathered then)."""
        return iteration % self.interval == 0 or iteration == self.total_iters

    def record(self, state: TrainState, result: StepResult, *, data_wait_s: float,
               times: Optional[Dict[str, Dict[str, float]]]) -> None:
        """``times``: per branch ms per iteration (timers.branch_times), on log iterations."""
        now = time.perf_counter()
        iteration_ms, self._last = 1000.0 * (now - self._last), now
        self._iters_in_interval += 1
        self._data_wait_s += data_wait_s
        self._image_tokens += result.image_tokens
        if not self.enabled:
            return
        self._moe_keys = set(result.moe_losses)
        self._losses[1 if self._losses else 0:] = [(state.iteration, result.lm_loss)]
        row = {"iteration": state.iteration, "lm_loss": result.lm_loss, "grad_norm": result.grad_norm,
               "learning_rate": result.learning_rate, "skipped": result.skipped,
               "loss_tokens": result.loss_tokens, **result.moe_losses,
               "consumed_samples": state.consumed_samples,
               "skipped_iterations": state.skipped_iterations,
               "data_wait_ms": 1000.0 * data_wait_s, "iteration_time_ms": iteration_ms}
        if times is not None:
            row |= self._interval(now, times)
            self._print(state, result, row, times)
        self._write(row, state.consumed_samples)

    def _interval(self, now: float, times) -> dict:
        n = self._iters_in_interval
        seconds = (now - self._t0) / n
        images = self._image_tokens / self.tokens_per_image / n if self.tokens_per_image else 0.0
        out = {"interval_iteration_ms": 1000.0 * seconds,
               "interval_data_wait_ms": 1000.0 * self._data_wait_s / n,
               "images_per_iteration": images}
        out |= throughput(seconds_per_iter=seconds, flops=self.flops(images),
                          tokens_per_iter=self.tokens_per_iter, encoder_gpus=self.encoder_gpus,
                          llm_gpus=self.llm_gpus, world=self.world)
        for label, spans in sorted(times.items()):
            out |= {f"{label}_{k.replace('-', '_')}_ms" if k != "peak_memory_gib"
                    else f"{label}_peak_memory_gib": v for k, v in spans.items() if k != "schedule"}
        self._t0, self._iters_in_interval, self._data_wait_s, self._image_tokens = now, 0, 0.0, 0.0
        return out

    def _print(self, state: TrainState, result: StepResult, row: dict, times) -> None:
        grad_norm = "n/a" if result.grad_norm is None else f"{result.grad_norm:.3f}"
        moe = "".join(f" {name}: {value:.6E} |" for name, value in result.moe_losses.items())
        branches = ""
        for label in sorted(times):
            t = times[label]
            branches += (f" {label} fwd/bwd/bridge/grad-sync/optim (ms): {t['forward']:.1f}/"
                         f"{t['backward']:.1f}/{t['bridge']:.1f}/{t['grad-sync']:.1f}/"
                         f"{t['optimizer']:.1f} |")
            if t["peak_memory_gib"]:
                branches += f" {label} peak mem (GiB): {t['peak_memory_gib']:.2f} |"
        split = "/".join(flop_rate(row[k]) for k in ("encoder_tflops_per_gpu",
                                                     "llm_tflops_per_gpu"))
        print(f" iteration {state.iteration:8d}/{self.total_iters:8d} |"
              f" consumed samples: {state.consumed_samples:12d} |"
              f" elapsed time per iteration (ms): {row['interval_iteration_ms']:.1f} |"
              f" data wait (ms): {row['interval_data_wait_ms']:.1f} |"
              f" throughput per GPU: {flop_rate(row['tflops_per_gpu'])} |"
              f" encoder/llm per GPU: {split} |"
              f" tokens/s/GPU: {_three_digits(row['tokens_per_s_per_gpu'])} |"
              f" learning rate: {result.learning_rate:.6E} |"
              f" global batch size: {self.global_batch:5d} |"
              f" lm loss: {result.lm_loss:.6E} |{moe}"
              f" grad norm: {grad_norm} |"
              f" number of skipped iterations: {state.skipped_iterations:3d} |{branches}",
              flush=True)

    def _write(self, row: dict, samples: int) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps(row) + "\n")
            self._metrics.flush()
        if self._tb is None:
            return
        step = row["iteration"]
        pairs = {"lm loss": row["lm_loss"], "learning-rate": row["learning_rate"],
                 "grad-norm": row["grad_norm"], "batch-size": self.global_batch,
                 "iteration-time": row["iteration_time_ms"] / 1000.0}
        for name, value in pairs.items():
            if value is not None:
                self._tb.add_scalar(name, value, step)
                self._tb.add_scalar(f"{name} vs samples", value, samples)
        for key, value in row.items():
            if value is None or key in ("iteration", "lm_loss", "learning_rate", "grad_norm",
                                        "iteration_time_ms", "skipped"):
                continue
            group = ("moe" if key in self._moe_keys else "timers" if key.endswith("_ms")
                     else "memory" if key.endswith("_gib")
                     else "throughput" if "per_" in key else "train")
            self._tb.add_scalar(f"{group}/{key}", value, step)

    def record_eval(self, *, iteration: int, samples: int, loss: float, tokens: int) -> None:
        """Megatron's validation line, and its scalars."""
        if not self.enabled:
            return
        ppl = math.exp(min(20.0, loss))
        self._validation = (iteration, loss)
        print(f" validation loss at iteration {iteration} | lm loss value: {loss:.6E} |"
              f" lm loss PPL: {ppl:.6E} | tokens: {tokens}", flush=True)
        if self._metrics is not None:
            self._metrics.write(json.dumps({"iteration": iteration, "validation_lm_loss": loss,
                                            "validation_ppl": ppl, "validation_tokens": tokens})
                                + "\n")
            self._metrics.flush()
        if self._tb is not None:
            for name, value in (("validation lm loss", loss), ("validation lm loss ppl", ppl)):
                self._tb.add_scalar(name, value, iteration)
                self._tb.add_scalar(f"{name} vs samples", value, samples)

    def summary(self, *, checkpoint: Optional[str], metrics_file: Optional[str],
                tensorboard_dir: Optional[str]) -> Optional[str]:
        """The run in one line, for the end of a finished job (the logging rank's; else None)."""
        if not self.enabled or not self._losses:
            return None
        (first_it, first), (last_it, last) = self._losses[0], self._losses[-1]
        parts = [f"done: iterations {first_it}-{last_it} in {time.perf_counter() - self._start:.1f} s",
                 f"training loss {first:.4g} -> {last:.4g}"]
        if self._validation is not None:
            parts.append(f"validation loss {self._validation[1]:.4g} (iteration "
                         f"{self._validation[0]})")
        parts += [f"{name} {value}" for name, value in (
            ("checkpoint", checkpoint), ("metrics", metrics_file), ("TensorBoard", tensorboard_dir))
            if value]
        return " | ".join(parts)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if self._tb is not None:
            self._tb.close()


def report_peak_memory(*, rank: int, module: str, device: torch.device) -> None:
    """Every rank's own line: the two grids hold different models, so their peaks differ."""
    if device.type != "cuda":
        return
    gib = 1024 ** 3
    print(f"[rank {rank}] {module} peak memory (GiB): allocated "
          f"{torch.cuda.max_memory_allocated(device) / gib:.2f}, reserved "
          f"{torch.cuda.max_memory_reserved(device) / gib:.2f}", flush=True)
