"""Preemption-safe exits on CPU/gloo: --exit-signal-handler and --exit-duration-in-mins."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

# free_port is unused on purpose: the port test patches it, so a job that went back to it fails
from tests.unit_tests.models.dist_harness import (ROOT, free_port, job_env, read_json_lines,
                                                   run_train)


def _rank_pid(parent: int, rank: int) -> int:
    """The pid of a torchrun worker by its RANK."""
    for child in subprocess.run(["pgrep", "-P", str(parent)], capture_output=True,
                                text=True).stdout.split():
        try:
            env = open(f"/proc/{child}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(child)
    raise AssertionError(f"no worker with RANK={rank} under {parent}")


def _wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _signal_while_training(cmd, env, *, out, metrics, rows: int, act) -> int:
    """Start the job; once ``metrics`` has ``rows`` lines, ``act(job)``. The job must exit 0; the
    iteration it stopped after on SIGTERM is returned."""
    with open(out, "w") as log:
        job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
        try:
            _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= rows,
                      180, f"{rows} iterations")
            act(job)
            assert job.wait(timeout=120) == 0, out.read_text()[-3000:]
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    return int(re.search(r"stopping after iteration (\d+): SIGTERM received",
                         out.read_text()).group(1))


def _job(args, metrics):
    """The real torchrun (the tests signal its ranks), with its command and environment.
    --standalone: its rendezvous store binds a port the OS picks when it binds (no port chosen
    beforehand that another job can take), and the workers join through that store."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "examples.mimo.train_hetero", *args, "--metrics-file", str(metrics)]
    return cmd, job_env(PYTHONUNBUFFERED="1")


def test_the_signal_tests_job_starts_when_a_port_it_might_pick_is_taken(tmp_path, monkeypatch):
    """A clean-clone CI run failed a harness launch at the rendezvous with EADDRINUSE: a port
    free_port() returned was taken (by the other pytest worker's job) before torchrun bound it.
    This test's job must not depend on a port chosen in advance."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        # a job that went back to choosing its port with free_port() would get the taken one
        monkeypatch.setattr(sys.modules[__name__], "free_port", lambda: taken.getsockname()[1])
        cmd, env = _job(["--device", "cpu", "--global-batch-size", "8", "--seq-length", "32",
                         "--train-iters", "1"], tmp_path / "m.jsonl")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(read_json_lines(tmp_path / "m.jsonl")) == 1


def test_exit_signal_saves_on_every_rank_exits_zero_and_resumes(tmp_path):
    """SIGTERM to one rank (as SLURM's --signal may reach only some): every rank stops after the
    same iteration, saves, and the job exits 0; a second SIGTERM during that save changes nothing;
    the earlier checkpoint stays, and --load continues from the new one until its time limit."""
    ckpt, metrics, out = tmp_path / "ckpt", tmp_path / "m.jsonl", tmp_path / "out.txt"
    args = ["--device", "cpu", "--global-batch-size", "8", "--seq-length", "32",
            "--distributed-timeout-minutes", "1", "--train-iters", "5000", "--save", str(ckpt),
            "--save-interval", "4",
            "--exit-signal-handler"]
    cmd, env = _job(args, metrics)

    def signal_rank_1_twice(job):
        rank1 = _rank_pid(job.pid, 1)
        os.kill(rank1, signal.SIGTERM)
        _wait_for(lambda: "stopping after iteration" in out.read_text(), 60, "the stop")
        os.kill(rank1, signal.SIGTERM)  # while the checkpoint is being written

    stopped = _signal_while_training(cmd, env, out=out, metrics=metrics, rows=6,
                                     act=signal_rank_1_twice)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(stopped)
    assert (ckpt / "iter_0000004").is_dir()  # the interval save before it is untouched
    rows = read_json_lines(metrics)
    assert rows[-1]["iteration"] == stopped
    # The resume also runs into --exit-duration-in-mins (counted from process start).
    resumed, proc = run_train(2, tmp_path, [*args, "--load", str(ckpt), "--exit-duration-in-mins",
                                            "0.1"], "resumed")
    assert resumed[0]["iteration"] == stopped + 1
    assert resumed[0]["consumed_samples"] == (stopped + 1) * 8
    last = int(re.search(r"stopping after iteration (\d+): --exit-duration-in-mins 0.1 reached",
                         proc.stdout).group(1))
    assert last == resumed[-1]["iteration"] < 5000
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(last)


def test_the_signal_is_left_to_the_ranks_and_ignored_once_training_is_over():
    """In process: the launcher takes the exit signal off torchrun's list and forwards it to its
    children; after the last save a rank (and the launcher) ignore it, since Python restores the
    default action of a handled signal when it finalizes and a late SIGTERM then killed a rank
    that had saved and was exiting 0 (found on the SLURM test: SLURM's --signal came early)."""
    import argparse

    import torch

    from examples.mimo.training.hetero.exits import ExitConditions, child_pids, leave_signal_to_ranks

    previous = signal.getsignal(signal.SIGUSR2)
    try:
        args = argparse.Namespace(signals_to_handle="SIGTERM,SIGINT,SIGUSR2,SIGHUP")
        leave_signal_to_ranks(args, "SIGUSR2")
        assert args.signals_to_handle == "SIGTERM,SIGINT,SIGHUP"
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        assert child.pid in child_pids(os.getpid())
        os.kill(os.getpid(), signal.SIGUSR2)  # forwarded: the child dies of it
        assert child.wait(timeout=10) == -signal.SIGUSR2
        try:
            leave_signal_to_ranks(argparse.Namespace(), "SIGUSR2")
            raise AssertionError("a torchrun without --signals-to-handle must be refused")
        except ValueError as err:
            assert "--signals-to-handle" in str(err)

        exits = ExitConditions(signal_name="SIGUSR2", duration_mins=None, device=torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGUSR2)
        assert exits.received
        exits.finish()
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_a_signal_to_every_process_of_the_job_saves_and_exits_zero(energon_data, tmp_path):
    """What SLURM does on `scancel --signal=TERM`, requeue or preemption: SIGTERM to every process
    of the step at once, here the launcher (torchrun's agent), both ranks and their energon
    DataLoader workers. The launcher passes it on instead of stopping the ranks, the workers
    keep serving the iteration being finished, every rank saves, the launcher exits 0."""
    from tests.unit_tests.models.test_hetero_energon import ENV, energon_args

    ckpt, metrics, out = tmp_path / "ckpt", tmp_path / "m.jsonl", tmp_path / "out.txt"
    cmd = [sys.executable, "-m", "examples.mimo.launch", "--standalone", "--nproc-per-node", "2",
           "--", "--device", "cpu", "--distributed-timeout-minutes", "1", "--train-iters", "5000",
           "--global-batch-size", "4", "--save", str(ckpt), "--exit-signal-handler",
           "--metrics-file", str(metrics), *energon_args(energon_data, "--num-workers", "2")]

    def signal_every_process(job):
        workers = [p for rank in (0, 1) for p in subprocess.run(
            ["pgrep", "-P", str(_rank_pid(job.pid, rank))], capture_output=True,
            text=True).stdout.split()]
        assert len(workers) >= 2, "each rank has its DataLoader workers"
        os.killpg(job.pid, signal.SIGTERM)

    stopped = _signal_while_training(cmd, ENV, out=out, metrics=metrics, rows=3,
                                     act=signal_every_process)
    text = out.read_text()
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(stopped)
    assert "error" not in text.lower().replace("error_policy", ""), text[-3000:]
