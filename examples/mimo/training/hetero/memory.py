"""Each branch's peak memory per GPU, estimated from the flags before anything is built, and the
check of it against the GPU's memory (start-up, --dry-run) that the layout planner shares.

Per GPU of a branch: the weights (16- or 32-bit), the gradient buffer (fp32: the DDP reduces in
fp32), the distributed optimizer's shard (fp32 main parameters and two Adam moments over DP;
the routed experts over the expert-data-parallel group), and the activations backward keeps:
the provider's bytes per token (``ModelFacts``) for the micro-batches a stage holds in 1F1B,
split by TP, reduced by full recompute, plus the logits of one micro-batch on the last stage.
What is not estimated (the CUDA context, library workspaces, allocator fragmentation) is left
to ``HEADROOM``. Measured against the GPU's peaks in docs/results.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import List, Optional

GIB = 2 ** 30
# of the device's memory, the part an estimate may fill: the CUDA context (~0.5 GiB), cuBLAS and
# TE workspaces and the caching allocator's fragmentation take the rest
HEADROOM = 0.9


@dataclass(frozen=True)
class BranchMemory:
    branch: str
    weights: float  # bytes
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations

    def describe(self) -> str:
        g = lambda x: f"{x / GIB:.1f}"  # noqa: E731
        return (f"{self.branch} {g(self.total)} GiB (weights {g(self.weights)}, gradients "
                f"{g(self.grads)}, optimizer {g(self.optimizer)}, activations {g(self.activations)})")


def _trainable(part: Optional[int], whole: int) -> float:
    return 1.0 if part is None or whole == 0 else part / whole


def _kept_layers(layers: float, kernels) -> float:
    """Of a stage's ``layers``, how many keep all their activations (the rest only their input,
    and one recomputed unit at a time). Selective recompute is counted as none: an upper bound."""
    if kernels.recompute_granularity != "full":
        return layers
    n = kernels.recompute_num_layers or 1
    if kernels.recompute_method == "block":  # the first n layers recomputed, one at a time
        return min(max(layers - n, 0) + 1, layers)
    return min(n, layers)  # uniform: one unit of n layers recomputed at a time


def language(cfg, facts) -> BranchMemory:
    g, b, k = cfg.grid, 2 if cfg.runtime.bf16 else 4, cfg.kernels
    expert = facts.llm_expert_params / (g.llm_ep * g.llm_expt_tp * g.llm_pp)
    dense = (facts.llm_params - facts.llm_expert_params) / (g.llm_tp * g.llm_pp)
    expert_dp = max(g.llm_tp * g.llm_dp // (g.llm_ep * g.llm_expt_tp), 1)
    trains = _trainable(facts.llm_trainable_params, facts.llm_params)
    # bf16: fp32 main parameters + two moments; fp32: the parameters are their own main copy
    per_param = 12 if b == 2 else 8
    optimizer = trains * per_param * (dense / g.llm_dp + expert / expert_dp)

    tokens = cfg.batch.micro_batch_size * cfg.batch.seq_length
    scale = b / 2  # the facts are at 16-bit
    layers = facts.llm_num_layers / g.llm_pp
    per_token = facts.llm_activation_bytes_per_token \
        + 2 * facts.llm_attention_score_heads * cfg.batch.seq_length  # a row of [s, s] scores
    if facts.moe_pad_to_capacity and facts.moe_capacity_factor:
        # every expert computes its full capacity, padded: capacity factor x its even share
        per_token += (facts.moe_capacity_factor - 1) * facts.llm_expert_activation_bytes_per_token
    per_layer = per_token / facts.llm_num_layers * scale * tokens / g.llm_tp
    inputs = 2 * facts.llm_hidden_size * scale * tokens / g.llm_tp  # a recomputed layer's input
    stage = per_layer * _kept_layers(layers, k) + inputs * (layers - _kept_layers(layers, k))
    # 1F1B: the first LLM stage holds up to --llm-pp micro-batches, the last one plus the logits
    # and their gradient; unfused cross entropy adds an fp32 copy, its softmax and an fp32
    # gradient (12 bytes an entry: measured peaks on an H200 said 8 was too few, results.md)
    in_flight = min(cfg.batch.num_microbatches, g.llm_pp)
    logits = tokens * facts.llm_vocab_size / g.llm_tp * (2 * b + (0 if k.cross_entropy_loss_fusion else 12))
    activations = max(in_flight * stage, stage + logits)
    params = dense + expert
    return BranchMemory("language model", weights=params * b, grads=trains * params * 4,
                        optimizer=optimizer, activations=activations)


def encoder(cfg, facts, *, images_per_sample: float = 1.0) -> BranchMemory:
    g, b = cfg.grid, 2 if cfg.runtime.bf16 else 4
    params = facts.encoder_params / g.encoder_tp
    trains = _trainable(facts.encoder_trainable_params, facts.encoder_params)
    per_param = 12 if b == 2 else 8
    # an encoder rank encodes the images of llm_dp / encoder_dp LLM lanes per micro-batch
    lanes = 1 if g.colocated else g.llm_dp / g.encoder_dp
    images = math.ceil(cfg.batch.micro_batch_size * lanes * images_per_sample)
    # the encoder is the pipeline's first stage ahead of the LLM's; colocated, one at a time
    in_flight = 1 if g.colocated else min(cfg.batch.num_microbatches, 1 + g.llm_pp)
    activations = in_flight * images * facts.encoder_activation_bytes_per_image * b / 2 / g.encoder_tp
    return BranchMemory("encoder", weights=params * b, grads=trains * params * 4,
                        optimizer=trains * per_param * params / g.encoder_dp, activations=activations)


def estimate(cfg, facts) -> List[BranchMemory]:
    """The branches one GPU holds, or each of the two grids' (hetero): per GPU."""
    if cfg.grid.llm_only:
        return [language(cfg, facts)]
    return [encoder(cfg, facts), language(cfg, facts)]


def per_gpu(cfg, branches: List[BranchMemory]) -> float:
    """The fullest GPU: colocated, one holds both branches; hetero, each grid its own."""
    totals = [b.total for b in branches]
    return sum(totals) if cfg.grid.colocated else max(totals)


def describe(cfg, branches: List[BranchMemory]) -> str:
    where = "per GPU, both branches on each" if cfg.grid.colocated else "per GPU of each grid"
    return f"memory (estimate, {where}): " + "; ".join(b.describe() for b in branches)


def alternatives(cfg, facts, limit: float) -> List[str]:
    """Changes of the same job that would fit: recompute, a smaller micro-batch, fused cross
    entropy (no world change), then more EP or DP (more GPUs)."""
    k, g, b = cfg.kernels, cfg.grid, cfg.batch
    options = []
    if k.recompute_granularity != "full":
        options.append(("--recompute-granularity full --recompute-method uniform "
                        "--recompute-num-layers 1",
                        replace(cfg, kernels=replace(k, recompute_granularity="full",
                                                     recompute_method="uniform",
                                                     recompute_num_layers=1))))
    if b.micro_batch_size > 1:
        options.append(("--micro-batch-size 1", replace(cfg, batch=replace(
            b, micro_batch_size=1, num_microbatches=b.num_microbatches * b.micro_batch_size))))
    if not k.cross_entropy_loss_fusion:
        options.append(("--cross-entropy-loss-fusion",
                        replace(cfg, kernels=replace(k, cross_entropy_loss_fusion=True))))
    ep = 2 * g.llm_ep
    if facts.num_experts and facts.num_experts % ep == 0 and (g.llm_tp * g.llm_dp) % (ep * g.llm_expt_tp) == 0:
        options.append((f"--llm-ep {ep}", replace(cfg, grid=replace(g, llm_ep=ep))))
    options.append((f"--llm-dp {2 * g.llm_dp} (twice the LLM's GPUs: the optimizer's shard halves)",
                    replace(cfg, grid=replace(g, llm_dp=2 * g.llm_dp))))
    fits = []
    for flags, changed in options:
        need = per_gpu(changed, estimate(changed, facts))
        if need <= limit:
            fits.append(f"{flags} ({need / GIB:.1f} GiB)")
    return fits


def problem(cfg, facts, device_bytes: float) -> Optional[str]:
    """The one line refusing a job whose estimate exceeds the GPU's memory (None: it fits)."""
    branches = estimate(cfg, facts)
    need, limit = per_gpu(cfg, branches), HEADROOM * device_bytes
    if need <= limit:
        return None
    fits = alternatives(cfg, facts, limit)
    hint = f"; would fit: {', or '.join(fits[:3])}" if fits else "; no single change found fits"
    return (f"estimated peak memory {need / GIB:.1f} GiB per GPU exceeds {limit / GIB:.1f} GiB "
            f"({HEADROOM:.0%} of the GPU's {device_bytes / GIB:.1f} GiB): "
            + "; ".join(b.describe() for b in branches) + hint
            + " (--skip-memory-check starts anyway)")


def device_bytes(local_rank: int) -> Optional[float]:
    """This rank's GPU memory, or None without CUDA (initialises CUDA: ranks and dry runs only,
    never the launcher, whose context would hold memory on GPU 0 for the whole job)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return float(torch.cuda.get_device_properties(local_rank).total_memory)
