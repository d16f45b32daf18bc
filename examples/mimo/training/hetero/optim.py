"""MimoOptimizer (one distributed Adam per trainable branch) and the learning-rate schedule."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.models.mimo.optimizer import MimoOptimizer, ModuleOptimizerInfo
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from examples.mimo.training.hetero import compat
from examples.mimo.training.hetero.config import TrainConfig
from examples.mimo.training.hetero.runtime import Runtime, branch


def build_optimizer(rt: Runtime) -> MimoOptimizer:
    """Like megatron-core's get_mimo_optimizer, but a branch frozen on all of its ranks gets no
    optimizer (0.19.2 would build an empty DistributedOptimizer for it), and the param-group
    alignment stays within each branch (compat.param_groups_within)."""
    cfg = rt.cfg
    config = OptimizerConfig(
        optimizer="adam", lr=cfg.schedule.lr, min_lr=cfg.schedule.min_lr,
        weight_decay=cfg.schedule.weight_decay, adam_beta1=cfg.optim.adam_beta1,
        adam_beta2=cfg.optim.adam_beta2, adam_eps=cfg.optim.adam_eps, clip_grad=cfg.optim.clip_grad,
        bf16=cfg.runtime.bf16, params_dtype=rt.dtype, use_distributed_optimizer=True,
    )
    names = list(rt.topology.grid_map)
    trainable = torch.zeros(len(names), device=rt.device)
    for i, name in enumerate(names):
        if name in rt.branches:
            trainable[i] = sum(p.numel() for p in rt.branches[name].parameters() if p.requires_grad)
    # One world-wide answer, so every rank of a branch agrees on whether it has an optimizer.
    dist.all_reduce(trainable, op=dist.ReduceOp.MAX)

    infos = {}
    for i, name in enumerate(names):
        grid = rt.topology.grid_map[name]
        active = name in rt.branches
        optimizer = None
        if active and trainable[i] > 0:
            pgc = rt.topology.module_pgc(name)
            with compat.param_groups_within(pgc.intra_dist_opt):
                optimizer = get_megatron_optimizer(
                    config=config, model_chunks=[branch(rt.model, name)], pg_collection=pgc,
                    use_gloo_process_groups=False)
        infos[name] = ModuleOptimizerInfo(optimizer=optimizer, grid=grid,
                                          pg_collection=rt.topology.module_pgc(name), is_active=active)
    return MimoOptimizer(infos, config)


def build_scheduler(optimizer, cfg: TrainConfig) -> OptimizerParamScheduler:
    """Counts samples: warmup, decay and WSD lengths are in samples, one step = one global batch."""
    s = cfg.schedule
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=s.lr,
        min_lr=s.min_lr,
        lr_warmup_steps=s.warmup_samples,
        lr_decay_steps=s.decay_samples,
        lr_decay_style=s.decay_style,
        start_wd=s.weight_decay,
        end_wd=s.weight_decay,
        # Weight decay is constant, so this length has no effect; tied to the decay length (not
        # --train-iters, as Megatron does) so that extending a run changes no scheduler field.
        wd_incr_steps=s.decay_samples,
        wd_incr_style="constant",
        wsd_decay_steps=s.wsd_decay_samples,
        lr_wsd_decay_style=s.wsd_decay_style,
        # Megatron-LM's resume semantics (ckpt_policy.resume_problems refuses a silent change).
        override_opt_param_scheduler=cfg.ckpt.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=cfg.ckpt.use_checkpoint_opt_param_scheduler,
    )
