"""Runs a worker under torchrun from a test (gloo on CPU) and collects what each rank wrote."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(**extra: str) -> dict:
    """The environment of a process a test starts: the repository importable, one intra-op
    thread per process (several share 2 cores)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                OMP_NUM_THREADS="1", **extra)


def torchrun(nproc: int, module: str, args: List[str], *, timeout: float = 300,
             check: bool = True, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """torchrun ``-m module args`` from the repo root, with a hard timeout; the ranks are forked
    from an agent that has imported megatron-core (fork_run.py). ``--standalone``: the agent's
    rendezvous store binds a port the OS picks as it binds; a port chosen beforehand could be
    taken by the other pytest worker's job first (seen in CI as EADDRINUSE). ``env``: the
    processes' environment, job_env()'s by default."""
    cmd = [sys.executable, "-m", "tests.unit_tests.models.fork_run", "--standalone",
           "--nproc-per-node", str(nproc), "-m", module, *args]
    proc = _launch(cmd, job_env(PYTHONUNBUFFERED="1") if env is None else env, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


def _launch(cmd: List[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    # Output goes to files and the job runs in its own session: a process left behind by a killed
    # rank (e.g. a checkpoint writer) can neither hold a pipe open nor outlive the test.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.monotonic()
        popen = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True,
                                 start_new_session=True)
        try:
            returncode = popen.wait(timeout=timeout)
        finally:
            try:
                os.killpg(popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            popen.wait()
        elapsed = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        proc = subprocess.CompletedProcess(cmd, returncode, out.read(), err.read())
    proc.elapsed = elapsed
    return proc


def read_json_lines(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_train(nproc: int, tmp_path: Path, args: List[str], name: Optional[str] = None):
    """Train with the real entrypoint: (the logging rank's per-iteration metrics, the process)."""
    metrics = tmp_path / f"{name or 'metrics'}.jsonl"
    proc = torchrun(nproc, "examples.mimo.train_hetero",
                    ["--device", "cpu", "--metrics-file", str(metrics),
                     "--distributed-timeout-minutes", "2", *args])
    return read_json_lines(metrics), proc


def train(nproc: int, tmp_path: Path, args: List[str], name: Optional[str] = None) -> List[dict]:
    return run_train(nproc, tmp_path, args, name)[0]
