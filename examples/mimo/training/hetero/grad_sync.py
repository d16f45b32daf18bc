"""Gradient finalization across two disjoint grids, installed as the schedule's
``finalize_model_grads_func``.

Both branches use per-token loss: DDP sums gradients over its DP group (no averaging), and then
every branch divides by the global number of loss tokens, which only the LLM's last stage knows
and which one world all-reduce hands to the encoder ranks. An encoder DP rank that saw no image
in a step contributes zero to that sum, which is exactly its share of the gradient of the summed
loss, so no participation rescaling is needed: the parity tests with text-only samples check this
against a single-process reference.

The same all-reduce carries a "non-finite gradient anywhere" flag, so every rank takes the same
skip decision before the optimizer runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.distributed as dist
from megatron.core.distributed.finalize_model_grads import finalize_model_grads

from examples.mimo.training.hetero.topology import LANGUAGE, Topology


@dataclass(frozen=True)
class GradStats:
    global_tokens: int  # loss tokens of the whole global batch
    found_nonfinite: bool  # on any rank: every rank skips the optimizer step together


def any_nonfinite(tensors) -> torch.Tensor:
    """A 0-dim bool on the tensors' device, without a host sync: does any element hold NaN or
    +-inf. min and max propagate NaN and reach +-inf, so one aminmax per tensor decides it with
    no full-size temporary; torch.isfinite(x).all() materialises |x| (4 bytes per parameter:
    24.3 GiB asked for on the 54-layer shape with 16 experts, an out-of-memory on the H200)."""
    ends = [torch.stack(torch.aminmax(t.view(-1))).float() for t in tensors if t.numel()]
    if not ends:
        return torch.zeros((), dtype=torch.bool)
    return ~torch.isfinite(torch.cat(ends)).all()


class GradSync:
    def __init__(self, *, branches: Dict[str, torch.nn.Module], topology: Topology,
                 device: torch.device):
        self.branches = branches
        self.topology = topology
        self.device = device
        llm = topology.module_pgc(LANGUAGE)
        # One rank per lane reports its tokens: last LLM stage, TP rank 0.
        self._reports_tokens = (llm is not None and llm.pp.rank() == llm.pp.size() - 1
                                and llm.tp.rank() == 0)

    def finalize(self, model_chunks, num_tokens=None, pg_collection=None, force_all_reduce=False):
        """The schedule's ``finalize_model_grads_func``: each branch's DP reduction on its own
        groups (the schedule's token count is not used: ``normalize`` divides globally)."""
        for name, ddp in self.branches.items():
            finalize_model_grads([ddp], num_tokens=None, pg_collection=self.topology.module_pgc(name),
                                 force_all_reduce=force_all_reduce)

    def normalize(self, local_tokens: Optional[torch.Tensor]) -> GradStats:
        """After the schedule: one world all-reduce of (tokens, non-finite flag), then every
        branch's gradients are divided by the global token count. ``local_tokens`` is what this
        rank's loss function counted (None off the last LLM stage)."""
        stats = torch.zeros(2, dtype=torch.float64, device=self.device)
        stats[1] = any_nonfinite(buf.grad_data for ddp in self.branches.values()
                                 for buf in ddp.buffers + ddp.expert_parallel_buffers)
        if self._reports_tokens and local_tokens is not None:
            stats[0] = local_tokens
        dist.all_reduce(stats)  # one host sync per step, for the skip decision and the divisor
        result = GradStats(global_tokens=int(stats[0].item()), found_nonfinite=bool(stats[1].item() > 0))
        scale = 1.0 / max(result.global_tokens, 1)
        for ddp in self.branches.values():
            ddp.scale_gradients(scale)
        return result
