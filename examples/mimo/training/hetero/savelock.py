"""A run owns its --save directory while it runs: ``<save>/hetero.lock``.

Global rank 0 takes it before anything is trained or cleaned up (train_hetero.main), refreshes
it every HEARTBEAT_S from a daemon thread, and removes it when the job ends. The launcher of a
second job reads it first (``check_free``) and stops with one line naming the holder before it
starts any process; two jobs started at the same instant both get past that check, and exactly
one of them links its fully written lock into place (link() fails on an existing name: atomic on
local disks, NFS, Lustre and GPFS).

A lock left behind is stale, and taken over with a log line, when its holder is provably gone:
- the same SLURM job id (a requeued job; SLURM ended the old processes first);
- the same host and the holder's pid is not running with the start time it recorded (pids are
  reused);
- another host and squeue reports the holder's SLURM job as no longer running, or its heartbeat
  is older than STALE_S (compared with this host's clock: STALE_S leaves room for skew).
Otherwise the job refuses to start; removing the file by hand is the override, and the line
says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from typing import Optional

from examples.mimo.training.hetero.errors import CheckpointError, ConfigError

LOCK = "hetero.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0


class SaveDirInUse(ConfigError):
    """Another live job holds the --save directory: exit status 2, like any bad start."""


def _start_ticks(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def identity() -> dict:
    pid = os.getpid()
    return {"job_id": os.environ.get("SLURM_JOB_ID"), "host": socket.gethostname(), "pid": pid,
            "start_ticks": _start_ticks(pid), "token": uuid.uuid4().hex, "since": time.time()}


def read_holder(path: str) -> Optional[dict]:
    """The lock's holder, None without a lock; a lock being written reads as {} (live)."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
        holder["heartbeat"] = os.stat(path).st_mtime
        return holder
    except (ValueError, OSError):
        return {}


def _slurm_job_running(job_id: str) -> Optional[bool]:
    """What squeue says of a job, or None where there is no squeue (or it does not answer)."""
    if shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    state = out.stdout.strip()
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        return None
    return state in ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "PENDING",
                     "REQUEUED", "RESIZING", "SIGNALING", "STAGE_OUT")


def stale_reason(holder: dict, me: dict, now: float) -> Optional[str]:
    """Why the holder is gone (the lock may be taken over), or None while it may be alive."""
    if not holder:
        return None
    if holder.get("job_id") and holder.get("job_id") == me["job_id"]:
        return f"SLURM job {holder['job_id']} requeued"
    if holder.get("host") == me["host"]:
        pid = holder.get("pid")
        ticks = _start_ticks(pid) if isinstance(pid, int) else None
        if ticks is None or holder.get("start_ticks") not in (None, ticks):
            return f"pid {pid} is no longer running on {me['host']}"
        return None
    if holder.get("job_id") and _slurm_job_running(holder["job_id"]) is False:
        return f"SLURM job {holder['job_id']} is no longer running"
    age = now - holder.get("heartbeat", now)
    if age > STALE_S:
        return f"no heartbeat for {age:.0f} s (stale after {STALE_S:.0f} s)"
    return None


def describe_holder(holder: dict) -> str:
    if not holder:
        return "a job that is taking it now"
    job = f"job {holder['job_id']}" if holder.get("job_id") else "a job"
    return f"{job} (host {holder.get('host')}, pid {holder.get('pid')})"


def _in_use(save: str, path: str, holder: dict) -> SaveDirInUse:
    return SaveDirInUse(f"--save {save} is in use by {describe_holder(holder)}: one job per save "
                        f"directory; wait for it, pick another --save, or remove {path} if that "
                        f"job is gone")


def check_free(save: Optional[str]) -> None:
    """Before any process starts: SaveDirInUse when a live job holds ``save``."""
    if save is None:
        return
    path = os.path.join(save, LOCK)
    holder = read_holder(path)
    if holder is not None and stale_reason(holder, identity(), time.time()) is None:
        raise _in_use(save, path, holder)


class SaveLock:
    """The held lock of this job (global rank 0)."""

    def __init__(self, save: str, me: dict):
        self.save, self.me = save, me
        self.path = os.path.join(save, LOCK)
        self.lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="save-lock heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, save: str) -> tuple:
        """(the lock, a log line or None); SaveDirInUse when a live job holds it."""
        os.makedirs(save, exist_ok=True)
        me = identity()
        path = os.path.join(save, LOCK)
        # Written whole under a name of its own, then linked into place: link() fails when the
        # lock exists (atomic on NFS too, where O_EXCL was not before v3), and a reader never
        # sees a half-written lock.
        mine = f"{path}.{me['token']}"
        with open(mine, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        note = None
        try:
            for _ in range(3):
                try:
                    os.link(mine, path)
                    return cls(save, me), note
                except FileExistsError:
                    pass
                except OSError:  # no hard links on this file system (some FUSE mounts)
                    with contextlib.suppress(FileExistsError):
                        with open(path, "x") as f:
                            json.dump(me, f)
                        return cls(save, me), note
                holder = read_holder(path)
                if holder is None:
                    continue  # released meanwhile
                why = stale_reason(holder, me, time.time())
                if why is None:
                    raise _in_use(save, path, holder)
                with contextlib.suppress(FileNotFoundError):  # one of several takers wins
                    os.replace(path, f"{path}.stale-{me['token']}")
                    os.remove(f"{path}.stale-{me['token']}")
                note = f"took over {path} from {describe_holder(holder)}: {why}"
            raise _in_use(save, path, read_holder(path) or {})
        finally:
            os.remove(mine)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.verify()
            if self.lost is None:
                with contextlib.suppress(OSError):
                    os.utime(self.path)

    def verify(self) -> None:
        """Notes (in ``lost``) when the file no longer names this job: a save then refuses."""
        holder = read_holder(self.path)
        if holder is None or holder.get("token") != self.me["token"]:
            self.lost = (f"{self.path} is no longer this job's (now: "
                         f"{describe_holder(holder) if holder is not None else 'no lock'})")

    def check(self) -> None:
        """Before a save writes or publishes anything."""
        self.verify()
        if self.lost:
            raise CheckpointError(f"not saving: {self.lost}; another job may be writing here")

    def release(self) -> None:
        self._stop.set()
        self.verify()
        if self.lost is None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)


_HELD: Optional[SaveLock] = None


def hold(save: str) -> Optional[str]:
    """Take the lock for this process (global rank 0); returns the log line of a takeover."""
    global _HELD
    _HELD, note = SaveLock.acquire(save)
    return note


def held() -> Optional[SaveLock]:
    return _HELD


def release_held() -> None:
    """At the end of the job, and on the way out of a failed one (train_hetero.run)."""
    global _HELD
    if _HELD is not None:
        _HELD.release()
        _HELD = None
