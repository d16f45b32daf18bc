"""Heterogeneous-parallel MIMO training entrypoint: parse -> check -> build -> train -> close.

    torchrun --nproc-per-node 2 -m examples.mimo.train_hetero --train-iters 20
    python -m examples.mimo.launch --nproc-per-node 2 -- --train-iters 20   # validates first

How it fails:
- bad flags or paths (found before any process group exists): ``error: <message>`` once, from
  rank 0, and exit status 2;
- at run time: the failing rank prints ``[rank R] error: <first line>`` and exits 1 at once, its
  traceback in $HETERO_FAILURE_DIR/rank<R>.txt when set (examples.mimo.launch sets it and ends
  with a summary naming the first failing rank) or on stderr otherwise. torchrun then stops the
  other ranks; without torchrun they fail on the collective timeout
  (--distributed-timeout-minutes) instead of waiting forever.
"""

import json
import os
import signal
import sys
import time
import traceback


def quiet_library_warnings(show: bool, argv=()):
    """megatron-core and torch repeat the same warnings per rank, per import and per call: a job
    shows each once (``show`` on rank 0 only), and library notices with nothing to act on not at
    all unless --verbose-warnings (read from argv here: most come while the trainer's modules are
    imported, before the flags are parsed); notices.py keeps the count."""
    from examples.mimo.training.hetero.notices import Notices

    return Notices(show=show, verbose="--verbose-warnings" in argv).install()


def check(argv, world_size: int):
    """Parse and validate flags and checkpoint paths; ConfigError (one line) on bad input."""
    from examples.mimo.data import DATA_PROVIDERS
    from examples.mimo.training.hetero.checkpointing import preflight
    from examples.mimo.training.hetero.config import parse_config
    from examples.mimo.training.hetero.errors import ConfigError

    try:
        cfg = parse_config(argv, world_size=world_size)
        notes = preflight(cfg)
        notes += DATA_PROVIDERS[cfg.data_provider].notes(cfg.data, llm_dp=cfg.grid.llm_dp)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return cfg, notes


def dry_run_report(cfg, notes) -> str:
    from examples.mimo.model_providers import MODEL_PROVIDERS
    from examples.mimo.training.hetero import memory
    from examples.mimo.training.hetero.config import describe

    facts = MODEL_PROVIDERS[cfg.model_provider].facts(cfg.model)
    default = f"checkpoints: resume from {cfg.ckpt.load}" if cfg.ckpt.load \
        else "checkpoints: none to resume"
    lines = notes if any(n.startswith("resuming") for n in notes) else [default, *notes]
    return "\n".join([describe(cfg, facts), memory.describe(cfg, memory.estimate(cfg, facts)),
                      *lines])


def check_memory(cfg) -> None:
    """On a GPU rank (and a dry run that sees one): ConfigError when the estimate does not fit."""
    from examples.mimo.model_providers import MODEL_PROVIDERS
    from examples.mimo.training.hetero import memory
    from examples.mimo.training.hetero.errors import ConfigError

    if cfg.runtime.skip_memory_check or cfg.runtime.device == "cpu":
        return
    device = memory.device_bytes(int(os.environ.get("LOCAL_RANK", "0")))
    if device is None:  # a CPU run, or a dry run on a machine without the job's GPUs
        return
    line = memory.problem(cfg, MODEL_PROVIDERS[cfg.model_provider].facts(cfg.model), device)
    if line:
        raise ConfigError(line)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    from examples.mimo.training.hetero.timers import StartupClock

    startup = StartupClock()
    rank = int(os.environ.get("RANK", "0"))
    notices = quiet_library_warnings(show=rank == 0, argv=argv)
    cfg, notes = check(argv, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    from examples.mimo.training.hetero.device import kernel_cache_env

    os.environ.update(kernel_cache_env(cfg.runtime.kernel_cache_dir, cfg.ckpt.save, os.environ))
    if cfg.runtime.dry_run:
        if rank == 0:
            print(dry_run_report(cfg, notes))
            check_memory(cfg)
        return
    check_memory(cfg)
    from examples.mimo.training.hetero import savelock
    from examples.mimo.training.hetero.ckpt_policy import remove_stale_saves
    from examples.mimo.training.hetero.loop import train
    from examples.mimo.training.hetero.runtime import build_runtime

    if rank == 0:
        # Before anything in --save is touched (the stale saves below could be a live job's).
        took_over = savelock.hold(cfg.ckpt.save) if cfg.ckpt.save else None
        for line in notes + [took_over] * bool(took_over) + remove_stale_saves(cfg.ckpt.save):
            print(line, flush=True)
    startup.lap("flags and imports")
    runtime = build_runtime(cfg, startup=startup)
    train(runtime, startup=startup)
    runtime.close()
    savelock.release_held()
    hidden = notices.summary() if rank == 0 else None
    if hidden:
        print(hidden, flush=True)


def write_report(where: str, rank: str, error: str, **extra) -> None:
    """The failure line the launcher summarises (launch.py reads every rank's)."""
    with open(os.path.join(where, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "time": time.time(), "error": error, **extra}, f)


def report_failure(rank: str, err: BaseException) -> None:
    from examples.mimo.training.hetero.errors import HeteroError

    text = str(err).strip()
    first = text if isinstance(err, HeteroError) else \
        f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
    where = os.environ.get("HETERO_FAILURE_DIR")
    trace = traceback.format_exc()
    if where:
        with open(os.path.join(where, f"rank{rank}.txt"), "w") as f:
            f.write(trace)
        write_report(where, rank, first)
    elif not isinstance(err, HeteroError):
        print(trace, file=sys.stderr)
    print(f"[rank {rank}] error: {first}", file=sys.stderr, flush=True)


def run(argv=None) -> None:
    """main() for a torchrun worker: a failure ends this process at once."""
    from examples.mimo.training.hetero import savelock
    from examples.mimo.training.hetero.errors import ConfigError
    from examples.mimo.training.hetero.exits import die_with_parent

    rank = os.environ.get("RANK", "0")
    # A launcher killed outright (kill -9, an OOM kill) cannot stop its ranks; without this they
    # train on in their own sessions and keep writing into --save.
    die_with_parent()
    # Ctrl-C reaches the ranks from the launcher, which says so in one line: a rank ends at once
    # and silently, as on SIGTERM, instead of each printing a KeyboardInterrupt from wherever
    # it was. --exit-signal SIGINT installs its own handler later.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        main(argv)
    except SystemExit:
        savelock.release_held()
        raise
    except ConfigError as err:
        savelock.release_held()
        # Every rank finds the same error; rank 0 says it. The others wait so that torchrun,
        # stopping the job at the first exit, does not stop rank 0 before it printed, and speak
        # only if they are still running then (rank 0 did not fail the same way). Under the
        # launcher the line goes to it (a race the launcher's own check could not see: another
        # job took --save first), which prints it and exits 2.
        if rank != "0":
            time.sleep(5)
        where = os.environ.get("HETERO_FAILURE_DIR")
        if where:
            write_report(where, rank, str(err), status=2)
        else:
            print(f"error: {err}", file=sys.stderr, flush=True)
        os._exit(2)
    except BaseException as err:
        report_failure(rank, err)
        # dist_checkpointing's writer processes would outlive us (holding the job's stdout, so a
        # `| tee` never ends); interpreter teardown is skipped, as destroying process groups
        # could block on peers.
        import multiprocessing

        for child in multiprocessing.active_children():
            child.kill()
        savelock.release_held()
        os._exit(1)


if __name__ == "__main__":
    run()
