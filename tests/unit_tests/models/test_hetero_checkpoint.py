"""Checkpointing on CPU/gloo: exact resume, resharding, frozen branches, crash safety,
pretrained branch loading, refusal of pickled code, and bad checkpoints."""

import json
import os

import pytest

from tests.unit_tests.models.dist_harness import read_json_lines, torchrun, train

BASE = ["--global-batch-size", "8", "--seq-length", "32", "--lr", "3e-3", "--seed", "11"]


def snapshot(root):
    """Every file under root with its size and mtime: a failed load must not change any."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(d, f))
            out[os.path.join(d, f)] = (st.st_size, st.st_mtime_ns)
    return out


def same(a, b, keys=("lm_loss", "grad_norm", "learning_rate")):
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b]
    for x, y in zip(a, b):
        for k in keys:
            assert x[k] == y[k], (k, x, y)


def test_resume_is_bit_exact(tmp_path):
    args = BASE + ["--train-iters", "6"]
    straight = train(2, tmp_path, args, "straight")
    ckpt = str(tmp_path / "ckpt")
    first = train(2, tmp_path, args + ["--save", ckpt, "--load", ckpt, "--exit-interval", "3"], "a")
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "3"
    second = train(2, tmp_path, args + ["--save", ckpt, "--load", ckpt], "b")
    same(straight, first + second)


def test_reshard_dp2_to_dp1(tmp_path):
    args = BASE + ["--train-iters", "6"]
    straight = train(4, tmp_path, args + ["--encoder-dp", "2", "--llm-dp", "2"], "straight")
    ckpt = str(tmp_path / "ckpt")
    first = train(4, tmp_path, args + ["--encoder-dp", "2", "--llm-dp", "2", "--save", ckpt,
                                       "--exit-interval", "3"], "a")
    second = train(2, tmp_path, args + ["--load", ckpt], "b")
    resumed = first + second
    assert [r["iteration"] for r in resumed] == list(range(1, 7))
    for x, y in zip(straight, resumed):
        assert y["lm_loss"] == pytest.approx(x["lm_loss"], rel=1e-5)
        assert y["learning_rate"] == x["learning_rate"]


def test_projector_only_checkpoint(tmp_path):
    args = BASE + ["--train-iters", "4", "--freeze-lm", "--freeze-vit"]
    straight = train(2, tmp_path, args, "straight")
    ckpt = str(tmp_path / "ckpt")
    first = train(2, tmp_path, args + ["--save", ckpt, "--exit-interval", "2"], "a")
    second = train(2, tmp_path, args + ["--load", ckpt], "b")
    same(straight, first + second)


def test_killed_save_leaves_previous_checkpoint_loadable(tmp_path):
    ckpt = tmp_path / "ckpt"
    args = ["--device", "cpu", *BASE, "--train-iters", "6", "--save", str(ckpt),
            "--save-interval", "2", "--distributed-timeout-minutes", "1"]
    proc = torchrun(2, "tests.unit_tests.models.workers.ckpt_worker",
                    ["kill_during_save", "1", "4", *args], timeout=240, check=False)
    assert proc.returncode != 0
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert not (ckpt / "iter_0000004").exists()
    resumed = train(2, tmp_path, BASE + ["--train-iters", "6", "--load", str(ckpt)], "resumed")
    assert [r["iteration"] for r in resumed] == [3, 4, 5, 6]
    straight = train(2, tmp_path, BASE + ["--train-iters", "6"], "straight")
    same(straight[2:], resumed)


def test_load_of_empty_directory_starts_fresh(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = torchrun(2, "examples.mimo.train_hetero",
                    ["--device", "cpu", *BASE, "--train-iters", "1", "--load", str(empty)])
    assert f"no checkpoint in {empty}: starting from iteration 0" in proc.stdout


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    train(2, root, BASE + ["--train-iters", "2", "--save", str(root / "ckpt")])
    return root / "ckpt"


def failed_load(tmp_path, ckpt, extra=()):
    before = snapshot(ckpt)
    proc = torchrun(2, "examples.mimo.train_hetero",
                    ["--device", "cpu", *BASE, "--train-iters", "4", "--load", str(ckpt),
                     "--save", str(ckpt), "--distributed-timeout-minutes", "1", *extra],
                    check=False, timeout=240)
    assert proc.returncode != 0
    assert snapshot(ckpt) == before
    return proc.stderr


def copy_of(saved, tmp_path):
    import shutil

    dst = tmp_path / "ckpt"
    shutil.copytree(saved, dst)
    return dst


def test_bad_tracker(saved, tmp_path):
    ckpt = copy_of(saved, tmp_path)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("two")
    err = failed_load(tmp_path, ckpt)
    assert "latest_checkpointed_iteration.txt should hold an iteration number, found 'two'" in err


def test_missing_tracker(saved, tmp_path):
    ckpt = copy_of(saved, tmp_path)
    (ckpt / "latest_checkpointed_iteration.txt").unlink()
    err = failed_load(tmp_path, ckpt)
    assert "latest_checkpointed_iteration.txt is missing but" in err and "iter_0000002" in err


def test_missing_iteration_directory(saved, tmp_path):
    ckpt = copy_of(saved, tmp_path)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("7")
    err = failed_load(tmp_path, ckpt)
    assert "names iteration 7 but" in err and "iter_0000007 does not exist" in err


def test_incomplete_iteration_directory(saved, tmp_path):
    ckpt = copy_of(saved, tmp_path)
    (ckpt / "iter_0000002" / "metadata.json").unlink()
    err = failed_load(tmp_path, ckpt)
    assert "iter_0000002 is incomplete" in err


def test_incompatible_model(saved, tmp_path):
    ckpt = copy_of(saved, tmp_path)
    err = failed_load(tmp_path, ckpt, ["--hidden-size", "32"])
    assert "written by an incompatible run" in err and "model.hidden_size: checkpoint 64, now 32" in err


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


def test_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    proc = torchrun(1, "tests.unit_tests.models.workers.ckpt_worker",
                    ["payload", str(tmp_path / "evil"), str(marker)])
    assert "REFUSED: cannot load" in proc.stdout
    assert "refusing to unpickle checkpoint object 'rng/shard_0_1'" in proc.stdout
    assert not marker.exists()
