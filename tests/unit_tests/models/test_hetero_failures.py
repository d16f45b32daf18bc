"""Found failures, each reproduced through the real launcher or entrypoint (CPU/gloo, 2 ranks
unless said): bad input is one line before any process starts, a stuck peer ends the job within
the timeout, a diverging run stops without saving, damaged checkpoints and full disks are
named, resumes may change the schedule, and stage-1 checkpoints start stage 2."""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from examples.mimo.training.hetero.config import parse_config
from examples.mimo.training.hetero.optim import build_scheduler
from tests.unit_tests.models.dist_harness import ROOT, job_env, torchrun, train

BASE = ["--global-batch-size", "8", "--seq-length", "32", "--lr", "3e-3", "--seed", "11",
        "--lr-decay-iters", "8"]


def launch(nproc, args, timeout=240):
    """``python -m examples.mimo.launch`` as the launcher scripts run it."""
    cmd = [sys.executable, "-m", "examples.mimo.launch", "--standalone", "--nproc-per-node",
           str(nproc), "--", "--device", "cpu", "--distributed-timeout-minutes", "1", *args]
    env = job_env()
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)
    proc.elapsed = time.monotonic() - start
    return proc


def snapshot(root):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(root) for f in files}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Three iterations of BASE and their metrics; the checkpoint is the one of iteration 2
    (the final save at 3 is removed, as if the job had stopped there)."""
    root = tmp_path_factory.mktemp("saved")
    ckpt = root / "ckpt"
    rows = train(2, root, BASE + ["--train-iters", "3", "--save", str(ckpt), "--save-interval", "2"])
    shutil.rmtree(ckpt / "iter_0000003")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("2")
    return ckpt, rows


def copy_of(saved, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(saved[0], dst)
    return dst


def test_bad_flags_are_one_line_before_any_process_starts(tmp_path):
    proc = launch(2, ["--train-iter", "5"])  # abbreviated: before, silently --train-iters
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: unrecognized arguments: --train-iter 5"]
    # Straight under torchrun: the line comes once (rank 0), every rank exits 2.
    direct = torchrun(2, "examples.mimo.train_hetero",
                      ["--device", "cpu", "--train-iters", "2", "--llm-dp", "3"], check=False)
    assert direct.returncode != 0
    assert [l for l in direct.stderr.splitlines() if l.startswith("error:")] == \
        ["error: world size 2 != encoder ranks --encoder-tp 1 x --encoder-dp 1 = 1 + LLM ranks "
         "--llm-tp 1 x --llm-pp 1 x --llm-dp 3 = 3"]
    assert "exitcode: 2" in direct.stderr and "Traceback" not in direct.stderr.split("error:")[0]


def test_a_trainer_flag_before_the_separator_says_where_it_belongs(capsys):
    """Before: torchrun's 19-line usage."""
    from examples.mimo.launch import main

    assert main(["--standalone", "--nproc-per-node", "2", "--train-iters", "5", "--"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --train-iters: a train_hetero flag before `--`, where torchrun's go; put it after "
        "`--` (python -m examples.mimo.launch [torchrun flags] -- [train_hetero flags])"]
    assert main(["--nproc-per-node", "2", "--bogus", "--"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: torchrun does not take --bogus (before `--`; python -m examples.mimo.launch "
        "[torchrun flags] -- [train_hetero flags])"]


def test_a_typo_in_load_leaves_the_run_untouched(saved, tmp_path):
    """Before: --load of a missing directory started from iteration 0 and --save replaced the
    run's iter_N and tracker."""
    run = copy_of(saved, tmp_path)
    before = snapshot(run)
    proc = launch(2, BASE + ["--train-iters", "2", "--load", str(tmp_path / "ckpt_typo"),
                             "--save", str(run)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --load {tmp_path}/ckpt_typo "
                                                           f"does not exist")
    assert snapshot(run) == before


def test_stopped_peer_ends_within_the_timeout(tmp_path):
    """Before: the LLM rank sat in the bridge's shape exchange for torch's default 30 minutes
    (the bridge's groups had no timeout); now it fails at --distributed-timeout-minutes."""
    timeout_s = 30
    proc = torchrun(2, "tests.unit_tests.models.workers.fault_worker",
                    ["hang", "0", "2", "--device", "cpu", *BASE, "--train-iters", "5",
                     "--distributed-timeout-minutes", str(timeout_s / 60)],
                    timeout=180, check=False)
    assert proc.returncode != 0
    assert "[rank 1] error:" in proc.stderr and "imed out" in proc.stderr, proc.stderr[-3000:]
    # start-up and one iteration, then the timeout; torchrun then stops the sleeping rank
    assert proc.elapsed < timeout_s + 40, proc.elapsed


def test_a_diverging_run_stops_without_saving_garbage(tmp_path):
    """Before: --lr 1e4 skipped 26 of 30 iterations, exited 0 and saved checkpoints of the
    diverged weights. Here skips start after the save at 3: the save at 6 falls in the streak
    and is withheld, and the job stops at the 4th skip in a row."""
    ckpt = tmp_path / "ckpt"
    proc = launch(2, [*BASE, "--lr", "1e4", "--no-check-for-spiky-loss", "--train-iters", "30", "--save", str(ckpt),
                      "--save-interval", "3", "--max-consecutive-skipped-iters", "4"])
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    # every rank sees the same streak and raises together, so any of them may be "first"
    match = re.match(r"error: rank \d failed first: iterations (\d+)-(\d+) were all skipped for "
                     r"non-finite gradients \(--max-consecutive-skipped-iters 4\): the run "
                     r"diverged; stopping without a save", last)
    assert match, last
    first, stop = map(int, match.groups())
    assert stop - first == 3 and first in (4, 5, 6)
    assert "not saving iteration 6: the last" in proc.stdout
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert sorted(os.listdir(ckpt)) == ["iter_0000003", "latest_checkpointed_iteration.txt"]


def test_a_finite_but_diverging_run_stops_and_withdraws_the_checkpoint_of_its_weights(tmp_path):
    """Before: --lr 100 took the loss from 5.6 to 1e4-3e5 with no skipped iteration, exited 0 and
    left the diverged weights as the latest checkpoint. Warm-up makes iteration 2 the first
    update: its weights, saved as iteration 2, give iteration 3's loss, which stops the run."""
    ckpt = tmp_path / "ckpt"
    proc = launch(2, [*BASE, "--lr", "100", "--lr-warmup-iters", "2", "--train-iters", "30",
                      "--save", str(ckpt), "--save-interval", "1", "--keep-latest-checkpoints", "1"])
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    match = re.match(r"error: rank \d failed first: iteration 3: lm loss ([\d.e+]+) is over 10 x "
                     r"the largest of the last 100 iterations \(([\d.]+); --check-for-spiky-loss, "
                     r"--spiky-loss-factor\): the run diverged; stopping without a save; its weights "
                     r"were saved as iteration 2: moved to (\S+), latest is now iteration 1 ", last)
    assert match, last
    assert float(match.group(1)) > 10 * float(match.group(2)) and 5 < float(match.group(2)) < 6
    assert match.group(3) == str(ckpt / "diverged-iter_0000002")
    assert sorted(os.listdir(ckpt)) == ["diverged-iter_0000002", "iter_0000001",
                                        "latest_checkpointed_iteration.txt"]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "1"


def test_loading_a_checkpoint_never_runs_code_from_it(saved, tmp_path):
    """Before: a .metadata pickle whose __reduce__ calls os.system ran in the launcher's start-up
    check (--dry-run included), before any checksum; a truncated one gave two torch tracebacks.
    Now the small files are checked against checksums.json before anything is parsed, and
    .metadata goes through an allow-list of torch's metadata classes, so a forged checksums.json
    does not make a pickle trusted."""
    import json
    import pickle
    import zlib

    from examples.mimo.train_hetero import check
    from examples.mimo.training.hetero.errors import ConfigError

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    ckpt = copy_of(saved, tmp_path)
    it = ckpt / "iter_0000002"
    real = (it / ".metadata").read_bytes()

    def plant(data, forge):
        (it / ".metadata").write_bytes(data)
        if forge:
            manifest = json.loads((it / "checksums.json").read_text())
            manifest[".metadata"] = {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}
            (it / "checksums.json").write_text(json.dumps(manifest))

    plant(pickle.dumps(Payload()), forge=False)
    proc = launch(2, BASE + ["--train-iters", "4", "--load", str(ckpt), "--dry-run"], timeout=60)
    assert (proc.returncode, proc.stderr.strip().splitlines()[-1]) == (
        2, f"error: {it} is damaged: {it}/.metadata has {len(pickle.dumps(Payload()))} bytes, "
           f"{len(real)} were written")
    for data, message in ((pickle.dumps(Payload()), f"refusing to unpickle {it}/.metadata: it "
                           f"names posix.system, which is not checkpoint metadata"),
                          (real[:len(real) // 2], f"{it}/.metadata is not a readable checkpoint "
                           f"metadata file (pickle data was truncated)")):
        plant(data, forge=True)
        with pytest.raises(ConfigError) as err:
            check(BASE + ["--train-iters", "4", "--load", str(ckpt), "--dry-run"], world_size=2)
        assert str(err.value) == message
    assert not marker.exists()


def test_a_damaged_shard_is_named_and_nothing_is_trained(saved, tmp_path):
    """Before: random bytes written into a shard loaded silently and the run trained on NaN."""
    ckpt = copy_of(saved, tmp_path)
    shard = ckpt / "iter_0000002" / "__1_0.distcp"
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) // 2)
        f.write(os.urandom(64))
    before = snapshot(ckpt)
    proc = launch(2, BASE + ["--train-iters", "4", "--load", str(ckpt), "--save", str(ckpt)])
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: rank ") and f"{ckpt}/iter_0000002 is damaged: {shard} does " \
        f"not match its checksum" in last, last
    assert "iteration        3" not in proc.stdout
    assert snapshot(ckpt) == before


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a 1 MiB tmpfs here (needs root): no full disk to test with")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_named_and_leaves_nothing_behind(small_disk):
    """Before: the save failed with '<class 'OSError'>' and left iter_N.tmp on the full disk,
    which blocked the relaunch."""
    ckpt = small_disk / "ckpt"
    proc = launch(2, BASE + ["--train-iters", "1", "--save", str(ckpt)])
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert f"cannot save iteration 1 to {ckpt}/iter_0000001.tmp: no space left on device" in last
    assert os.listdir(ckpt) == []


def test_resume_with_a_new_schedule(saved, tmp_path):
    """Before: a changed --lr/--min-lr/--clip-grad was refused even with --no-load-optim, and
    --train-iters 2 -> 4 failed on decay_samples. Megatron's flags now decide; the optimizer
    state still loads (megatron-core matches param groups by their --lr)."""
    ckpt = copy_of(saved, tmp_path)
    new = ["--train-iters", "4", "--lr", "1e-3", "--min-lr", "1e-4", "--clip-grad", "0.5"]
    refused = launch(2, BASE + new + ["--load", str(ckpt)])
    assert refused.returncode == 2
    line = refused.stderr.strip().splitlines()[-1]
    assert "--lr: checkpoint 0.003, now 0.001" in line and "--override-opt_param-scheduler" in line
    rows = train(2, tmp_path, BASE + new + ["--load", str(ckpt), "--override-opt_param-scheduler"])
    assert [r["iteration"] for r in rows] == [3, 4]
    cfg = parse_config(BASE + new, world_size=2)

    class Groups:
        param_groups = [{}]

    opt = Groups()
    scheduler = build_scheduler(opt, cfg)
    scheduler.step(increment=2 * 8)
    assert rows[0]["learning_rate"] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
    assert not any(r["skipped"] for r in rows)


def test_stage_two_starts_from_a_projector_only_checkpoint(tmp_path):
    """Nemotron tiny-cpu: stage 1 trains the projector alone; stage 2 trains everything from its
    weights with a fresh optimizer and new hyperparameters, through --finetune or through
    --load-{language,vision}-from (identical). Before: refused on model.freeze_lm/freeze_vit."""
    model = ["--model-provider", "nemotron_moe_vlm", "--model-preset", "tiny-cpu",
             "--seq-length", "64", "--train-iters", "3", "--lr-warmup-iters", "1"]
    stage1 = train(2, tmp_path, model + ["--training-stage", "projector-only", "--save",
                                         str(tmp_path / "s1")], "stage1")
    stage2 = model + ["--lr", "1e-3"]
    finetune = train(2, tmp_path, stage2 + ["--load", str(tmp_path / "s1"), "--finetune",
                                            "--save", str(tmp_path / "s2")], "finetune")
    pretrained = train(2, tmp_path, stage2 + ["--load-language-from", str(tmp_path / "s1"),
                                              "--load-vision-from", str(tmp_path / "s1")], "from")
    assert [r["iteration"] for r in finetune] == [1, 2, 3]
    for key in ("lm_loss", "grad_norm", "seq_load_balancing_loss"):
        assert [r[key] for r in finetune] == [r[key] for r in pretrained]
    # Stage 1's first loss is the initial model's (same seed and data): stage 2 starts from
    # stage 1's projector, not from the initial one, and has gradients beyond the projector.
    assert finetune[0]["lm_loss"] != stage1[0]["lm_loss"]
    assert finetune[0]["grad_norm"] > stage1[0]["grad_norm"]


def test_dry_run_through_the_launcher_starts_nothing():
    proc = launch(3, ["--dry-run", "--train-iters", "2", "--llm-dp", "2"], timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LLM grid: ranks 1-2, tp 1 x pp 1 x dp 2" in proc.stdout
    assert proc.elapsed < 30


def test_weights_reshard_across_tp_when_the_optimizer_is_left_out(saved, tmp_path):
    """The policy's way out of a TP change (its error says so): --no-load-optim loads the weights
    of the LLM TP1 checkpoint into LLM TP2; the first loss, computed before any update, is the
    straight TP1 run's."""
    resumed = train(3, tmp_path, BASE + ["--train-iters", "3", "--llm-tp", "2", "--load",
                                         str(saved[0]), "--no-load-optim"], "tp2")
    assert [r["iteration"] for r in resumed] == [3]
    assert resumed[0]["lm_loss"] == pytest.approx(saved[1][2]["lm_loss"], rel=1e-6)

