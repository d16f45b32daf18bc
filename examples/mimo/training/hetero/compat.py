"""Every workaround of megatron-core 0.19.2 on the hetero path, one function per problem.

Nothing here runs at import. Process-wide patches are applied once at start-up by
``apply_startup`` (runtime.py), before any model is built; the other workarounds are called at
the one place their problem shows (optimizer build, checkpoint load, layer specs, MoE metrics).
``active()`` names those applied or used in this process, and the trainer logs it.

Each docstring names the megatron-core function and the symptom. tests/unit_tests/models/
test_hetero_compat.py has, for each, a canary that fails once megatron-core no longer shows the
symptom (then delete the workaround) and names the test that fails without the workaround.

The CPU/gloo emulation of CUDA is not here: it is device.py's, and only runs on ``--device cpu``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import multiprocessing
import os
import pickle
import signal
import sys
import types
from datetime import timedelta
from typing import Dict, Iterable, List, Optional

import torch
import torch.distributed as dist

from examples.mimo.model_providers import layers

MEGATRON_CORE_VERSION = "0.19.2"  # what these workarounds were written against
_ACTIVE: Dict[str, None] = {}  # insertion-ordered set


def _mark(name: str) -> None:
    _ACTIVE.setdefault(name)


def active() -> List[str]:
    """Those applied here and the model layers' (model_providers/layers.py)."""
    return list(_ACTIVE) + layers.active()


def version_note() -> str:
    """'' on the version these were written for; otherwise a line saying the canaries decide."""
    import megatron.core

    found = megatron.core.__version__
    if found.split("+")[0] == MEGATRON_CORE_VERSION:
        return ""
    return (f"megatron-core {found}: these workarounds were written for {MEGATRON_CORE_VERSION}; "
            f"run tests/unit_tests/models/test_hetero_compat.py to see which are still needed")


def apply_startup(*, backend: str, timeout: timedelta, mamba: bool) -> List[str]:
    """The process-wide workarounds a job needs, applied once; returns what is active."""
    refuse_pickled_checkpoint_objects()
    bridge_groups(backend=backend, timeout=timeout)
    colocated_bridge_groups(backend=backend, timeout=timeout)
    global_memory_buffer()
    if mamba:
        import_mamba_triton_kernels()
    return active()


# ---- process-wide, at start-up ---------------------------------------------------------------

# What torch's dist-checkpoint ``.metadata`` pickle may name: its own metadata dataclasses, enums,
# torch.Size and dtypes (the globals found in our CPU fp32 and CUDA bf16 checkpoints, torch 2.13
# and 2.11).
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType",
                                             "TensorWriteData"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
}


class _NotMetadata(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if name in _METADATA_GLOBALS.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise _NotMetadata(f"it names {module}.{name}, which is not checkpoint metadata")


def read_checkpoint_metadata(path: str):
    """torch's ``.metadata`` file at ``path`` through the allow-list above; CheckpointError (one
    line naming the file and the damage) for anything else."""
    from examples.mimo.training.hetero.errors import CheckpointError

    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    except _NotMetadata as err:
        raise CheckpointError(f"refusing to unpickle {path}: {err}") from None
    except Exception as err:  # truncation, a flipped byte, a file of another kind
        what = "truncated" if isinstance(err, EOFError) else str(err) or type(err).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint metadata file ({what})") from None


def refuse_pickled_checkpoint_objects() -> None:
    """Checkpoint bytes are unpickled with code execution in three places of torch 2.11-2.13 and
    megatron-core 0.19.2: ``FileSystemReader.read_metadata`` (``pickle.load`` of ``.metadata``, read
    by every load and by ``load_common_state_dict``), ``DefaultLoadPlanner.load_bytes`` (every
    ShardedObject and the common state, ``torch.load(weights_only=False)``; MCoreLoadPlanner
    inherits it) and the legacy ``common.pt`` (``torch.load`` without ``weights_only``, which
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD turns off). Everything we store is tensors and plain data:
    ``.metadata`` goes through an allow-list of torch's metadata classes, the rest through
    ``weights_only=True``; anything else is refused. No checksum makes a pickle trusted (a forged
    checksums.json could vouch for one): these readers are the guarantee, checksums only find
    damage.

    Process-wide because ``TorchDistLoadShardedStrategy.load`` builds its reader and planner
    itself; no argument of ``dist_checkpointing.load`` selects others. Idempotent: the launcher's
    start-up check applies it before reading anything, the ranks at start-up."""
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME
    from torch.distributed.checkpoint import filesystem
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.distributed.checkpoint._traverse import set_element

    from examples.mimo.training.hetero.errors import CheckpointError

    def read_metadata(self, *args, **kwargs):
        metadata = read_checkpoint_metadata(os.fspath(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def load_bytes(self, read_item, value):
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as err:
            raise CheckpointError(f"refusing to unpickle checkpoint object "
                                  f"{read_item.dest_index.fqn!r}: it is not plain data ({err})") from err
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj

    def load_common(checkpoint_dir):
        return torch.load(os.path.join(checkpoint_dir, COMMON_STATE_FNAME), map_location="cpu",
                          weights_only=True)

    filesystem.FileSystemReader.read_metadata = read_metadata
    DefaultLoadPlanner.load_bytes = load_bytes
    serialization.load_common = load_common
    _mark("refuse_pickled_checkpoint_objects")


def launcher_shutdown_grace(seconds: int) -> None:
    """Not megatron-core's but torch's (2.11-2.13): once a rank failed, the agent's process
    context stops the others with ``PContext.close()`` at its default 30 s between SIGTERM and
    SIGKILL (``SubprocessContext._poll`` and ``MultiprocessContext._poll`` call it without a
    timeout), whatever ``--shutdown-timeout`` says. A SIGSTOPped or hung rank never acts on the
    SIGTERM, so a job whose peer stopped ended 30 s after the collective timeout. Caps every
    close of the launcher's process (the agent) at ``seconds``."""
    from torch.distributed.elastic.multiprocessing.api import PContext

    real = getattr(PContext.close, "__wrapped__", PContext.close)

    @functools.wraps(real)
    def close(self, death_sig=None, timeout: int = seconds) -> None:
        real(self, death_sig, min(timeout, seconds))

    PContext.close = close
    _mark("launcher_shutdown_grace")


def bridge_groups(*, backend: str, timeout: timedelta) -> None:
    """``BridgeCommunicator._get_or_create_bridge_pg`` and ``_get_or_create_broadcast_pg``
    (pipeline_parallel/bridge_communicator.py) create their groups with ``backend='nccl'`` and no
    timeout: the bridge cannot run on gloo, and a stopped peer leaves the other side in the
    bridge's shape exchange for torch's default 30 minutes instead of --distributed-timeout-minutes.

    Process-wide because ``MultiModulePipelineCommunicator`` creates the bridges in its
    constructor; nothing passes a backend or timeout through to them."""
    from megatron.core.pipeline_parallel.bridge_communicator import BridgeCommunicator

    def broadcast_pg(cls, ranks_list):
        key = str(sorted(tuple(r) for r in ranks_list))
        if key not in cls._broadcast_pg_cache:
            cls._broadcast_pg_cache[key], _ = dist.new_subgroups_by_enumeration(
                ranks_list, backend=backend, timeout=timeout)
        return cls._broadcast_pg_cache[key]

    def bridge_pg(cls, ranks):
        key = str(sorted(ranks))
        if key not in cls._bridge_pg_cache:
            cls._bridge_pg_cache[key] = dist.new_group(sorted(ranks), backend=backend,
                                                       timeout=timeout)
        return cls._bridge_pg_cache[key]

    BridgeCommunicator._get_or_create_broadcast_pg = classmethod(broadcast_pg)
    BridgeCommunicator._get_or_create_bridge_pg = classmethod(bridge_pg)
    _mark("bridge_groups")


def colocated_bridge_groups(*, backend: str, timeout: timedelta) -> None:
    """``ColocatedBridgeCommunicator.__init__`` (models/mimo/comm/colocated_communicator.py)
    creates the gather group of a colocated layout whose encoder and LLM DP sizes differ with
    ``backend='nccl'`` and no timeout: such a layout cannot run on gloo, and a stopped peer waits
    torch's default 30 minutes. That module's ``dist`` becomes torch.distributed with this one call
    given our backend and timeout.

    Process-wide because ``MimoModel.__init__`` builds the communicator; nothing passes a backend
    or timeout through to it."""
    from megatron.core.models.mimo.comm import colocated_communicator

    class _Dist(types.ModuleType):
        def __getattr__(self, name):
            return getattr(dist, name)

        @staticmethod
        def new_subgroups_by_enumeration(ranks, **kwargs):
            return dist.new_subgroups_by_enumeration(ranks, **(kwargs | {"backend": backend,
                                                                         "timeout": timeout}))

    colocated_communicator.dist = _Dist("torch.distributed")
    _mark("colocated_bridge_groups")


def global_memory_buffer() -> None:
    """``parallel_state.get_global_memory_buffer`` asserts unless ``initialize_model_parallel``
    ran; the local (non-TE) ``DotProductAttention`` takes its scratch buffers from it. We never
    initialise parallel_state (two grids, not one), so create just that buffer."""
    from megatron.core import parallel_state

    if parallel_state._GLOBAL_MEMORY_BUFFER is None:
        parallel_state._set_global_memory_buffer()
    _mark("global_memory_buffer")


def import_mamba_triton_kernels() -> None:
    """``mamba_ssm/__init__.py`` imports ``selective_scan_cuda`` (a compiled extension) first, so
    a pure-Python mamba-ssm build fails on import and ``megatron.core.ssm.mamba_mixer`` sets
    ``HAVE_MAMBA_SSM = False`` although the Triton kernels it uses are there. Registering the
    package without running its ``__init__`` leaves the Triton submodules importable.

    Must run before ``megatron.core.ssm`` is first imported; only models with Mamba layers ask
    for it (``ModelFacts.uses_mamba``)."""
    if "mamba_ssm" not in sys.modules:
        spec = importlib.util.find_spec("mamba_ssm")
        if spec is None or spec.submodule_search_locations is None:
            return
        package = types.ModuleType("mamba_ssm")
        package.__spec__ = spec
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["mamba_ssm"] = package
    _mark("import_mamba_triton_kernels")


# ---- scoped, called where the problem shows --------------------------------------------------

@contextlib.contextmanager
def param_groups_within(group: dist.ProcessGroup):
    """``megatron.core.optimizer._get_param_groups`` aligns param-group keys with an
    ``all_gather_object`` over the WORLD. On disjoint grids that mixes the two branches' keys, and
    it hangs when a frozen branch builds no optimizer (its ranks never join). Inside this context
    that gather (the function's only use of the world) spans the branch's own ranks."""
    import megatron.core.optimizer as megatron_optimizer

    real_torch = megatron_optimizer.torch
    scoped_dist = types.SimpleNamespace(
        get_world_size=lambda group_=None: dist.get_world_size(group_ or group),
        all_gather_object=lambda out, obj, group_=None: dist.all_gather_object(out, obj,
                                                                                group_ or group))

    class _ScopedTorch(types.ModuleType):
        distributed = scoped_dist

        def __getattr__(self, name):
            return getattr(real_torch, name)

    megatron_optimizer.torch = _ScopedTorch("torch")
    _mark("param_groups_within")
    try:
        yield
    finally:
        megatron_optimizer.torch = real_torch


def _inner_adams(optimizer) -> Iterable:
    """The chained optimizers whose inner optimizer is torch's Adam: with transformer-engine or
    apex installed megatron-core builds their FusedAdam, which keeps no per-parameter step (its
    state_dict fails on one: KeyError 'step')."""
    for top in optimizer._active_optimizers:
        for opt in getattr(top, "chained_optimizers", [top]):
            if isinstance(opt.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
                yield opt


@contextlib.contextmanager
def torch_adam_checkpoint_load(optimizer):
    """Around building the load template and ``optimizer.load_state_dict``.

    Without transformer-engine or apex, megatron-core 0.19.2 falls back to torch's Adam, whose
    per-parameter state only exists after a first step:
    - ``DistributedOptimizer.sharded_state_dict(is_loading=True)`` asserts on the missing state
      while building the template, so every parameter first gets a zero state at step 0 (the
      checkpoint overwrites it);
    - ``DistributedOptimizer.load_state_dict`` writes one shared ``step`` tensor into every
      parameter's state (torch Adam would then advance it once per parameter each step) and
      copies the template's step over it, so on the way out each parameter gets its own step from
      the loaded param groups."""
    _prime_torch_adam_state(optimizer)
    _mark("torch_adam_checkpoint_load")
    yield
    _restore_torch_adam_steps(optimizer)


def _prime_torch_adam_state(optimizer) -> None:
    for opt in _inner_adams(optimizer):
        inner = opt.optimizer
        opt.init_state_fn(inner, opt.config)
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p].setdefault("step", torch.tensor(0.0))


def _restore_torch_adam_steps(optimizer) -> None:
    from examples.mimo.training.hetero.errors import CheckpointError

    for opt in _inner_adams(optimizer):
        inner = opt.optimizer
        for group in inner.param_groups:
            if "step" not in group:
                raise CheckpointError("optimizer param groups in the checkpoint carry no step")
            for p in group["params"]:
                inner.state[p]["step"] = torch.tensor(float(group["step"]))


@contextlib.contextmanager
def checkpoint_writer_errors():
    """Yields a list that collects the checkpoint writer's own error messages.

    ``FileSystemWriterAsync.write_preloaded_data_multiproc``
    (dist_checkpointing/strategies/filesystem_async.py) logs a writer's exception and then
    raises with only its class (``assert isinstance(..., list), type(...)``): a full disk reaches
    the caller as "<class 'OSError'>". The logged message (errno text and file) is the cause."""
    import logging

    messages: List[str] = []

    class _Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logger = logging.getLogger("megatron.core.dist_checkpointing")
    handler = _Keep(level=logging.ERROR)
    logger.addHandler(handler)
    _mark("checkpoint_writer_errors")
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def _writer_server_init(signal_name: Optional[str]) -> None:
    """Runs first in the spawned Manager server (a module-level function: spawn pickles it)."""
    from examples.mimo.training.hetero.exits import die_with_parent

    die_with_parent()
    if signal_name is not None:
        signal.signal(getattr(signal, signal_name), signal.SIG_IGN)


def checkpoint_writer_server(signal_name: Optional[str]) -> None:
    """``get_write_results_queue`` (dist_checkpointing/strategies/filesystem_async.py) spawns a
    multiprocessing Manager server at the first save and keeps it for the process. Two symptoms:
    the server outlives a rank that is killed (with its resource tracker: two processes per rank
    left under PID 1 after every killed job); and SLURM sends a signal to every process of a job
    step (``scancel --signal``, requeue, preemption), so the exit signal that asks the ranks to
    save also kills the server, and the save then fails with "broken pipe". Here the server is
    started before training with an initializer that makes it die with its rank and ignore
    ``signal_name`` (None: no exit signal)."""
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(_writer_server_init, (signal_name,))
    filesystem_async._results_queue = manager.Queue()
    _mark("checkpoint_writer_server")


def match_saved_param_groups(optimizer_state, *, lr: float, min_lr: float) -> None:
    """``DistributedOptimizer.load_state_dict`` (optimizer/distrib_optimizer.py) pairs saved and
    current param groups by ``param_group_identifier_keys``, which include ``max_lr`` and
    ``min_lr``, i.e. the --lr/--min-lr the optimizer was built with: resuming with a new --lr
    fails with a KeyError on the group tuple. Our param groups carry no per-group overrides, so
    every saved group takes this run's values before the load (the loaded scheduler then sets
    the schedule, ckpt_policy.resume_problems decides which one)."""
    if isinstance(optimizer_state, dict):
        for key, value in optimizer_state.items():
            if key == "param_groups" and isinstance(value, list):
                for group in value:
                    if "max_lr" in group:
                        group.update(max_lr=lr, min_lr=min_lr)
            else:
                match_saved_param_groups(value, lr=lr, min_lr=min_lr)
    _mark("match_saved_param_groups")


def num_microbatches_for_cuda_graphs(*, rank: int, global_batch_size: int, micro_batch_size: int,
                                     data_parallel_size: int) -> None:
    """``TECudaGraphHelper._get_cuda_graph_input_data`` (transformer/cuda_graphs.py) sizes TE's
    warm-up from megatron-core's global ``get_num_microbatches()``, also with one pipeline stage,
    and fails on ``None.get()`` unless megatron.training's initialize set the global calculator.
    Our batch sizes live in BatchConfig, so set the calculator from them, once per process."""
    from megatron.core import num_microbatches_calculator as calc

    if calc._GLOBAL_NUM_MICROBATCHES_CALCULATOR is None:
        calc.init_num_microbatches_calculator(rank, None, global_batch_size, micro_batch_size,
                                              data_parallel_size)
    _mark("num_microbatches_for_cuda_graphs")


def reduce_moe_metrics(*, names: Iterable[str], num_layers: int, pp, dp,
                       device: torch.device) -> Dict[str, torch.Tensor]:
    """Sum what megatron-core's MoE routers recorded this step over the LLM's pipeline stages,
    each metric's own reduce group and its DP ranks; the caller divides. Clears the tracker.

    Instead of ``MoEMetricsTracker.report`` (transformer/moe/moe_logging.py), whose
    ``_sync_metrics`` falls back to ``parallel_state`` groups (asserting, as we never initialise
    it) unless the collection carries ``dp_cp_gtp_remat``, and averages with ``ReduceOp.AVG``,
    which gloo does not implement. Every LLM rank takes part, also pipeline stages without MoE
    layers (zeros of the same size), so the reductions line up."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    tracker = get_moe_metrics_tracker()
    totals = {}
    for name in names:
        tracker.ensure_initialized(name, num_layers, device=device)
        entry = tracker.metrics[name]
        values = entry.values
        dist.all_reduce(values, group=pp)
        if entry.reduce_group is not None:
            dist.all_reduce(values, group=entry.reduce_group)
        dist.all_reduce(values, group=dp)
        totals[name] = values.sum()
    tracker.clear()
    _mark("reduce_moe_metrics")
    return totals
