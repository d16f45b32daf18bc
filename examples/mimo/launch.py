"""Validate the flags, run the trainer under torchrun, and end a failure with one summary line.

    python -m examples.mimo.launch [torchrun flags] -- [train_hetero flags]
    python -m examples.mimo.launch --standalone --nproc-per-node 2 -- --train-iters 20

Bad flags or checkpoint paths: ``error: ...`` and exit status 2 before any process starts;
--dry-run prints the resolved layout and starts nothing. A
failed run: ``error: rank R failed first: <its first error line> (traceback: FILE)`` as the last
line, exit status 1; each failing rank's traceback is kept in a file.
"""

import glob
import json
import logging
import os
import sys
import tempfile


def main(argv) -> int:
    if "--" not in argv:
        print("usage: python -m examples.mimo.launch [torchrun flags] -- [train_hetero flags]",
              file=sys.stderr)
        return 2
    split = argv.index("--")
    launcher, trainer = argv[:split], argv[split + 1:]
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from examples.mimo.train_hetero import check, dry_run_report, quiet_library_warnings
    from examples.mimo.training.hetero.errors import ConfigError
    from examples.mimo.training.hetero.exits import ignore_signal, leave_signal_to_ranks

    args = get_args_parser().parse_args([*launcher, "-m", "examples.mimo.train_hetero", *trainer])
    nodes = int(str(args.nnodes).split(":")[-1])
    world = nodes * int(args.nproc_per_node)
    quiet_library_warnings(show=False)  # rank 0 of the job shows them
    try:
        cfg, notes = check(trainer, world_size=world)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    if cfg.runtime.dry_run:
        print(dry_run_report(cfg, notes))
        return 0
    if cfg.ckpt.exit_signal is not None:
        try:
            leave_signal_to_ranks(args, cfg.ckpt.exit_signal)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 2
    failures = tempfile.mkdtemp(prefix="hetero-failures-")
    os.environ["HETERO_FAILURE_DIR"] = failures
    # torchrun's agent logs each rank it stops and its own view of the failure; the summary
    # below says what matters.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    try:
        run(args)
        if cfg.ckpt.exit_signal is not None:
            ignore_signal(cfg.ckpt.exit_signal)  # a late one must not kill the clean exit
    except ChildFailedError:
        reports = []
        for path in glob.glob(os.path.join(failures, "rank*.json")):
            with open(path) as f:
                reports.append(json.load(f))
        if reports:
            first = min(reports, key=lambda r: r["time"])
            trace = os.path.join(failures, f"rank{first['rank']}.txt")
            print(f"error: rank {first['rank']} failed first: {first['error']} (traceback: {trace})",
                  file=sys.stderr, flush=True)
        else:
            print("error: a rank died without a report (killed or crashed; see its output above)",
                  file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
