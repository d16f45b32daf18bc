"""Device and backend selection, and the CPU/gloo emulation of megatron-core 0.19.2.

megatron-core assumes CUDA in a few places on the hetero path. On ``--device cpu`` the patches
below redirect exactly those places so the real grids, bridge, 1F1B schedule, DDP and optimizer run
on gloo. They are applied only in CPU mode, only once, and live in this module alone. Where a
narrower substitution works (a module's own ``torch``) it is used; each process-wide patch says
why none does. Workarounds of megatron-core that CUDA runs need too are in compat.py.
"""

from __future__ import annotations

import contextlib
import os
import types
from datetime import timedelta
from typing import Dict, Mapping, Optional

import torch
import torch.distributed as dist

_CPU_PATCHED = False


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but no CUDA device is available")
    return requested


# The compile caches a job's first iteration fills: Triton's kernels (mamba-ssm's, and those
# torch.compile generates) and torch inductor's. Their defaults (~/.triton, /tmp) do not follow a
# job that is requeued onto another node.
KERNEL_CACHES = {"TRITON_CACHE_DIR": "triton", "TORCHINDUCTOR_CACHE_DIR": "inductor"}


def kernel_cache_env(cache_dir: Optional[str], save: Optional[str],
                     environ: Mapping[str, str]) -> Dict[str, str]:
    """The cache variables to set: under --kernel-cache-dir, else under <--save>/kernel-cache
    (a requeued or resumed job then finds its compiled kernels), never over a caller's own."""
    root = cache_dir or (os.path.join(save, "kernel-cache") if save else None)
    if root is None:
        return {}
    return {var: os.path.join(os.path.abspath(root), sub) for var, sub in KERNEL_CACHES.items()
            if var not in environ}


def init_distributed(device: str, timeout_minutes: float) -> torch.device:
    """Start the default group (torchrun env), unless a caller already did, and return this
    rank's device."""
    timeout = timedelta(minutes=timeout_minutes)
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl", timeout=timeout, device_id=dev)
    else:
        enable_cpu_emulation()
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timeout)
        dev = torch.device("cpu")
    return dev


def seed_all(seed: int, *, device: str, tp_rank: int, ep_rank: int, etp_rank: int,
             graph_safe: bool = False) -> None:
    """``graph_safe``: transformer-engine's RNG tracker on graph-safe generators, which a CUDA
    graph capture can fork (graphs.py; megatron.training switches the same way)."""
    torch.manual_seed(seed)
    if device == "cuda":
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        # Without parallel_state the tracker must be told this rank's TP/EP coordinates; its kind
        # is chosen anew (a process that builds twice, as the GPU tests do, may switch kinds).
        model_parallel_cuda_manual_seed(seed, te_rng_tracker=graph_safe,
                                        use_cudagraphable_rng=graph_safe, tp_rank=tp_rank,
                                        ep_rank=ep_rank, etp_rank=etp_rank, force_reset_rng=True)


def enable_cpu_emulation() -> None:
    global _CPU_PATCHED
    if _CPU_PATCHED:
        return
    _CPU_PATCHED = True

    # Process-wide: dozens of megatron-core modules (layers, buffers, optimizers, schedules)
    # allocate with device=torch.cuda.current_device(); "cpu" is a valid device argument.
    torch.cuda.current_device = lambda: "cpu"
    # Process-wide: DDP's grad sync and the schedule order collectives against the current CUDA
    # stream from several modules; CPU work is already in program order, so a stream that never
    # waits is exact.
    torch.cuda.current_stream = lambda device=None: _NullStream()
    # Process-wide: the MoE alltoall dispatcher copies routing counts to the host on a side
    # stream, through torch.cuda attributes that a module-local torch would not cover.
    torch.cuda.Stream = lambda *args, **kwargs: _NullStream()
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    # Process-wide: dist_checkpointing's writer (a torch module, not megatron's) syncs before
    # copying tensors to the host.
    torch.cuda.synchronize = lambda device=None: None

    # Literal device="cuda" in the schedule (token counter), the optimizers (found-inf and overflow
    # flags, grad-norm and clipping scratch, the pure-torch multi-tensor L2 norm), MimoOptimizer (world-wide flags), the causal-mask
    # helpers and DDP's buffer warm-up: give those modules a torch whose factory functions map
    # "cuda" to the CPU. Everything else in them is the real torch.
    import megatron.core.distributed.param_and_grad_buffer as buffers
    import megatron.core.models.mimo.optimizer as mimo_optimizer
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.distrib_optimizer as distrib_optimizer
    import megatron.core.optimizer.optimizer as optimizer
    import megatron.core.pipeline_parallel.schedules as schedules
    import megatron.core.transformer.utils as transformer_utils
    import megatron.core.utils as core_utils

    for module in (schedules, mimo_optimizer, optimizer, distrib_optimizer, clip_grads,
                   transformer_utils, buffers, core_utils):
        module.torch = _CpuTorch()

    # Process-wide (a tensor method): the optimizers accept parameters and grads only if .type()
    # names a torch.cuda tensor type; CPU tensors answer with the matching CUDA name when asked.
    tensor_type = torch.Tensor.type

    def cuda_type_name(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return tensor_type(self).replace("torch.", "torch.cuda.", 1)
        return tensor_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = cuda_type_name
    # Process-wide (a tensor method): the distributed optimizer moves its checkpoint gather
    # buffers with .cuda(); stay on the CPU.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self

    # Process-wide (megatron's global tracker): it forks CUDA generator state around dropout and
    # TP init; on CPU there is no such state, and our CPU runs use no dropout, so a fork is a
    # plain context.
    from megatron.core.tensor_parallel import random as mp_random

    class _CpuRngTracker(mp_random.CudaRNGStatesTracker):
        def add(self, name, seed):
            self.states_[name] = seed

        @contextlib.contextmanager
        def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            yield

    mp_random._CUDA_RNG_STATE_TRACKER = _CpuRngTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    # The alltoall MoE dispatcher's host copy of its split sizes: maybe_move_tensor_to_cpu turns
    # only CUDA tensors into numpy, and gloo's all_to_all_single refuses the CPU tensors it leaves
    # (a TypeError once --llm-ep > 1). The dispatcher's module alone names it.
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    move = token_dispatcher.maybe_move_tensor_to_cpu

    def split_sizes_on_host(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = split_sizes_on_host


class _NullStream:
    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event=None) -> "_NullEvent":
        return _NullEvent()


class _NullEvent:
    def synchronize(self) -> None:
        pass


def _cpu_device_kwargs(kwargs: dict) -> dict:
    device = kwargs.get("device")
    if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
        kwargs["device"] = "cpu"
    return kwargs


class _CpuTorch(types.ModuleType):
    """The torch module, except that tensor factories place device="cuda" tensors on the CPU."""

    _FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "arange")

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in self._FACTORIES:
            return lambda *a, **kw: attr(*a, **_cpu_device_kwargs(kw))
        return attr
