"""Seeing the run: branch timers, hetero throughput, validation loss, TensorBoard."""

import time

import pytest
import torch

from examples.mimo.interfaces import StepFlops, StepWork
from examples.mimo.training.hetero.logger import throughput
from examples.mimo.training.hetero.timers import Timers
from tests.unit_tests.models.dist_harness import train


def test_throughput_divides_each_branch_by_its_own_gpus():
    out = throughput(seconds_per_iter=0.5, flops=StepFlops(encoder=2e12, llm=9e12),
                     tokens_per_iter=4096, encoder_gpus=1, llm_gpus=3, world=4)
    assert out["tflops_per_gpu"] == pytest.approx(11 / 0.5 / 4)  # the job over all 4 GPUs
    assert out["encoder_tflops_per_gpu"] == pytest.approx(2 / 0.5 / 1)
    assert out["llm_tflops_per_gpu"] == pytest.approx(9 / 0.5 / 3)
    assert out["tokens_per_s_per_gpu"] == pytest.approx(4096 / 0.5 / 4)
    llm_only = throughput(seconds_per_iter=0.5, flops=StepFlops(encoder=0.0, llm=9e12),
                          tokens_per_iter=4096, encoder_gpus=0, llm_gpus=3, world=3)
    assert llm_only["encoder_tflops_per_gpu"] is None
    assert llm_only["tflops_per_gpu"] == llm_only["llm_tflops_per_gpu"]
    colocated = throughput(seconds_per_iter=0.5, flops=StepFlops(encoder=2e12, llm=9e12),
                           tokens_per_iter=4096, encoder_gpus=4, llm_gpus=4, world=4)
    assert colocated["encoder_tflops_per_gpu"] + colocated["llm_tflops_per_gpu"] == \
        pytest.approx(colocated["tflops_per_gpu"]) == out["tflops_per_gpu"]


def test_timers_sum_spans_and_derive_backward():
    timers = Timers(torch.device("cpu"))
    with timers.span("schedule"):
        with timers.span("forward"):
            time.sleep(0.02)
        with timers.span("bridge"):
            with timers.span("bridge"):  # a communicator method calling another is counted once
                time.sleep(0.01)
        time.sleep(0.03)  # backward
    timers.end_iteration()
    ms = timers.take()
    assert 20 <= ms["forward"] < 40 and 10 <= ms["bridge"] < 25
    assert ms["backward"] == pytest.approx(ms["schedule"] - ms["forward"] - ms["bridge"])
    assert 30 <= ms["backward"] < 50
    assert timers.take()["schedule"] == 0.0  # taken


NEMOTRON = ["--model-provider", "nemotron_moe_vlm", "--model-preset", "tiny-cpu",
            "--global-batch-size", "8", "--micro-batch-size", "2", "--seq-length", "64",
            "--train-iters", "4", "--log-interval", "2", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return train(2, tmp_path_factory.mktemp("plain"), NEMOTRON)


def test_evaluation_leaves_training_bit_identical_and_tensorboard_has_the_scalars(plain, tmp_path):
    """Nemotron tiny-cpu (RADIO draws position-embedding crops from the RNG while training),
    encoder and LLM on a rank each: validation every 2 iterations and at the end."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    rows = train(2, tmp_path, NEMOTRON + ["--eval-interval", "2", "--eval-iters", "2",
                                          "--tensorboard-dir", str(tb)], "eval")
    evals = [r for r in rows if "validation_lm_loss" in r]
    steps = [r for r in rows if "validation_lm_loss" not in r]
    keys = ("lm_loss", "grad_norm", "loss_tokens", "seq_load_balancing_loss")
    assert [[r[k] for k in keys] for r in steps] == [[r[k] for k in keys] for r in plain]
    assert [r["iteration"] for r in evals] == [2, 4]
    assert all(0 < r["validation_lm_loss"] < 10 and r["validation_tokens"] > 0 for r in evals)

    events = EventAccumulator(str(tb))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for name in ("lm loss", "learning-rate", "grad-norm", "batch-size", "iteration-time",
                 "validation lm loss", "validation lm loss ppl"):
        assert {name, f"{name} vs samples"} <= scalars, name
    for name in ("throughput/tflops_per_gpu", "throughput/encoder_tflops_per_gpu",
                 "throughput/llm_tflops_per_gpu", "throughput/tokens_per_s_per_gpu",
                 "timers/encoder_forward_ms", "timers/encoder_backward_ms",
                 "timers/encoder_bridge_ms", "timers/llm_forward_ms", "timers/llm_backward_ms",
                 "timers/llm_bridge_ms", "timers/llm_optimizer_ms", "timers/data_wait_ms",
                 "moe/seq_load_balancing_loss"):
        assert name in scalars, name
    assert [e.value for e in events.Scalars("lm loss")] == pytest.approx(
        [r["lm_loss"] for r in steps])
    assert "config" in events.Tags()["tensors"] or "config/text_summary" in events.Tags()["tensors"]


def test_logged_tflops_are_the_providers_flops_over_time_and_gpus(plain):
    from examples.mimo.model_providers import nemotron_moe_vlm as nemotron
    from examples.mimo.training.hetero.config import parse_config

    rows = [r for r in plain if "tflops_per_gpu" in r]
    assert [r["iteration"] for r in rows] == [2, 4]
    cfg = parse_config(["--device", "cpu", *NEMOTRON], world_size=2).model
    for r in rows:
        assert 0 < r["images_per_iteration"] <= 8
        flops = nemotron.flops(cfg, StepWork(sequences=8, seq_length=64,
                                             images=r["images_per_iteration"]))
        seconds = r["interval_iteration_ms"] / 1000
        assert r["encoder_tflops_per_gpu"] * 1e12 * seconds == pytest.approx(flops.encoder)
        assert r["llm_tflops_per_gpu"] * 1e12 * seconds == pytest.approx(flops.llm)
        assert r["tflops_per_gpu"] * 1e12 * seconds * 2 == pytest.approx(flops.encoder + flops.llm)
        for branch in ("encoder", "llm"):
            assert r[f"{branch}_forward_ms"] > 0 and r[f"{branch}_backward_ms"] > 0
            assert r[f"{branch}_bridge_ms"] >= 0 and r[f"{branch}_optimizer_ms"] > 0


def test_evaluation_restores_every_random_generator():
    """What the validation pass runs inside: draws there leave training's streams where they were."""
    from examples.mimo.training.hetero.evaluation import rng_untouched

    before = torch.get_rng_state()
    with rng_untouched(torch.device("cpu")):
        torch.rand(5)
    assert torch.equal(torch.get_rng_state(), before)


def test_benchmark_layouts():
    from examples.mimo.scripts.bench_hetero import layouts

    assert layouts(1, 1) == [("colocated", 1, ["--colocated", "--encoder-dp", "1", "--llm-dp", "1"]),
                             ("llm-only", 1, ["--llm-only", "--llm-dp", "1"])]
    assert [(n, g) for n, g, _ in layouts(8, 2)] == [("hetero", 8), ("colocated", 8), ("llm-only", 6)]
    assert layouts(8, 2)[0][2] == ["--encoder-dp", "2", "--llm-dp", "6"]


@pytest.mark.serial
def test_benchmark_runs_every_layout_and_the_planner_predicts_it(tmp_path):
    """bench_hetero.py on 2 CPU ranks: hetero, colocated and LLM-only in one table, and its
    profile. The planner, calibrated by that profile (compute rates from the hetero run, gradient
    sync and Adam step from what was measured), predicts the hetero and colocated iteration times
    within a factor of 2 of the measured ones (CPU timings are noisy: a sanity bound; the numbers
    are in docs/results.md)."""
    import json
    import subprocess
    import sys

    from examples.mimo.cluster.planner import plan
    from tests.unit_tests.models.dist_harness import ROOT
    from tests.unit_tests.models.test_hetero_energon import ENV

    flags = ["--device", "cpu", "--global-batch-size", "16", "--micro-batch-size", "2"]
    out = subprocess.run([sys.executable, str(ROOT / "examples/mimo/scripts/bench_hetero.py"),
                          "--nproc", "2", "--warmup", "1", "--measure", "4", "--log-dir",
                          str(tmp_path), "--profile-out", str(tmp_path / "profile.json"), "--",
                          *flags], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")
            for line in out.stdout.splitlines() if line.startswith("| ")}
    assert {"hetero", "colocated", "llm-only"} == set(rows) - {"layout", "---"}
    assert rows["colocated"][3] == "1.000" and float(rows["llm-only"][2]) > 0
    assert "iterations 5-8 of each run" in out.stdout  # warm-up rounded up to a measure
    measured = {r["layout"]: r["row"]["interval_iteration_ms"]
                for r in json.loads((tmp_path / "profile.json").read_text())["runs"]}
    ranked, _, _ = plan(["--device", "cpu"], nodes=1, gpus_per_node=2, global_batch=16,
                        seq_length=64, images_per_sample=0.75,  # mock: 1/4 text-only
                        profile=str(tmp_path / "profile.json"))
    predicted = {("colocated" if e.layout.grid.colocated else "hetero"): e.iteration_ms
                 for e in ranked if e.layout.micro_batch == 2 and e.layout.grid.llm_tp == 1}
    for name in ("hetero", "colocated"):
        assert 0.5 < predicted[name] / measured[name] < 2.0, (name, predicted, measured)
