"""Runs the real entrypoint with a fault injected on one rank.

    fault_worker.py raise|hang|nan <rank> <iteration> <train_hetero flags...>

raise: that rank's data iterator raises at that iteration.
hang:  that rank stops making progress at that iteration (alive, not dead: it sleeps).
nan:   that rank's per-token loss becomes NaN at that iteration.
"""

import os
import sys
import time

import torch

from examples.mimo import train_hetero
from examples.mimo.data import lanes
from examples.mimo.training.hetero import step
from examples.mimo.training.hetero.config import parse_config


def main(mode: str, rank: int, iteration: int, argv):
    if int(os.environ["RANK"]) == rank:
        calls = {"n": 0}
        if mode in ("raise", "hang"):
            original_next = lanes.LaneIterator.__next__

            def failing_next(self):
                calls["n"] += 1
                if calls["n"] > (iteration - 1) * self.layout.num_microbatches:
                    if mode == "hang":
                        time.sleep(3600)
                    raise RuntimeError("injected data failure")
                return original_next(self)

            lanes.LaneIterator.__next__ = failing_next
        else:
            original_loss = step.loss_func
            per_iter = parse_config(argv, int(os.environ["WORLD_SIZE"])).batch.num_microbatches

            def nan_loss(loss_mask, image_tokens, per_token_loss):
                calls["n"] += 1
                loss, tokens, report = original_loss(loss_mask, image_tokens, per_token_loss)
                if calls["n"] == (iteration - 1) * per_iter + 1:  # its first micro-batch
                    loss = loss * torch.tensor(float("nan"))
                return loss, tokens, report

            step.loss_func = nan_loss
    train_hetero.run(argv)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
