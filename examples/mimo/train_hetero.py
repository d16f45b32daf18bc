"""Heterogeneous-parallel MIMO training entrypoint: parse -> build -> train -> close.

    torchrun --nproc-per-node 2 -m examples.mimo.train_hetero --train-iters 20

Any exception on any rank prints its traceback and ends that process at once; torchrun then
stops the other ranks, and without torchrun they fail on the collective timeout
(--distributed-timeout-minutes) instead of waiting forever.
"""

import os
import sys
import traceback

from examples.mimo.training.hetero.config import parse_config
from examples.mimo.training.hetero.loop import train
from examples.mimo.training.hetero.runtime import build_runtime


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(argv, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    runtime = build_runtime(cfg)
    train(runtime)
    runtime.close()


def run(argv=None) -> None:
    """main() for a torchrun worker: a failure ends this process at once, traceback printed."""
    try:
        main(argv)
    except SystemExit:
        raise
    except BaseException:
        rank = os.environ.get("RANK", "?")
        print(f"[rank {rank}] training failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        # Skip interpreter teardown: destroying process groups could block on peers.
        os._exit(1)


if __name__ == "__main__":
    run()
