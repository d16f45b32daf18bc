"""One training iteration: the 1F1B schedule across the bridge, then the optimizer."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Dict, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel.schedules import forward_backward_pipelining_without_interleaving

from examples.mimo.training.hetero import compat
from examples.mimo.training.hetero.grad_sync import GradSync
from examples.mimo.training.hetero.runtime import Runtime
from examples.mimo.training.hetero.timers import Timers
from examples.mimo.training.hetero.topology import LANGUAGE


@dataclass(frozen=True)
class StepResult:
    lm_loss: Optional[float]  # per-token mean over the global batch; None off the last LLM stage
    loss_tokens: int
    grad_norm: Optional[float]
    skipped: bool
    learning_rate: float
    moe_losses: Dict[str, float]  # per MoE layer and micro-batch, DP-averaged; logging rank only
    image_tokens: float = 0.0  # image placeholders in the global batch; logging rank only


def loss_func(loss_mask: torch.Tensor, image_tokens: torch.Tensor, per_token_loss: torch.Tensor):
    """Sum over tokens; the divide by the global token count happens on the gradients."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = (per_token_loss.reshape(-1).float() * mask).sum()
    tokens = mask.sum().to(torch.int)
    # image placeholders ride along with the loss's own reduction: they size the encoder's work
    return loss_sum, tokens, {"lm loss": torch.stack([loss_sum.detach(), tokens.detach().float(),
                                                      image_tokens.float()])}


def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module, *, image_token_id: int,
                 timers: Optional[Timers]):
    batch = next(data_iterator)
    with timers.span("forward") if timers else contextlib.nullcontext():
        output, loss_mask = model(**batch)
    ids = batch.get("input_ids")
    image_tokens = (ids == image_token_id).sum() if ids is not None else torch.zeros(())
    return output, partial(loss_func, loss_mask, image_tokens)


def configure_schedule(rt: Runtime, grad_sync: GradSync, timers: Timers) -> None:
    config = rt.model.config
    config.finalize_model_grads_func = timers.wrap("grad-sync", grad_sync.finalize)
    config.no_sync_func = rt.model.no_sync


def run_schedule(rt: Runtime, data_iterator: Iterator[dict], *, timers: Optional[Timers],
                 forward_only: bool = False) -> Optional[torch.Tensor]:
    """One global batch through the 1F1B schedule across the bridge (training or validation):
    this rank's [loss sum, loss tokens, image tokens], or None off the last LLM stage."""
    cfg = rt.cfg
    store = forward_backward_pipelining_without_interleaving(
        forward_step_func=partial(forward_step, timers=timers,
                                  image_token_id=rt.model_provider.data_spec(cfg.model).image_token_id),
        data_iterator=data_iterator,
        model=[rt.model],
        num_microbatches=cfg.batch.num_microbatches,
        seq_length=cfg.batch.seq_length,
        micro_batch_size=cfg.batch.micro_batch_size,
        forward_only=forward_only,
        p2p_communicator=rt.topology.communicator,
        pg_collection=rt.topology.schedule_pgc,
    )
    return torch.stack([d["lm loss"] for d in store]).sum(0) if store else None


def train_step(*, rt: Runtime, optimizer, scheduler, grad_sync: GradSync,
               data_iterator: Iterator[dict], timers: Timers) -> StepResult:
    cfg = rt.cfg
    rt.model.zero_grad_buffer()
    optimizer.zero_grad()
    learning_rate = scheduler.get_lr({})
    with timers.span("schedule"):
        totals = run_schedule(rt, data_iterator, timers=timers)
    stats = grad_sync.normalize(None if totals is None else totals[1])
    if stats.found_nonfinite:
        skipped, grad_norm = True, None
    else:
        with timers.span("optimizer"):
            success, grad_norm, _ = optimizer.step()
        skipped = not success
    # As Megatron's train_step: the LR schedule advances only with an applied update, so a skipped
    # iteration leaves the learning rate where it was (consumed samples still advance, run.py).
    if not skipped:
        scheduler.step(increment=cfg.batch.global_batch_size)
    totals = global_totals(rt, totals)
    return StepResult(lm_loss=None if totals is None else (totals[0] / totals[1].clamp(min=1)).item(),
                      loss_tokens=stats.global_tokens, grad_norm=grad_norm, skipped=skipped,
                      learning_rate=learning_rate, moe_losses=_moe_losses(rt),
                      image_tokens=0.0 if totals is None else totals[2].item())


def global_totals(rt: Runtime, totals: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """[loss sum, loss tokens, image tokens] over the global batch, on the last LLM stage."""
    llm = rt.topology.module_pgc(LANGUAGE)
    if totals is None or llm is None or llm.pp.rank() != llm.pp.size() - 1:
        return None
    dist.all_reduce(totals, group=llm.dp)
    return totals


def _moe_losses(rt: Runtime) -> Dict[str, float]:
    """Per MoE layer and micro-batch, averaged over the LLM's DP ranks (Megatron's definition)."""
    llm = rt.topology.module_pgc(LANGUAGE)
    facts = rt.facts
    if llm is None or not facts.moe_aux_losses:
        return {}
    totals = compat.reduce_moe_metrics(names=facts.moe_aux_losses, num_layers=facts.llm_num_layers,
                                       pp=llm.pp, dp=llm.dp, device=rt.device)
    per = llm.dp.size() * rt.cfg.batch.num_microbatches * facts.llm_moe_layers
    return {name: total.item() / per for name, total in totals.items()}
