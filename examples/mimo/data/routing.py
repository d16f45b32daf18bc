"""Lane routing: the micro-batch streams of several LLM lanes from one energon loader.

energon splits shards and seeds shuffling by *global worker id* (rank * num_workers + worker) over
world_size * num_workers workers. The loader of lane l (rank l of llm_dp, W workers) owns global
workers l*W .. l*W+W-1 and yields their batches round-robin. An encoder rank that feeds lanes
f .. f+k-1 runs one loader as rank f/k of llm_dp/k with k*W workers: the same global workers, the
same shards, order and seeds. Each batch goes back to its lane by the producing worker's global
id (its restore key says which), and each lane takes its workers' batches round-robin, as its own
loader would. With --num-workers 0 there are no worker ids to route by; each lane then gets its
own in-process loader.

State (checkpointed per rank): each loader's energon state, each lane's round-robin position, and
the restore keys of batches already received but not consumed (a lane's workers run ahead of its
turn); a resume re-creates those from their keys (energon's restore_sample).
"""

from __future__ import annotations

import io
import pickle
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, List

import torch

from examples.mimo.interfaces import DataStateMismatch


@dataclass(frozen=True)
class LaneSet:
    first: int  # first lane this rank reads
    count: int  # lanes this rank reads
    total: int  # all lanes (LLM DP)
    workers: int  # loader workers per lane (--num-workers)


def lane_set(*, is_llm: bool, dp_rank: int, llm_dp: int, encoder_dp: int, workers: int) -> LaneSet:
    if is_llm:
        return LaneSet(dp_rank, 1, llm_dp, workers)
    if encoder_dp <= llm_dp:  # fan-out: whole lanes
        k = llm_dp // encoder_dp
        return LaneSet(dp_rank * k, k, llm_dp, workers)
    # fan-in: a share of one lane's micro-batch
    return LaneSet(dp_rank * llm_dp // encoder_dp, 1, llm_dp, workers)


class LaneStreams:
    """``next(lane)`` gives lane ``lane``'s next micro-batch (a task-encoder batch dict)."""

    def __init__(self, lanes: LaneSet, make_loader: Callable[..., object], *, routed: bool = True,
                 finite: bool = False):
        from megatron.energon import WorkerConfig

        self.lanes = lanes
        self.routed = routed and lanes.workers > 0
        # finite: the loaders end after a pass (a val split); a lane that needs more starts the
        # next pass of its source. Every rank reading a lane sees it end at the same batch.
        self.finite = finite
        self._per_lane = max(lanes.workers, 1)
        if self.routed:
            configs = [WorkerConfig(rank=lanes.first // lanes.count, world_size=lanes.total // lanes.count,
                                    num_workers=lanes.workers * lanes.count)]
        else:
            configs = [WorkerConfig(rank=lane, world_size=lanes.total, num_workers=lanes.workers)
                       for lane in self._lane_ids()]
        self._make, self._configs = make_loader, configs
        self.loaders = [make_loader(c) for c in configs]
        self._iters = [None] * len(self.loaders)
        self._queues: List[List[Deque[dict]]] = [[deque() for _ in range(self._per_lane)]
                                                 for _ in range(lanes.count)]
        self._cursor = [0] * lanes.count
        self._passes = 0  # passes over a finite split that ended
        self.dropped = 0  # samples the task encoder dropped, all lanes

    def _lane_ids(self) -> range:
        return range(self.lanes.first, self.lanes.first + self.lanes.count)

    def _pull(self, source: int) -> None:
        # torch's DataLoader draws its base seed from the global RNG when an iterator starts: a
        # resumed run starts it at another point of that stream than the straight run, and the
        # model's random draws (RADIO's position-embedding crops) would follow a shifted stream.
        with torch.random.fork_rng(devices=[]):
            if self._iters[source] is None:
                self._iters[source] = iter(self.loaders[source])
            try:
                batch = next(self._iters[source])
            except StopIteration:
                if not self.finite:
                    raise
                self._iters[source] = None
                self._passes += 1
                return
        self.dropped += batch.pop("dropped")
        if self.routed:
            gid = batch["__restore_key__"][1]
            lane, worker = divmod(gid, self._per_lane)
            self._queues[lane - self.lanes.first][worker].append(batch)
        else:  # source i is lane first + i's own loader
            worker = batch["__restore_key__"][1] % self._per_lane if self.lanes.workers else 0
            self._queues[source][worker].append(batch)

    def next(self, lane: int) -> dict:
        i = lane - self.lanes.first
        queue = self._queues[i][self._cursor[i]]
        ended = self._passes
        while not queue:
            if self._passes - ended > 1:  # a whole pass went by without a batch for it
                raise RuntimeError(f"data: a pass over the split gives lane {lane} (loader worker "
                                   f"{self._cursor[i]}) no micro-batch; it holds too few samples "
                                   f"for this many lanes and workers")
            self._pull(0 if self.routed else i)
        self._cursor[i] = (self._cursor[i] + 1) % self._per_lane
        return queue.popleft()

    # ---- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        state = {"lanes": self.lanes, "routed": self.routed,
                 "loaders": [ld.save_state_rank() for ld in self.loaders],
                 "cursor": list(self._cursor),
                 "queued": [[[b["__restore_key__"] for b in q] for q in lane] for lane in self._queues]}
        return {"energon": _dumps(state)}

    def load_state_dict(self, state: dict) -> None:
        saved = _loads(state["energon"])
        if saved["lanes"] != self.lanes or saved["routed"] != self.routed:
            raise DataStateMismatch(f"data loader state of {saved['lanes']} (routed {saved['routed']}) "
                             f"cannot restore {self.lanes} (routed {self.routed})")
        if any(it is not None for it in self._iters):
            raise RuntimeError("data loader state restored after iteration started")
        for ld, s in zip(self.loaders, saved["loaders"]):
            ld.restore_state_rank(s)
        self._cursor = list(saved["cursor"])
        # Queued batches are re-created by loaders of their own, dropped afterwards: restoring
        # through a training loader opens its shard files here, its workers (forked later) inherit
        # those handles, and two workers seeking in one shared handle read each other's bytes.
        restorers = {}
        for i, lane in enumerate(saved["queued"]):
            source = 0 if self.routed else i
            for w, keys in enumerate(lane):
                if not keys:
                    continue
                if source not in restorers:
                    restorers[source] = self._make(self._configs[source])
                with torch.random.fork_rng(devices=[]):
                    self._queues[i][w] = deque(
                        _without_dropped(restorers[source].restore_sample(k)) for k in keys)


def _without_dropped(batch: dict) -> dict:
    batch.pop("dropped", None)  # already counted when it was first received
    return batch


class _Pickler(pickle.Pickler):
    """Tensors go beside the pickle (the checkpoint stores them as tensors), so that loading
    needs no torch reconstruction code from the pickle stream."""

    def __init__(self, buf, tensors: list):
        super().__init__(buf)
        self.tensors = tensors

    def persistent_id(self, obj):
        if isinstance(obj, torch.Tensor):
            self.tensors.append(obj)
            return len(self.tensors) - 1
        return None


class _Unpickler(pickle.Unpickler):
    """Only energon's own state classes and plain containers load: a checkpoint is not a place
    to run arbitrary code from (compat's refuse_pickled_checkpoint_objects does the same for
    the model state)."""

    SAFE_BUILTINS = {"tuple", "list", "dict", "set", "frozenset", "int", "float", "str", "bytes",
                     "bool", "complex", "slice", "range", "object", "getattr"}

    def __init__(self, buf, tensors: list):
        super().__init__(buf)
        self.tensors = tensors

    def persistent_load(self, pid):
        return self.tensors[pid]

    def find_class(self, module: str, name: str):
        if (module.startswith("megatron.energon.") or (module == __name__ and name == "LaneSet")
                or (module == "builtins" and name in self.SAFE_BUILTINS)
                or (module == "collections" and name in ("OrderedDict", "deque"))
                or (module == "copyreg" and name == "_reconstructor")
                # numpy arrays (energon's random states); object arrays unpickle through here too
                or (module.split(".")[0] == "numpy"
                    and (name in ("_reconstruct", "ndarray", "dtype", "scalar") or name.endswith("DType")))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"data loader state: refusing to load {module}.{name}")


def _dumps(state: dict) -> dict:
    buf, tensors = io.BytesIO(), []
    _Pickler(buf, tensors).dump(state)
    return {"pickle": torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8),
            "tensors": tensors}


def _loads(saved: dict):
    return _Unpickler(io.BytesIO(saved["pickle"].numpy().tobytes()), list(saved["tensors"])).load()
