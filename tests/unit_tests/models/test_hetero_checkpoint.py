"""Checkpointing on CPU/gloo: exact resume, resharding, frozen branches, crash safety, pretrained
branch loading. (Path checks, discovery, the resume policy and checksums are tested in-process
in test_hetero_ckpt_policy.py; damaged files, full disks and new schedules end to end in
test_hetero_failures.py; refusal of pickled code in test_hetero_compat.py.)"""

import json
import os
import shutil

import pytest

from tests.unit_tests.models.dist_harness import read_json_lines, run_train, torchrun, train

BASE = ["--global-batch-size", "8", "--seq-length", "32", "--lr", "3e-3", "--seed", "11"]
SIX = BASE + ["--train-iters", "6"]


def same(a, b, keys=("lm_loss", "grad_norm", "learning_rate")):
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b]
    for x, y in zip(a, b):
        for k in keys:
            assert x[k] == y[k], (k, x, y)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Six iterations straight through, saved at the end (a save changes no training state)."""
    root = tmp_path_factory.mktemp("straight")
    return train(2, root, SIX + ["--save", str(root / "ckpt")]), root / "ckpt"


def test_resume_is_bit_exact(straight, tmp_path):
    """The first job writes the run record of schema 2 (record.py: the checkpoints of the code
    before it); the second job reads it through the migration."""
    ckpt = str(tmp_path / "ckpt")
    metrics = tmp_path / "a.jsonl"
    # The auto-resume pattern: --load = --save, missing on the first job.
    proc = torchrun(2, "tests.unit_tests.models.workers.schema2_writer",
                    ["--device", "cpu", "--metrics-file", str(metrics), *SIX, "--save", ckpt,
                     "--load", ckpt, "--exit-interval", "3"])
    assert f"no checkpoint in {ckpt}: starting from iteration 0" in proc.stdout
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "3"
    from megatron.core import dist_checkpointing

    old = dist_checkpointing.load_common_state_dict(f"{ckpt}/iter_0000003")
    assert old["checkpoint_version"] == 2 and "args" in old and "config" not in old
    second, proc = run_train(2, tmp_path, SIX + ["--save", ckpt, "--load", ckpt], "b")
    assert f"loaded {ckpt}/iter_0000003 (iteration 3)" in proc.stdout
    assert "with changes" not in proc.stdout
    same(straight[0], read_json_lines(metrics) + second)


def test_reshard_dp2_to_dp1(straight, tmp_path):
    """Saved by encoder DP2 + LLM DP2, resumed on DP1 + DP1: the losses continue those of the
    straight DP1 run (layout parity, test_hetero_parity)."""
    ckpt = str(tmp_path / "ckpt")
    first = train(4, tmp_path, SIX + ["--encoder-dp", "2", "--llm-dp", "2", "--save", ckpt,
                                      "--exit-interval", "3"], "a")
    second = train(2, tmp_path, SIX + ["--load", ckpt], "b")
    resumed = first + second
    assert [r["iteration"] for r in resumed] == list(range(1, 7))
    for x, y in zip(straight[0], resumed):
        assert y["lm_loss"] == pytest.approx(x["lm_loss"], rel=1e-5)
        assert y["learning_rate"] == x["learning_rate"]


def test_encoder_tp2_weights_reshard_to_tp1(straight, tmp_path):
    """Saved by encoder TP2 (the ViT's rows split over two ranks), loaded by TP1 without the
    optimizer: the fourth loss, computed before any update, is the straight TP1 run's. Found
    broken: the mock ViT and RADIO, plain torch modules around megatron-core's layers, were saved
    as if whole, both TP ranks claiming the same rows."""
    ckpt = str(tmp_path / "ckpt")
    train(3, tmp_path, SIX + ["--encoder-tp", "2", "--save", ckpt, "--exit-interval", "3"], "a")
    resumed = train(2, tmp_path, SIX + ["--load", ckpt, "--no-load-optim"], "b")
    assert resumed[0]["iteration"] == 4
    assert resumed[0]["lm_loss"] == pytest.approx(straight[0][3]["lm_loss"], rel=1e-5)


def test_projector_only_checkpoint(tmp_path):
    args = BASE + ["--train-iters", "4", "--freeze-lm", "--freeze-vit"]
    straight = train(2, tmp_path, args, "straight")
    ckpt = str(tmp_path / "ckpt")
    first = train(2, tmp_path, args + ["--save", ckpt, "--exit-interval", "2"], "a")
    second = train(2, tmp_path, args + ["--load", ckpt], "b")
    same(straight, first + second)


def test_killed_save_leaves_previous_checkpoint_loadable(straight, tmp_path):
    ckpt = tmp_path / "ckpt"
    args = ["--device", "cpu", *SIX, "--save", str(ckpt), "--save-interval", "2",
            "--distributed-timeout-minutes", "1"]
    proc = torchrun(2, "tests.unit_tests.models.workers.ckpt_worker",
                    ["kill_during_save", "1", "4", *args], timeout=240, check=False)
    assert proc.returncode != 0
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert not (ckpt / "iter_0000004").exists()
    # The killed save's iter_0000004.tmp neither blocks the resume nor survives it.
    resumed, proc = run_train(2, tmp_path, SIX + ["--load", str(ckpt), "--save", str(ckpt)],
                              "resumed")
    assert f"removed {ckpt}/iter_0000004.tmp" in proc.stdout
    assert [r["iteration"] for r in resumed] == [3, 4, 5, 6]
    same(straight[0][2:], resumed)


def test_failed_load_changes_no_file(straight, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(straight[1], ckpt)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("two")
    before = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
              for d, _, fs in os.walk(ckpt) for f in fs}
    proc = torchrun(2, "examples.mimo.train_hetero",
                    ["--device", "cpu", *SIX, "--load", str(ckpt), "--save", str(ckpt)],
                    check=False, timeout=120)
    assert proc.returncode != 0
    assert "error: " in proc.stderr and "should hold an iteration number, found 'two'" in proc.stderr
    assert before == {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
                      for d, _, fs in os.walk(ckpt) for f in fs}


def test_language_from_single_grid_checkpoint(tmp_path):
    src = tmp_path / "lm"
    torchrun(1, "tests.unit_tests.models.workers.ckpt_worker",
             ["write_language", str(src), "99", "-", "--train-iters", "1", *BASE])
    out = tmp_path / "out"
    out.mkdir()
    torchrun(3, "tests.unit_tests.models.workers.ckpt_worker",
             ["check_language", f"{src}.pt", str(out), "--device", "cpu", "--llm-dp", "2",
              "--train-iters", "1", *BASE, "--load-language-from", str(src)])
    for rank in (1, 2):
        result = json.loads((out / f"rank{rank}.json").read_text())
        assert len(result) > 10 and all(result.values()), result


def test_language_from_checkpoint_missing_a_key(tmp_path):
    src = tmp_path / "lm"
    key = "decoder.final_layernorm.weight"
    torchrun(1, "tests.unit_tests.models.workers.ckpt_worker",
             ["write_language", str(src), "99", key, "--train-iters", "1", *BASE])
    proc = torchrun(2, "examples.mimo.train_hetero",
                    ["--device", "cpu", *BASE, "--train-iters", "1", "--load-language-from", str(src),
                     "--distributed-timeout-minutes", "1"], check=False, timeout=240)
    assert proc.returncode != 0
    assert f"not in checkpoint: {key}" in proc.stderr

