"""The sbatch scripts against a real single-node SLURM, CPU/gloo (slurm_cluster.py starts it).

Two jobs of the small-scale parity script run side by side:
- A is requeued (``scontrol requeue``) in the middle: the requeue's SIGTERM makes the ranks save
  the iteration they are in, the requeued job resumes from that checkpoint, finishes, and its
  loss curve matches the single-grid reference that the job trains after it;
- B runs into its time limit: --exit-duration-in-mins (the job's remaining time less the margin)
  stops it with a checkpoint and the script requeues it; the second run resumes, and a SIGTERM
  (``scancel --signal=TERM``) in the middle of it leaves a fresh checkpoint and exit code 0.
"""

import re
import sys
import time

import pytest

from tests.unit_tests.models import slurm_cluster
from tests.unit_tests.models.dist_harness import ROOT, read_json_lines

SCRIPTS = ROOT / "examples" / "mimo" / "scripts"
SHORT = ["--save-interval", "4", "--lr-wsd-decay-iters", "4", "--distributed-timeout-minutes", "1"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = slurm_cluster.missing()
    if why:
        pytest.skip(why)
    cluster = slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def _wait(predicate, timeout: float, what: str, cluster) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{cluster.logs()}")
        time.sleep(0.5)


def _iterations(run_dir) -> list:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["iteration"] for r in read_json_lines(path) if "lm_loss" in r]


def _latest(run_dir) -> int:
    return int((run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text())


def _start_now_once_pending(cluster, job: int, restarts: int) -> None:
    """A requeued job waits ~2 minutes before it may start again; the test does not, but waits
    for the previous run's batch step to be gone (SLURM refuses to start it again before)."""
    _wait(lambda: cluster.job(job).get("Restarts") == str(restarts)
          and cluster.job(job).get("JobState") == "PENDING"
          and cluster.slurmd_log().count(f"[{job}.batch] done with job") >= restarts,
          120, f"job {job} requeued", cluster)
    # slurmd revokes the old run's credential at whole-second resolution: a run launched in the
    # same second as the requeue counts as revoked ("Job credential revoked", seen in CI).
    time.sleep(1.1)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=True)


def _ended(cluster, job: int) -> bool:
    return cluster.job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


def test_requeue_resumes_and_sigterm_saves(slurm, tmp_path):
    runs = tmp_path / "runs"
    env = {"HETERO_RUNS": str(runs), "HETERO_PYTHON": sys.executable}
    script = SCRIPTS / "sbatch_parity_small.sh"
    job_a = slurm.submit(script, ["--train-iters", "16", *SHORT], env=env, cwd=ROOT,
                         sbatch=["--output", str(tmp_path / "a.out")])
    job_b = slurm.submit(script, ["--train-iters", "100000", *SHORT],
                         env=dict(env, HETERO_EXIT_MARGIN_MINS="1.25", HETERO_MAX_RESTARTS="1"),
                         cwd=ROOT, sbatch=["--output", str(tmp_path / "b.out"), "--time", "2",
                                 "--signal", "TERM@5"])
    run_a = runs / f"mimo-parity-small-{job_a}"
    run_b = runs / f"mimo-parity-small-{job_b}"

    # A: requeue in the middle of the run.
    _wait(lambda: len(_iterations(run_a)) >= 6, 180, "job A's 6th iteration", slurm)
    slurm.run("scontrol", "requeue", str(job_a), check=True)
    _start_now_once_pending(slurm, job_a, restarts=1)
    # B: its first run stops on --exit-duration-in-mins and the script requeues it.
    _start_now_once_pending(slurm, job_b, restarts=1)
    first_b = _iterations(run_b)[-1]
    _wait(lambda: _iterations(run_b)[-1] > first_b, 120, "job B's second run", slurm)
    slurm.run("scancel", "--signal=TERM", str(job_b), check=True)
    _wait(lambda: _ended(slurm, job_a) and _ended(slurm, job_b), 240, "both jobs", slurm)

    out_a, out_b = (tmp_path / "a.out").read_text(), (tmp_path / "b.out").read_text()
    log_a = (run_a / "logs" / "train-node-0.log").read_text()
    log_b = (run_b / "logs" / "train-node-0.log").read_text()
    state_a, state_b = slurm.job(job_a), slurm.job(job_b)

    # A: the requeue's SIGTERM made every rank save the iteration it was in; the requeued job
    # resumed from exactly that checkpoint, trained to the end, and matched the reference.
    assert (state_a["JobState"], state_a["ExitCode"], state_a["Restarts"]) == \
        ("COMPLETED", "0:0", "1"), out_a
    stopped = int(re.search(r"stopping after iteration (\d+): SIGTERM received", log_a).group(1))
    assert f"saved {run_a}/checkpoints/iter_{stopped:07d}" in log_a
    assert f"(restart 1): parity-small on 1 node(s) x 2 cpu rank(s); run directory {run_a}; " \
           f"resuming from iteration {stopped}" in out_a
    assert _iterations(run_a) == list(range(1, 17)), "each iteration once: resumed exactly"
    assert re.search(r"parity: 16 iterations match the single-grid reference", out_a), out_a
    assert _latest(run_a) == 16
    assert (run_a / "tensorboard").is_dir() and (run_a / "reference" / "metrics.jsonl").exists()

    # B: time limit -> checkpoint -> requeued by the script -> resumed -> SIGTERM -> checkpoint,
    # exit 0, and no further requeue.
    assert (state_b["JobState"], state_b["ExitCode"], state_b["Restarts"]) == \
        ("COMPLETED", "0:0", "1"), out_b
    # the time limit: --exit-duration-in-mins, or SLURM's --signal=TERM@5, which may come up to
    # a minute early
    timed = int(re.search(r"stopping after iteration (\d+): (--exit-duration-in-mins [0-9.]+ "
                          r"reached|SIGTERM received)", log_b).group(1))
    assert re.search(rf"stopped before the time limit at iteration {timed} \([0-9.]+ min left\); "
                     r"requeueing", out_b), out_b
    assert f"resuming from iteration {timed}" in out_b
    term = int(re.findall(r"stopping after iteration (\d+): SIGTERM received", log_b)[-1])
    assert term > timed and _latest(run_b) == term
    assert (run_b / "checkpoints" / f"iter_{timed:07d}").is_dir()  # the earlier one is kept
    assert "training exited 0" in out_b.split("(restart 1)")[1]
    assert "parity:" not in out_b  # stopped early: no reference run
