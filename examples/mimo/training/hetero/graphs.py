"""CUDA graphs of the language model's layers (``--cuda-graph-impl transformer_engine``).

At micro-batch 1 the step is host-bound: ~24k kernel launches an iteration keep the GPU busy a
quarter of the time (docs/benchmarks.md). megatron-core's ``TECudaGraphHelper`` captures each
layer (or the parts ``--cuda-graph-modules`` names) with transformer-engine's
``make_graphed_callables``; replaying one launches the layer's kernels in one call. As in
``megatron.training.train``: eager iterations first (Triton autotuning and TE's workspace
allocations must not happen inside a capture), then the capture at the top of iteration
``--cuda-graph-warmup-steps + 1`` of this process, replays for the rest of training, eager
evaluation (graphs replay only in training mode).

Only the language model is graphed: the encoder's input differs from micro-batch to micro-batch
(images per sample). One graph per layer serves every micro-batch because the LLM branch runs
as one pipeline stage, the last of the schedule, where each micro-batch's backward runs before
the next one's forward; with --llm-pp > 1 several would be in flight in one layer's static
buffers, and this schedule does not tell the layers which one runs (megatron-core's
set_current_microbatch finds no ``decoder`` on a MimoModel), so that is refused.
"""

from __future__ import annotations

import time
from typing import Mapping, Optional

import torch

from examples.mimo.interfaces import ModelFacts
from examples.mimo.training.hetero import compat
from examples.mimo.training.hetero.kernels import KernelConfig


def validate(k: KernelConfig, *, facts: ModelFacts, llm_pp: int, packs_sequences: bool) -> None:
    """What megatron-core's TransformerConfig and TECudaGraphHelper would assert after the
    process groups exist, and what would fail inside a capture, said before."""
    if k.cuda_graph_impl == "none":
        return
    impl, modules = f"--cuda-graph-impl {k.cuda_graph_impl}", set(k.cuda_graph_modules)
    shown = " ".join(k.cuda_graph_modules) or "(whole layers)"
    if k.cuda_graph_warmup_steps < 1:
        raise ValueError(f"--cuda-graph-warmup-steps {k.cuda_graph_warmup_steps} must be >= 1 "
                         f"(the capture reuses what eager iterations compiled and tuned)")
    if llm_pp > 1:
        raise ValueError(f"{impl} needs --llm-pp 1 (got {llm_pp}): one graph per layer serves "
                         f"every micro-batch only on the schedule's last stage")
    if packs_sequences:
        raise ValueError(f"{impl} takes unpacked rows only: the data provider packs sequences "
                         f"(--packing-buffer-size), and a graph's inputs are tensors of one shape")
    if {"moe", "moe_router"} <= modules:
        raise ValueError(f"--cuda-graph-modules {shown}: moe and moe_router exclude each other "
                         f"(moe graphs the whole MoE block, moe_router its router only)")
    if "moe_preprocess" in modules and "moe_router" not in modules:
        raise ValueError(f"--cuda-graph-modules {shown}: moe_preprocess needs moe_router")
    moe = facts.num_experts > 1
    if not moe and modules & {"moe", "moe_router", "moe_preprocess"}:
        raise ValueError(f"--cuda-graph-modules {shown}: this model has no MoE layers")
    if moe and "mlp" in modules:
        raise ValueError(f"--cuda-graph-modules {shown}: mlp graphs dense MLP layers, and "
                         f"megatron-core counts this MoE model as having none")
    padded = facts.moe_capacity_factor is not None and facts.moe_pad_to_capacity
    if moe and not padded and (not modules or "moe" in modules):
        raise ValueError(
            f"--cuda-graph-modules {shown}: a graph of a whole MoE layer needs fixed expert "
            f"shapes (--moe-expert-capacity-factor with --moe-pad-expert-input-to-capacity); "
            f"dropless, graph the rest, e.g. --cuda-graph-modules mamba attn moe_router "
            f"moe_preprocess")
    if moe and not padded and facts.moe_capacity_factor is not None and "moe_preprocess" in modules:
        raise ValueError(f"--cuda-graph-modules {shown}: moe_preprocess copies token counts to "
                         f"the host when --moe-expert-capacity-factor is set without "
                         f"--moe-pad-expert-input-to-capacity")
    if k.recompute_granularity == "full":
        raise ValueError(f"{impl} and --recompute-granularity full exclude each other "
                         f"(megatron-core graphs no recomputed layer)")
    if (k.recompute_granularity == "selective" and "moe" in k.recompute_modules
            and "moe_router" in modules):
        raise ValueError(f"--recompute-modules moe and --cuda-graph-modules {shown} exclude each "
                         f"other (the recomputed block would cover a graph)")


def check_environment(k: KernelConfig, env: Mapping[str, str]) -> None:
    """Before process groups: megatron-core's TECudaGraphHelper asserts this after them."""
    if k.cuda_graph_impl == "none":
        return
    alloc = env.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if "expandable_segments:True" in alloc and env.get("NCCL_GRAPH_REGISTER", "") != "0":
        raise ValueError(f"--cuda-graph-impl {k.cuda_graph_impl} with PYTORCH_CUDA_ALLOC_CONF="
                         f"{alloc} needs NCCL_GRAPH_REGISTER=0 (NCCL's graph buffer "
                         f"registration reads freed memory with expandable segments)")


def use_side_stream(k: KernelConfig) -> None:
    """Graphs are captured on, and replayed into, a stream other than the legacy default one
    (which cannot be captured); megatron.training's initialize does the same."""
    if k.cuda_graph_impl == "transformer_engine":
        torch.cuda.set_stream(torch.cuda.Stream())


class CudaGraphs:
    """Captures the language model's layers once, after the eager warm-up; frees them at close."""

    def __init__(self, k: KernelConfig, *, llm, config, pg_collection, seq_length: int,
                 micro_batch_size: int, global_batch_size: int, data_parallel_size: int,
                 optimizer, rank: int):
        from megatron.core.transformer.cuda_graphs import TECudaGraphHelper

        compat.num_microbatches_for_cuda_graphs(rank=rank, global_batch_size=global_batch_size,
                                                micro_batch_size=micro_batch_size,
                                                data_parallel_size=data_parallel_size)
        # llm is the DDP-wrapped language model: the helper finds the layers under .decoder
        self.helper = TECudaGraphHelper(model=[llm], config=config, seq_length=seq_length,
                                        micro_batch_size=micro_batch_size, optimizers=[optimizer],
                                        pg_collection=pg_collection)
        self.warmup_steps = k.cuda_graph_warmup_steps
        self.layers = len(self.helper.flattened_callables)

    def before_step(self, steps_done: int) -> Optional[str]:
        """Called before each iteration with the number this process has run; captures before
        the first one after the warm-up, and then returns the line to print."""
        if self.helper.capture_finished() or steps_done < self.warmup_steps:
            return None
        start = time.perf_counter()
        self.helper.create_cudagraphs()  # zeroes the grads and MoE counters it dirtied
        return (f"CUDA graphs: {self.layers} language-model layers captured after "
                f"{steps_done} eager iterations in {time.perf_counter() - start:.1f} s")

    def close(self) -> None:
        if self.helper.graphs_created():
            self.helper.delete_cuda_graphs()
