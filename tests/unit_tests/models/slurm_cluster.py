"""A real single-node SLURM (Debian's slurm-wlm and munge) that a test starts and stops.

Everything lives in one temporary directory: munge's key and socket, slurm.conf, state, spool
and logs; the daemons listen on free ports and run as root (the test's user), with process
tracking by /proc (no cgroups in a container). Clients find it through SLURM_CONF.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, Optional

from tests.unit_tests.models.dist_harness import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "srun")


def missing() -> Optional[str]:
    """Why a SLURM cannot be started here, or None."""
    absent = [d for d in DAEMONS if shutil.which(d) is None and not os.path.exists(f"/usr/sbin/{d}")]
    if absent:
        return (f"needs Debian's slurm-wlm and munge ({', '.join(absent)} not found; .ci/run "
                f"installs them: apt-get install slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        return "needs root: slurmd runs jobs as their user and the test's daemons run as root"
    return None


def _which(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname()
        self.conf = root / "slurm.conf"
        self.env: Dict[str, str] = dict(os.environ, SLURM_CONF=str(self.conf))
        self._pids = []

    def start(self) -> "SlurmCluster":
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (r / "munge").chmod(0o700)
        sock = r / "munge" / "sock"
        subprocess.run([_which("munged"), f"--socket={sock}", f"--key-file={key}",
                        f"--log-file={r / 'log' / 'munged.log'}", f"--pid-file={r / 'munge' / 'pid'}",
                        f"--seed-file={r / 'munge' / 'seed'}", "--force"], check=True)
        self._pids.append(r / "munge" / "pid")
        cpus = os.cpu_count() or 2
        self.conf.write_text("\n".join([
            "ClusterName=hetero-test", f"SlurmctldHost={self.host}(127.0.0.1)",
            "AuthType=auth/munge", f"AuthInfo=socket={sock}", "CredType=cred/munge",
            "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill", "MpiDefault=none", "ReturnToService=2",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "MinJobAge=600", "KillWait=30",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP", ""]))
        subprocess.run([_which("slurmctld"), "-c"], env=self.env, check=True)
        self._pids.append(r / "slurmctld.pid")
        subprocess.run([_which("slurmd")], env=self.env, check=True)
        self._pids.append(r / "slurmd.pid")
        end = time.monotonic() + 60
        while self.run("sinfo", "-h", "-o", "%T").strip() != "idle":
            if time.monotonic() > end:
                raise RuntimeError(f"SLURM did not come up:\n{self.logs()}")
            time.sleep(0.5)
        return self

    def run(self, *cmd: str, check: bool = False) -> str:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}")
        return proc.stdout

    def submit(self, script: Path, args, *, env: Dict[str, str], sbatch=(), cwd: Path) -> int:
        proc = subprocess.run(["sbatch", "--parsable", *sbatch, str(script), *args], cwd=cwd,
                              env=dict(self.env, **env), capture_output=True, text=True, timeout=60)
        if proc.returncode:
            raise AssertionError(f"sbatch failed: {proc.stderr}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> Dict[str, str]:
        """``scontrol show job`` as key=value pairs (JobState, ExitCode, Restarts, ...)."""
        fields = {}
        for word in self.run("scontrol", "-o", "show", "job", str(job_id)).split():
            if "=" in word:
                key, value = word.split("=", 1)
                fields.setdefault(key, value)
        return fields

    def slurmd_log(self) -> str:
        path = self.root / "log" / "slurmd.log"
        return path.read_text() if path.exists() else ""

    def logs(self) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / "log" / name
            if path.exists():
                out.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-30:]))
        return "\n".join(out)

    def stop(self) -> None:
        self.run("scancel", "--user=root")
        time.sleep(1)
        for pid_file in reversed(self._pids):
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        time.sleep(1)
