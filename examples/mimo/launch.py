"""Validate the flags, run the trainer under torchrun, and end a failure with one summary line.

    python -m examples.mimo.launch [torchrun flags] -- [train_hetero flags]
    python -m examples.mimo.launch --standalone --nproc-per-node 2 -- --train-iters 20

Bad flags or checkpoint paths, or a --save another live job holds: ``error: ...`` and exit
status 2 before any process starts; --dry-run prints the resolved layout and starts nothing. A
failed run: ``error: rank R failed first: <its first error line> (traceback: FILE)`` as the last
line, exit status 1; each failing rank's traceback is kept in a file. SIGTERM or Ctrl-C: the
ranks are stopped and ``error: stopped by SIG...; the last checkpoint is ...``, exit status
128 + the signal. HETERO_DIE_WITH_PARENT=1: this process dies with its parent (a wrapper that
only times it); the ranks always die with this process.
"""

import glob
import json
import logging
import os
import signal
import sys
import tempfile


# Between SIGTERM and SIGKILL when the agent stops the ranks (torchrun's: 30 s). A SIGSTOPped or
# hung rank never acts on the SIGTERM, so the grace comes on top of --distributed-timeout-minutes;
# nothing is left to save once a peer failed.
SHUTDOWN_GRACE_S = 5
MODULE = "examples.mimo.train_hetero"
USAGE = "usage: python -m examples.mimo.launch [torchrun flags] -- [train_hetero flags]"


def _trainer_flags() -> set:
    from examples.mimo.training.hetero.config import build_parser

    return set(build_parser()._option_string_actions)


def parse_launcher(launcher: list, trainer: list):
    """torchrun's flags -> its namespace; ValueError (one line) for a flag it does not take,
    naming the side of ``--`` a trainer flag belongs on."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()

    def error(message):
        raise ValueError(message)

    parser.error = error
    _, unknown = parser.parse_known_args([*launcher, "-m", MODULE])
    if unknown:
        flags = [a.split("=")[0] for a in unknown if a.startswith("-")]
        misplaced = [f for f in flags if f in _trainer_flags()]
        if misplaced:
            raise ValueError(f"{', '.join(misplaced)}: a train_hetero flag before `--`, where "
                             f"torchrun's go; put it after `--` ({USAGE[7:]})")
        raise ValueError(f"torchrun does not take {' '.join(unknown)} (before `--`; {USAGE[7:]})")
    return parser.parse_args([*launcher, "-m", MODULE, *trainer])


def last_checkpoint(save) -> str:
    from examples.mimo.training.hetero.ckpt_policy import find_checkpoint
    from examples.mimo.training.hetero.errors import CheckpointError

    if save is None:
        return "no checkpoint (no --save)"
    try:
        found = find_checkpoint(save)
    except CheckpointError as err:
        return f"no usable checkpoint in {save} ({err})"
    return f"the last checkpoint is {found[1]}" if found else f"no checkpoint in {save} yet"


def main(argv) -> int:
    if os.environ.get("HETERO_DIE_WITH_PARENT") == "1":
        from examples.mimo.training.hetero.exits import die_with_parent

        die_with_parent()
    if "--" not in argv:
        print(USAGE, file=sys.stderr)
        return 2
    split = argv.index("--")
    launcher, trainer = argv[:split], argv[split + 1:]
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    from examples.mimo.train_hetero import check, check_memory, dry_run_report, quiet_library_warnings
    from examples.mimo.training.hetero import compat, savelock
    from examples.mimo.training.hetero.errors import ConfigError
    from examples.mimo.training.hetero.exits import ignore_signal, leave_signal_to_ranks

    quiet_library_warnings(show=False)  # rank 0 of the job shows them
    try:
        args = parse_launcher(launcher, trainer)
        nodes = int(str(args.nnodes).split(":")[-1])
        if not str(args.nproc_per_node).isdigit():
            raise ValueError(f"--nproc-per-node {args.nproc_per_node}: give the number of ranks "
                             f"per node (the world size is checked against the grids)")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    world = nodes * int(args.nproc_per_node)
    try:
        cfg, notes = check(trainer, world_size=world)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    if cfg.runtime.dry_run:
        print(dry_run_report(cfg, notes))
        try:
            check_memory(cfg)  # a dry run ends here: CUDA initialised in this process is harmless
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 2
        return 0
    # Another node's launcher of this same job may find the lock its rank 0 just took: only
    # SLURM's job id tells them apart, so without it only a single node checks here (rank 0's
    # exclusive create still decides every race).
    if nodes == 1 or os.environ.get("SLURM_JOB_ID"):
        try:
            savelock.check_free(cfg.ckpt.save)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 2
    grace = getattr(args, "shutdown_timeout", None)  # torchrun's --shutdown-timeout, if given
    compat.launcher_shutdown_grace(SHUTDOWN_GRACE_S if grace is None else grace)
    if cfg.ckpt.exit_signal is not None:
        try:
            leave_signal_to_ranks(args, cfg.ckpt.exit_signal)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 2
    failures = tempfile.mkdtemp(prefix="hetero-failures-")
    os.environ["HETERO_FAILURE_DIR"] = failures
    # torchrun's own default (one thread per rank), set here so that it does not print its
    # five-line banner about setting it; a value of the caller's is kept.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # torchrun's agent logs each rank it stops and its own view of the failure; the summary
    # below says what matters.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
        if cfg.ckpt.exit_signal is not None:
            ignore_signal(cfg.ckpt.exit_signal)  # a late one must not kill the clean exit
    except SignalException as stop:
        # torchrun's agent has stopped the ranks already (SIGTERM, then SIGKILL after the grace).
        print(f"error: stopped by {stop.sigval.name}; {last_checkpoint(cfg.ckpt.save)}",
              file=sys.stderr, flush=True)
        return 128 + int(stop.sigval)
    except ChildFailedError:
        reports = []
        for path in glob.glob(os.path.join(failures, "rank*.json")):
            with open(path) as f:
                reports.append(json.load(f))
        if reports:
            first = min(reports, key=lambda r: r["time"])
            if first.get("status") == 2:  # a bad start only a rank could see (train_hetero.run)
                print(f"error: {first['error']}", file=sys.stderr, flush=True)
                return 2
            trace = os.path.join(failures, f"rank{first['rank']}.txt")
            print(f"error: rank {first['rank']} failed first: {first['error']} (traceback: {trace})",
                  file=sys.stderr, flush=True)
        else:
            print("error: a rank died without a report (killed or crashed; see its output above)",
                  file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # Ctrl-C before torchrun's agent took over the signal
        print("error: interrupted (SIGINT) before the ranks started", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)
