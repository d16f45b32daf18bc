"""One training iteration: the 1F1B schedule across the bridge, then the optimizer."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Dict, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel.schedules import forward_backward_pipelining_without_interleaving

from examples.mimo.model_providers import MODEL_PROVIDERS
from examples.mimo.training.hetero.grad_sync import GradSync
from examples.mimo.training.hetero.runtime import Runtime
from examples.mimo.training.hetero.topology import LANGUAGE


@dataclass(frozen=True)
class StepResult:
    lm_loss: Optional[float]  # per-token mean over the global batch; None off the last LLM stage
    loss_tokens: int
    grad_norm: Optional[float]
    skipped: bool
    learning_rate: float
    moe_losses: Dict[str, float]  # per MoE layer and micro-batch, DP-averaged; logging rank only


def loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Sum over tokens; the divide by the global token count happens on the gradients."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = (per_token_loss.reshape(-1).float() * mask).sum()
    tokens = mask.sum().to(torch.int)
    return loss_sum, tokens, {"lm loss": torch.stack([loss_sum.detach(), tokens.detach().float()])}


def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
    output, loss_mask = model(**next(data_iterator))
    return output, partial(loss_func, loss_mask)


def configure_schedule(rt: Runtime, grad_sync: GradSync) -> None:
    config = rt.model.config
    config.finalize_model_grads_func = grad_sync
    config.no_sync_func = rt.model.no_sync


def train_step(*, rt: Runtime, optimizer, scheduler, grad_sync: GradSync,
               data_iterator: Iterator[dict]) -> StepResult:
    cfg = rt.cfg
    rt.model.zero_grad_buffer()
    optimizer.zero_grad()
    learning_rate = scheduler.get_lr({})
    store = forward_backward_pipelining_without_interleaving(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=[rt.model],
        num_microbatches=cfg.batch.num_microbatches,
        seq_length=cfg.batch.seq_length,
        micro_batch_size=cfg.batch.micro_batch_size,
        p2p_communicator=rt.topology.communicator,
        pg_collection=rt.topology.schedule_pgc,
    )
    if grad_sync.found_nonfinite:
        skipped, grad_norm = True, None
    else:
        success, grad_norm, _ = optimizer.step()
        skipped = not success
    scheduler.step(increment=cfg.batch.global_batch_size)
    return StepResult(lm_loss=_global_loss(rt, store), loss_tokens=grad_sync.global_tokens,
                      grad_norm=grad_norm, skipped=skipped, learning_rate=learning_rate,
                      moe_losses=_moe_losses(rt))


def _global_loss(rt: Runtime, store: list) -> Optional[float]:
    llm = rt.topology.module_pgc(LANGUAGE)
    if llm is None or llm.pp.rank() != llm.pp.size() - 1:
        return None
    totals = torch.stack([d["lm loss"] for d in store]).sum(0)
    dist.all_reduce(totals, group=llm.dp)
    return (totals[0] / totals[1].clamp(min=1)).item()


def _moe_losses(rt: Runtime) -> Dict[str, float]:
    """Reduce what megatron-core's MoE routers recorded this step, then reset the tracker.

    Every LLM rank takes part, also pipeline stages without MoE layers (zeros of the same size),
    so the reductions line up; the tracker is megatron-core's process-wide one.
    """
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    tracker = get_moe_metrics_tracker()
    llm = rt.topology.module_pgc(LANGUAGE)
    facts = MODEL_PROVIDERS[rt.cfg.model_provider].facts(rt.cfg.model)
    losses = {}
    if llm is not None:
        for name in facts.moe_aux_losses:
            tracker.ensure_initialized(name, facts.llm_num_layers, device=rt.device)
            entry = tracker.metrics[name]
            values = entry.values
            dist.all_reduce(values, group=llm.pp)
            if entry.reduce_group is not None:
                dist.all_reduce(values, group=entry.reduce_group)
            dist.all_reduce(values, group=llm.dp)
            losses[name] = values.sum().item() / (
                llm.dp.size() * rt.cfg.batch.num_microbatches * facts.llm_moe_layers)
    tracker.clear()
    return losses
