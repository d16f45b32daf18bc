"""In-process tests of the --save lock (savelock.py): who holds it, when a left-behind lock is
stale, and what a job that lost it may no longer do. Two real jobs on one --save and a killed
launcher are in test_hetero_failures.py."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from examples.mimo.training.hetero import savelock
from examples.mimo.training.hetero.errors import CheckpointError


def write_lock(save, **holder):
    save.mkdir(exist_ok=True)
    base = {"job_id": None, "host": "elsewhere", "pid": 1, "start_ticks": 1, "token": "t"}
    (save / savelock.LOCK).write_text(json.dumps({**base, **holder}))
    return save / savelock.LOCK


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(savelock, "_slurm_job_running", lambda job_id: None)


def test_a_held_lock_refuses_a_second_job_naming_the_holder(tmp_path):
    save = tmp_path / "run"
    lock, note = savelock.SaveLock.acquire(str(save))
    try:
        assert note is None
        holder = json.loads((save / savelock.LOCK).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == savelock.identity()["host"]
        message = (f"--save {save} is in use by a job (host {holder['host']}, pid {os.getpid()}): "
                   f"one job per save directory; wait for it, pick another --save, or remove "
                   f"{save}/{savelock.LOCK} if that job is gone")
        with pytest.raises(savelock.SaveDirInUse) as err:
            savelock.SaveLock.acquire(str(save))
        assert str(err.value) == message
        with pytest.raises(savelock.SaveDirInUse):
            savelock.check_free(str(save))
    finally:
        lock.release()
    assert not (save / savelock.LOCK).exists()
    savelock.check_free(str(save))


@pytest.mark.parametrize("holder, why", [
    (lambda me: {"host": me["host"], "pid": dead_pid()}, r"pid \d+ is no longer running on"),
    # a running pid that is not the holder (pids are reused): its start time differs
    (lambda me: {"host": me["host"], "pid": os.getpid(), "start_ticks": 1},
     r"pid \d+ is no longer running on"),
])
def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(tmp_path, holder, why):
    path = write_lock(tmp_path, **holder(savelock.identity()))
    savelock.check_free(str(tmp_path))
    lock, note = savelock.SaveLock.acquire(str(tmp_path))
    lock.release()
    assert note.startswith(f"took over {path} from a job (host ")
    assert re.search(why, note), note


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    write_lock(tmp_path, job_id="4242", host="node7", pid=99)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lock, note = savelock.SaveLock.acquire(str(tmp_path))
    lock.release()
    assert note.endswith("from job 4242 (host node7, pid 99): SLURM job 4242 requeued")


def test_a_lock_on_another_host_is_stale_only_without_heartbeat_or_job(tmp_path, monkeypatch):
    path = write_lock(tmp_path, job_id="77", host="node3", pid=12)
    with pytest.raises(savelock.SaveDirInUse, match="in use by job 77 \\(host node3, pid 12\\)"):
        savelock.SaveLock.acquire(str(tmp_path))
    monkeypatch.setattr(savelock, "_slurm_job_running", lambda job_id: job_id != "77")
    assert savelock.stale_reason(savelock.read_holder(str(path)), savelock.identity(),
                                 time.time()) == "SLURM job 77 is no longer running"
    monkeypatch.setattr(savelock, "_slurm_job_running", lambda job_id: None)  # no squeue here
    old = time.time() - savelock.STALE_S - 5
    os.utime(path, (old, old))
    lock, note = savelock.SaveLock.acquire(str(tmp_path))
    lock.release()
    assert "no heartbeat for 30" in note and "(stale after 300 s)" in note


def test_a_job_that_lost_its_lock_saves_nothing(tmp_path):
    lock, _ = savelock.SaveLock.acquire(str(tmp_path))
    lock.check()
    write_lock(tmp_path, job_id="9", host="node1", pid=5, token="someone else")
    with pytest.raises(CheckpointError, match="not saving: .*hetero.lock is no longer this job's "
                                              "\\(now: job 9 \\(host node1, pid 5\\)\\)"):
        lock.check()
    lock.release()  # leaves the other job's lock alone
    assert json.loads((tmp_path / savelock.LOCK).read_text())["token"] == "someone else"


def test_without_hard_links_the_lock_is_an_exclusive_create(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(savelock.os, "link", no_links)
    lock, _ = savelock.SaveLock.acquire(str(tmp_path))
    try:
        assert json.loads((tmp_path / savelock.LOCK).read_text())["pid"] == os.getpid()
        with pytest.raises(savelock.SaveDirInUse):
            savelock.SaveLock.acquire(str(tmp_path))
        assert sorted(os.listdir(tmp_path)) == [savelock.LOCK]  # no temporary left behind
    finally:
        lock.release()
