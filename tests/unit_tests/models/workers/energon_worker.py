"""Loader-level checks on a generated energon dataset, in a process of their own (energon's
worker processes are many here, and ending this process ends them at once).

    python -m tests.unit_tests.models.workers.energon_worker routing|resume|val|coverage DATASET OUT
"""

import gc
import json
import os
import signal
import sys
import time
import traceback

from megatron.energon import get_savable_loader, get_train_dataset

from examples.mimo.data.routing import LaneSet, LaneStreams
from examples.mimo.data.task_encoder import MimoTaskEncoder
from examples.mimo.data.tokenizer import Tokenizer
from examples.mimo.interfaces import DataSpec
from examples.mimo.training.hetero.exits import child_pids

# Loaders stay alive until os._exit: dropping one joins its workers (seconds each).
KEEP = []
SPEC = DataSpec(vocab_size=256, image_token_id=255, image_tokens=16, image_shape=(3, 16, 16))


def loader_factory(root: str, packing=None):
    encoder = MimoTaskEncoder(tokenizer=Tokenizer(os.path.join(root, "tokenizer")), spec=SPEC,
                              seq_length=64, with_images=True)

    def make(worker_config):
        dataset = get_train_dataset(os.path.join(root, "blend.yaml"), worker_config=worker_config,
                                    batch_size=2, task_encoder=encoder, shuffle_buffer_size=16,
                                    max_samples_per_sequence=8, packing_buffer_size=packing)
        return get_savable_loader(dataset)
    return make


def lane_keys(streams: LaneStreams, microbatches: int) -> dict:
    KEEP.append(streams)
    lanes = range(streams.lanes.first, streams.lanes.first + streams.lanes.count)
    out = {lane: [] for lane in lanes}
    for _ in range(microbatches):  # schedule order: micro-batch j of every lane, lane after lane
        for lane in lanes:
            out[lane].append(streams.next(lane)["keys"])
    return out


def in_child(fn, *args):
    """``fn(*args)`` (JSON-able) in a process forked from this one, which then ends with its
    loader workers. Loaders kept alive slow the start of later ones (why was not found: 0.5 s
    for a lane's loader alone, ~2 s with 24 idle loader workers alive, on 2 cores), and dropping
    them joins their workers: the routing cases took 47 s in one process, 24 s each in its own."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read)
            with os.fdopen(write, "w") as out:
                json.dump(fn(*args), out)
            # torch's SIGCHLD handler raises when a loader worker dies; these kills are on
            # purpose (seen in CI: it raised out of the kill loop, past os._exit)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for child in child_pids(os.getpid()):
                os.kill(child, signal.SIGKILL)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as result:
        text = result.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{fn.__name__}{args} failed in its process")
    return json.loads(text)


def routing(root: str) -> dict:
    """Per-lane sample keys, routed vs one loader per lane, for (encoder DP, LLM DP, workers).
    A lane's own loader is also what its LLM rank runs (LaneSet(lane, 1, ...))."""
    return {f"{enc_dp},{llm_dp},{workers}": in_child(_routing, root, enc_dp, llm_dp, workers)
            for enc_dp, llm_dp, workers in ((1, 2, 1), (1, 4, 2), (2, 4, 1), (1, 8, 2))}


def _routing(root: str, enc_dp: int, llm_dp: int, workers: int) -> dict:
    make = loader_factory(root)
    k = llm_dp // enc_dp
    seen = {}
    for routed in (True, False):
        keys, start = {}, time.perf_counter()
        for e in range(enc_dp):
            streams = LaneStreams(LaneSet(e * k, k, llm_dp, workers), make, routed=routed)
            keys.update(lane_keys(streams, 2))
        seen["routed" if routed else "per_lane"] = {str(lane): v for lane, v in keys.items()}
        seen[f"{'routed' if routed else 'per_lane'}_s"] = time.perf_counter() - start
    return seen


def open_shard_files() -> list:
    """Dataset files this process holds open. Loader workers are forked from it and would share
    those files' offsets: two workers seeking in one shared tar handle read each other's bytes."""
    names = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if ".tar" in target or target.endswith(".sqlite"):
            names.append(target)
    return names


def resume(root: str) -> dict:
    """Save after an odd number of micro-batches (so batches wait in the lane queues), then
    compare what a restored loader yields with what the original goes on to yield."""
    out = {}
    for packing in (6,):  # packed: the stage most likely to hold state across batches
        make = loader_factory(root, packing)
        lanes = LaneSet(0, 2, 2, 2)
        a = LaneStreams(lanes, make)
        lane_keys(a, 3)
        state = a.state_dict()
        queued = sum(len(q) for lane in a._queues for q in lane)
        straight = lane_keys(a, 4)
        b = LaneStreams(lanes, make)
        b.load_state_dict(state)
        gc.collect()
        out[str(packing)] = {"queued": queued, "open_before_fork": open_shard_files(),
                             "straight": straight, "resumed": lane_keys(b, 4)}
    return out


def val(root: str) -> dict:
    """The val split through the provider: an encoder rank feeding two lanes (routed and not)
    and the two LLM ranks, each reading more micro-batches than a pass holds."""
    from examples.mimo.data import energon
    from examples.mimo.interfaces import RankData

    def rank(is_llm, dp_rank):
        return RankData(is_llm=is_llm, dp_rank=dp_rank, llm_dp=2, encoder_dp=1, micro_batch_size=4,
                        num_microbatches=1, seq_length=64, seed=1, with_images=True)

    def cfg(routing):
        return energon.EnergonDataConfig(
            data_path=os.path.join(root, "blend.yaml"), tokenizer_type="HuggingFaceTokenizer",
            tokenizer_model=os.path.join(root, "tokenizer"), num_workers=1,
            packing_buffer_size=None, shuffle_buffer_size=0, max_samples_per_sequence=None,
            data_error_policy="fail", lane_routing=routing)

    out = {}
    for name, r, routing in (("encoder", rank(False, 0), True), ("encoder_per_lane", rank(False, 0), False),
                             ("llm0", rank(True, 0), True), ("llm1", rank(True, 1), True)):
        it = energon.build_iterator(cfg(routing), spec=SPEC, rank=r, to_model=lambda b: b, split="val")
        KEEP.append(it)
        out[name] = [it.next_batch()["keys"] for _ in range(40)]
    return out


def coverage(root: str) -> dict:
    """One pass over a dataset's train split (captions: 192 samples) through the provider with
    its default flags, on an encoder rank that feeds every lane, for (lanes, workers per lane):
    how many reads, how many distinct samples. Also the former default --shuffle-buffer-size
    100 on one layout."""
    from examples.mimo.data import energon
    from examples.mimo.interfaces import RankData
    from examples.mimo.training.hetero.config import parse_config

    out = {}
    for lanes, workers, shuffle in ((1, 3, None), (2, 2, None), (3, 1, None), (3, 3, None),
                                    (3, 3, 100)):
        args = ["--train-iters", "1", "--data-provider", "energon", "--data-path",
                os.path.join(root, "captions"), "--tokenizer-model", os.path.join(root, "tokenizer"),
                "--num-workers", str(workers), "--llm-dp", str(lanes), "--global-batch-size",
                str(2 * lanes)]
        if shuffle is not None:
            args += ["--shuffle-buffer-size", str(shuffle)]
        cfg = parse_config(args, world_size=1 + lanes).data
        rank = RankData(is_llm=False, dp_rank=0, llm_dp=lanes, encoder_dp=1, micro_batch_size=2,
                        num_microbatches=1, seq_length=64, seed=1, with_images=True)
        it = energon.build_iterator(cfg, spec=SPEC, rank=rank, to_model=lambda b: b)
        KEEP.append(it)
        keys = [json.dumps(k) for _ in range(192 // (2 * lanes)) for k in it.next_batch()["keys"]]
        out[f"{lanes},{workers},{cfg.shuffle_buffer_size}"] = {"reads": len(keys),
                                                              "distinct": len(set(keys))}
    return out


if __name__ == "__main__":
    mode, root, path = sys.argv[1:4]
    with open(path, "w") as f:
        json.dump({"routing": routing, "resume": resume, "val": val,
                   "coverage": coverage}[mode](root), f)
    sys.stdout.flush()
    os._exit(0)  # without waiting for every loader's workers to be joined one by one
