"""Loader throughput of one encoder rank feeding K lanes: routed (one loader, K x W workers) vs
one loader per lane (K x W workers as well), measured side by side in one process.

    python examples/mimo/scripts/bench_energon_loader.py DATASET [--lanes 1 4 16] [--workers 1]

Prints, per K: time to build the loaders, time to the first micro-batch of every lane, and
samples/s over the following micro-batches.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "../../..")))

from examples.mimo.data.routing import LaneSet, LaneStreams  # noqa: E402
from examples.mimo.data.task_encoder import MimoTaskEncoder  # noqa: E402
from examples.mimo.data.tokenizer import Tokenizer  # noqa: E402
from examples.mimo.interfaces import DataSpec  # noqa: E402

KEEP = []  # dropping a loader joins its workers one by one (seconds): keep them to the end


def run(root: str, lanes: int, workers: int, routed: bool, microbatches: int, mbs: int) -> dict:
    from megatron.energon import get_savable_loader, get_train_dataset

    spec = DataSpec(vocab_size=256, image_token_id=255, image_tokens=16, image_shape=(3, 16, 16))
    encoder = MimoTaskEncoder(tokenizer=Tokenizer(os.path.join(root, "tokenizer")), spec=spec,
                              seq_length=64, with_images=True)

    def make(worker_config):
        return get_savable_loader(get_train_dataset(
            os.path.join(root, "blend.yaml"), worker_config=worker_config, batch_size=mbs,
            task_encoder=encoder, shuffle_buffer_size=100, max_samples_per_sequence=100))

    t0 = time.perf_counter()
    streams = LaneStreams(LaneSet(0, lanes, lanes, workers), make, routed=routed)
    KEEP.append(streams)
    built = time.perf_counter() - t0
    for lane in range(lanes):
        streams.next(lane)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(microbatches):
        for lane in range(lanes):
            streams.next(lane)
    rate = microbatches * lanes * mbs / (time.perf_counter() - t1)
    return {"build_s": built, "first_s": first, "samples_per_s": rate}


def main(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset")
    p.add_argument("--lanes", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--microbatches", type=int, default=50, help="Per lane, after the first.")
    p.add_argument("--micro-batch-size", type=int, default=4)
    a = p.parse_args(argv)
    print(f"{'lanes':>5} {'mode':>8} {'build s':>8} {'first s':>8} {'samples/s':>10}")
    for lanes in a.lanes:
        for routed in (True, False):
            r = run(a.dataset, lanes, a.workers, routed, a.microbatches, a.micro_batch_size)
            print(f"{lanes:>5} {'routed' if routed else 'per-lane':>8} {r['build_s']:>8.3f} "
                  f"{r['first_s']:>8.2f} {r['samples_per_s']:>10.0f}", flush=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
