"""Process start-up, the model built by its provider, and one megatron-core DDP per branch."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Dict, Optional

import torch
import torch.distributed as dist

from examples.mimo.data import DATA_PROVIDERS
from examples.mimo.interfaces import DataProvider, ModelFacts, ModelProvider
from examples.mimo.model_providers import MODEL_PROVIDERS
from examples.mimo.training.hetero import compat, graphs, kernels
from examples.mimo.training.hetero.config import TrainConfig
from examples.mimo.training.hetero.device import init_distributed, resolve_device, seed_all
from examples.mimo.training.hetero.timers import StartupClock
from examples.mimo.training.hetero.topology import LANGUAGE, Topology


@dataclass
class Runtime:
    cfg: TrainConfig
    topology: Topology
    model: torch.nn.Module  # MimoModel whose branches on this rank are DDP-wrapped
    branches: Dict[str, torch.nn.Module]  # this rank's DDP branches, by module name
    device: torch.device
    dtype: torch.dtype
    model_provider: ModelProvider
    data_provider: DataProvider
    facts: ModelFacts

    @property
    def is_logging_rank(self) -> bool:
        """LLM, last pipeline stage, DP and TP rank 0: where Megatron prints its log line."""
        pgc = self.topology.module_pgc(LANGUAGE)
        return (pgc is not None and pgc.pp.rank() == pgc.pp.size() - 1 and pgc.dp.rank() == 0
                and pgc.tp.rank() == 0)

    def close(self) -> None:
        from megatron.core import parallel_state

        self.model.destroy()
        self.topology.destroy()
        parallel_state.destroy_global_memory_buffer()
        dist.destroy_process_group()


def branch(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return model.language_model if name == LANGUAGE else model.modality_submodules[name]


def build_runtime(cfg: TrainConfig, *, startup: Optional[StartupClock] = None) -> Runtime:
    startup = startup or StartupClock()
    provider = MODEL_PROVIDERS[cfg.model_provider]
    facts = provider.facts(cfg.model)
    kind = resolve_device(cfg.runtime.device)
    if cfg.runtime.bf16 and kind != "cuda":
        raise ValueError(f"--bf16 needs CUDA, but --device {cfg.runtime.device} resolved to {kind}")
    dtype = torch.bfloat16 if cfg.runtime.bf16 else torch.float32
    kernels.check_device(cfg.kernels, torch.cuda.get_device_capability() if kind == "cuda" else None)
    graphs.check_environment(cfg.kernels, os.environ)
    timeout = timedelta(minutes=cfg.runtime.distributed_timeout_minutes)
    device = init_distributed(kind, cfg.runtime.distributed_timeout_minutes)
    graphs.use_side_stream(cfg.kernels)
    compat.apply_startup(backend=dist.get_backend(), timeout=timeout, mamba=facts.uses_mamba)
    topology = Topology(cfg.grid, timeout=timeout, pipeline_dtype=dtype)
    startup.lap("process groups")
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    own = topology.module_pgc(topology.module_name)
    seed_all(cfg.runtime.seed, device=kind, tp_rank=own.tp.rank(), ep_rank=own.ep.rank(),
             etp_rank=own.expt_tp.rank(), graph_safe=cfg.kernels.cuda_graph_impl != "none")
    # megatron-core's GPU initialisation draws from the CUDA RNG tracker: a CPU run draws on the CPU.
    kernel_choices = cfg.kernels if kind == "cuda" else \
        replace(cfg.kernels, use_cpu_initialization=True)
    model = provider.build(cfg.model, topology=topology, dtype=dtype, seq_length=cfg.batch.seq_length,
                           device=device, kernels=kernel_choices)
    # Some local-spec modules (torch LayerNorm) ignore params_dtype; cast whole branches, as
    # Megatron's Float16Module does.
    model.to(device=device, dtype=dtype)
    startup.lap("model")

    branches = {}
    for name in topology.grid_map:
        pgc = topology.module_pgc(name)
        if pgc is None:
            continue
        module = branch(model, name)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=True,
            # Text-only steps leave encoder buckets without grads, so only the LLM overlaps.
            overlap_grad_reduce=cfg.ddp.overlap_grad_reduce and name == LANGUAGE,
            bucket_size=cfg.ddp.bucket_size,
        )
        wrapped = DistributedDataParallel(config=provider.module_config(module), ddp_config=ddp_config,
                                          module=module, pg_collection=pgc)
        if name == LANGUAGE:
            model.language_model = wrapped
        else:
            model.modality_submodules[name] = wrapped
        branches[name] = wrapped
    startup.lap("DDP")
    return Runtime(cfg=cfg, topology=topology, model=model, branches=branches, device=device,
                   dtype=dtype, model_provider=provider,
                   data_provider=DATA_PROVIDERS[cfg.data_provider], facts=facts)
