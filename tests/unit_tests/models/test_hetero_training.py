"""Behaviour of the training job on CPU/gloo: failures end every rank, non-finite gradients are
skipped by all ranks together, frozen branches train nothing, and the real launcher trains."""

import json
import os
import re
import subprocess
import sys

import pytest

from examples.mimo.model_providers import MODEL_PROVIDERS
from examples.mimo.training.hetero.config import parse_config
from tests.unit_tests.models.dist_harness import ROOT, read_json_lines, torchrun, train

SHORT = ["--device", "cpu", "--global-batch-size", "8", "--seq-length", "32",
         "--distributed-timeout-minutes", "1"]


def test_failure_on_one_rank_ends_every_rank(tmp_path):
    proc = torchrun(3, "tests.unit_tests.models.workers.fault_worker",
                    ["raise", "1", "2", *SHORT, "--llm-dp", "2", "--train-iters", "50",
                     "--distributed-timeout-minutes", "1"], timeout=240, check=False)
    assert proc.returncode != 0
    # One line naming the rank and its first error, after its traceback (no launcher here).
    assert "[rank 1] error: RuntimeError: injected data failure" in proc.stderr
    assert "Traceback" in proc.stderr.split("[rank 1] error:")[0]
    assert proc.elapsed < 60, proc.elapsed  # inside the 1-minute collective timeout


def test_non_finite_grads_skip_the_step_on_every_rank(tmp_path):
    """A NaN on one rank at iteration 2: every rank skips it; as in Megatron the LR schedule
    does not advance on a skipped iteration (before: it did), and the skip count survives a
    resume (before: it restarted at 0)."""
    metrics = tmp_path / "m.jsonl"
    ckpt = str(tmp_path / "ckpt")
    torchrun(2, "tests.unit_tests.models.workers.fault_worker",
             ["nan", "1", "2", *SHORT, "--train-iters", "5", "--lr-warmup-iters", "4",
              "--metrics-file", str(metrics), "--save", ckpt, "--exit-interval", "3"],
             timeout=240)
    torchrun(2, "examples.mimo.train_hetero",
             [*SHORT, "--train-iters", "5", "--lr-warmup-iters", "4", "--metrics-file", str(metrics),
              "--load", ckpt], timeout=240)
    rows = read_json_lines(metrics)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["skipped"] for r in rows] == [False, True, False, False, False]
    assert rows[1]["grad_norm"] is None
    assert all(r["grad_norm"] > 0 for r in rows if not r["skipped"])
    assert all(r["lm_loss"] == r["lm_loss"] for r in rows if not r["skipped"])  # finite
    lrs = [r["learning_rate"] for r in rows]
    assert lrs[0] < lrs[1] == lrs[2] < lrs[3]  # warmup; held at the skip
    assert [r["skipped_iterations"] for r in rows] == [0, 1, 1, 1, 1]
    assert [r["consumed_samples"] for r in rows] == [8, 16, 24, 32, 40]


def test_projector_only_stage(tmp_path):
    torchrun(3, "tests.unit_tests.models.workers.frozen_worker",
             [str(tmp_path), *SHORT, "--llm-dp", "2", "--train-iters", "3", "--freeze-lm",
              "--freeze-vit", "--mock-text-only-fraction", "0"], timeout=240)
    encoder = json.loads((tmp_path / "rank0.json").read_text())
    assert encoder["vit"] == [False, False]  # no ViT weight moved
    assert encoder["projection"] == [True, True]  # every projector weight moved
    for rank in (1, 2):
        llm = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert llm["lm"] == [False, False]
    losses = json.loads((tmp_path / "rank1.json").read_text())["losses"]
    assert losses[-1] < losses[0]
    # The provider's parameter counts (what --dry-run prints) against the built branches.
    facts = MODEL_PROVIDERS["mock"].facts(parse_config(["--train-iters", "1"], world_size=2).model)
    assert (encoder["params"], llm["params"]) == (facts.encoder_params, facts.llm_params)


def test_launcher_script_trains(tmp_path):
    """The README's main command, end to end: the tiny-cpu Nemotron VLM, hetero, on the generated
    energon dataset (made on first use); loss falls, validation runs, a checkpoint is saved, the
    run ends with its summary line. Run from another directory: HETERO_RUN_DIR and the caller's
    other relative paths are the caller's (before: the repository root's)."""
    script = str(ROOT / "examples/mimo/scripts/run_first_train.sh")
    env = dict(os.environ, HETERO_PYTHON=sys.executable, HETERO_TIMEOUT_S="600",
               HETERO_RUN_DIR="first")
    proc = subprocess.run(["bash", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=660)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "iteration       40/      40" in proc.stdout
    assert sorted(os.listdir(tmp_path / "first" / "ckpt")) == [
        "iter_0000040", "latest_checkpointed_iteration.txt"]
    # once, from rank 0, after the first iteration: where the time before training went
    assert len(re.findall(r"^start-up, slowest rank per phase: flags and imports [\d.]+ s, process "
                          r"groups [\d.]+ s, model [\d.]+ s, DDP [\d.]+ s, optimizer [\d.]+ s, data "
                          r"and checkpoint [\d.]+ s; first iteration [\d.]+ s \(slowest rank in "
                          r"all: [\d.]+ s\)$", proc.stdout, re.M)) == 1
    summary = re.findall(r"^done: iterations 1-40 in [\d.]+ s \| training loss [\d.]+ -> [\d.]+ \| "
                         r"validation loss [\d.]+ \(iteration 40\) \| checkpoint "
                         r"first/ckpt/iter_0000040 \| metrics first/metrics.jsonl \| TensorBoard "
                         r"first/tensorboard$", proc.stdout, re.M)
    assert len(summary) == 1, proc.stdout[-3000:]
    # Library notices are counted, not printed (before: 44 lines of stderr, 20 warnings), and
    # torchrun's OMP_NUM_THREADS banner is not printed at all.
    assert [l for l in proc.stderr.splitlines() if "Warning" in l or "WARNING" in l] == []
    assert re.search(r"^\d+ library notices not shown \(\d+ kinds: .*--verbose-warnings shows them$",
                     proc.stdout, re.M)
    assert "OMP_NUM_THREADS" not in proc.stderr
    rows = read_json_lines(tmp_path / "first" / "metrics.jsonl")
    losses = [r["lm_loss"] for r in rows if "lm_loss" in r]
    assert len(losses) == 40
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0
    assert [r["iteration"] for r in rows if "validation_lm_loss" in r] == [20, 40]
    # The mock model and data stay one flag away; the mock script's WSD defaults give way to a
    # schedule of the caller's (before: refused).
    cosine = subprocess.run(["bash", script, "--mock", "--lr-decay-style", "cosine", "--dry-run"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert cosine.returncode == 0, cosine.stderr[-2000:]
    assert "mock model, mock data" in cosine.stdout


@pytest.mark.parametrize("nproc,grid", [
    (2, ["--llm-only", "--llm-dp", "2"]),  # text-only LLM, no encoder grid
    (3, ["--llm-pp", "2"]),  # LLM pipeline stages behind the bridge
])
def test_other_layouts_train(tmp_path, nproc, grid):
    rows = train(nproc, tmp_path, ["--global-batch-size", "8", "--seq-length", "32",
                                   "--train-iters", "10", "--lr", "3e-3", *grid])
    losses = [r["lm_loss"] for r in rows]
    assert len(losses) == 10 and not any(r["skipped"] for r in rows)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
