"""Compute options that trade kernels, precision and memory, with Megatron's flag names: FP8,
activation recompute, MoE router/permute fusion, the experts through TE's op fuser, fused cross
entropy, Mamba's fused path, CUDA graphs of the language model's layers (run by graphs.py).

They become TransformerConfig fields of the branches a provider builds (``transformer_fields``);
which branch takes which is the provider's call (FP8 goes to the language model only: RADIO's
1034-token images are not the multiple of 16 rows FP8 GEMMs need). Everything is checked here,
before any process group, except what needs the GPU itself (``check_device``).
"""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass
from typing import Optional, Tuple

FP8_FORMATS = ("e4m3", "hybrid")
# mxfp8 needs Blackwell; "custom" needs a quantizer factory this example has no flag for.
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
# megatron-core's selective-recompute modules that exist in these models (no MLA, no GDN)
RECOMPUTE_MODULES = ("core_attn", "moe_act", "layernorm", "mlp", "moe", "shared_experts")
CROSS_ENTROPY_IMPLS = ("native", "te")
# megatron-core's "local" impl is not offered: each layer's CudaGraphManager looks its process
# groups up in parallel_state, which this example never initialises (two grids, not one);
# "full_iteration" graphs the whole step, whose host syncs (MimoModel's text-embedding gather,
# the skip decision) cannot be captured.
CUDA_GRAPH_IMPLS = ("none", "transformer_engine")
CUDA_GRAPH_MODULES = ("attn", "mlp", "moe", "moe_router", "moe_preprocess", "mamba")
CUDA_GRAPH_WARMUP_STEPS = 3  # megatron-core's default


@dataclass(frozen=True)
class KernelConfig:
    fp8_format: Optional[str] = None  # None: bf16 (or fp32) everywhere
    fp8_recipe: str = "delayed"
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1
    fp8_amax_compute_algo: str = "most_recent"
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    recompute_modules: Tuple[str, ...] = ("core_attn",)
    moe_router_fusion: bool = False
    moe_permute_fusion: bool = False
    cross_entropy_loss_fusion: bool = False
    cross_entropy_fusion_impl: str = "native"
    disable_mamba_mem_eff_path: bool = False
    use_transformer_engine_op_fuser: bool = False
    use_fused_weighted_squared_relu: bool = False
    cuda_graph_impl: str = "none"
    cuda_graph_modules: Tuple[str, ...] = ()  # (): whole layers
    cuda_graph_warmup_steps: int = CUDA_GRAPH_WARMUP_STEPS

    @property
    def needs_transformer_engine(self) -> Optional[str]:
        """The first flag set that only transformer-engine layers can honour, or None."""
        for flag, on in (("--fp8-format", self.fp8_format is not None),
                         ("--moe-router-fusion", self.moe_router_fusion),
                         ("--moe-permute-fusion", self.moe_permute_fusion),
                         ("--use-transformer-engine-op-fuser", self.use_transformer_engine_op_fuser),
                         ("--use-fused-weighted-squared-relu", self.use_fused_weighted_squared_relu),
                         ("--cross-entropy-fusion-impl te",
                          self.cross_entropy_loss_fusion and self.cross_entropy_fusion_impl == "te"),
                         ("--recompute-modules moe_act", self.recompute_granularity == "selective"
                          and "moe_act" in self.recompute_modules),
                         ("--cuda-graph-impl transformer_engine", self.cuda_graph_impl != "none")):
            if on:
                return flag
        return None

    def transformer_fields(self, *, fp8: bool, graphs: bool = False) -> dict:
        """TransformerConfig fields of one branch; ``fp8`` and ``graphs`` say whether this branch
        takes FP8 and CUDA graphs (the language model only: graphs.py)."""
        out = dict(recompute_granularity=self.recompute_granularity,
                   recompute_method=self.recompute_method,
                   recompute_num_layers=self.recompute_num_layers,
                   recompute_modules=list(self.recompute_modules),
                   moe_router_fusion=self.moe_router_fusion,
                   moe_permute_fusion=self.moe_permute_fusion,
                   cross_entropy_loss_fusion=self.cross_entropy_loss_fusion,
                   cross_entropy_fusion_impl=self.cross_entropy_fusion_impl,
                   use_transformer_engine_op_fuser=self.use_transformer_engine_op_fuser,
                   use_fused_weighted_squared_relu=self.use_fused_weighted_squared_relu)
        if fp8 and self.fp8_format is not None:
            out.update(fp8=self.fp8_format, fp8_recipe=self.fp8_recipe, fp8_margin=self.fp8_margin,
                       fp8_amax_history_len=self.fp8_amax_history_len,
                       fp8_amax_compute_algo=self.fp8_amax_compute_algo)
        if graphs and self.cuda_graph_impl != "none":
            out.update(cuda_graph_impl=self.cuda_graph_impl,
                       cuda_graph_modules=list(self.cuda_graph_modules),
                       cuda_graph_warmup_steps=self.cuda_graph_warmup_steps)
        return out


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("kernels, precision and activation memory")
    g.add_argument("--fp8-format", choices=FP8_FORMATS, default=None,
                   help="FP8 GEMMs in the language model (transformer-engine, Hopper or newer, "
                        "with --bf16). hybrid: e4m3 forward, e5m2 gradients.")
    g.add_argument("--fp8-recipe", choices=FP8_RECIPES, default="delayed")
    g.add_argument("--fp8-margin", type=int, default=0)
    g.add_argument("--fp8-amax-history-len", type=int, default=1)
    g.add_argument("--fp8-amax-compute-algo", choices=("most_recent", "max"), default="most_recent")
    g.add_argument("--recompute-granularity", choices=RECOMPUTE_GRANULARITIES, default=None,
                   help="full: recompute whole layers in backward (with --recompute-method and "
                        "--recompute-num-layers); selective: only --recompute-modules.")
    g.add_argument("--recompute-method", choices=RECOMPUTE_METHODS, default=None,
                   help="uniform: checkpoint every --recompute-num-layers layers as one unit; "
                        "block: recompute the first --recompute-num-layers layers of each stage.")
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--recompute-modules", nargs="+", choices=RECOMPUTE_MODULES, default=None,
                   help="Selective recompute's modules (default: core_attn).")
    g.add_argument("--moe-router-fusion", action="store_true",
                   help="transformer-engine's fused top-k router and aux-loss scores.")
    g.add_argument("--moe-permute-fusion", action="store_true",
                   help="transformer-engine's fused token permute/unpermute for the experts.")
    g.add_argument("--use-transformer-engine-op-fuser", action="store_true",
                   help="Routed experts as one TE op sequence (FC1, scaled activation, FC2). "
                        "On Hopper in bf16 with cuBLASLt >= 13.4, one grouped GEMM per FC over "
                        "token counts left on the GPU; with an older cuBLASLt, TE's GEMM per expert.")
    g.add_argument("--use-fused-weighted-squared-relu", action="store_true",
                   help="The experts' squared ReLU and router-probability weighting in one kernel; "
                        "the op fuser needs it for squared-ReLU experts.")
    g.add_argument("--cross-entropy-loss-fusion", action="store_true",
                   help="Fused cross entropy: no fp32 copy of the [tokens, vocabulary] logits.")
    g.add_argument("--cross-entropy-fusion-impl", choices=CROSS_ENTROPY_IMPLS, default="native")
    g.add_argument("--disable-mamba-mem-eff-path", action="store_true",
                   help="Keep Mamba on the unfused path even when causal-conv1d's CUDA extension "
                        "is installed (by default the fused path is used whenever it is).")
    g.add_argument("--cuda-graph-impl", choices=CUDA_GRAPH_IMPLS, default="none",
                   help="transformer_engine: after --cuda-graph-warmup-steps eager iterations, "
                        "capture each language-model layer (or --cuda-graph-modules of it) as a "
                        "CUDA graph and replay it in training: one launch instead of each "
                        "kernel's. megatron-core's local and full_iteration are not offered.")
    g.add_argument("--cuda-graph-modules", "--cuda-graph-scope", nargs="+",
                   choices=CUDA_GRAPH_MODULES, default=None,
                   help="The parts of each layer to graph (default: whole layers). Dropless MoE "
                        "layers cannot be graphed whole (their expert shapes vary): e.g. mamba "
                        "attn moe_router moe_preprocess.")
    g.add_argument("--cuda-graph-warmup-steps", type=int, default=None,
                   help=f"Eager iterations before the capture (default "
                        f"{CUDA_GRAPH_WARMUP_STEPS}).")


def from_args(args: argparse.Namespace, *, transformer_impl: str, moe_activation: str = "",
              expert_tp: int = 1) -> KernelConfig:
    k = KernelConfig(
        fp8_format=args.fp8_format, fp8_recipe=args.fp8_recipe, fp8_margin=args.fp8_margin,
        fp8_amax_history_len=args.fp8_amax_history_len,
        fp8_amax_compute_algo=args.fp8_amax_compute_algo,
        recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        recompute_modules=tuple(args.recompute_modules or ("core_attn",)),
        moe_router_fusion=args.moe_router_fusion, moe_permute_fusion=args.moe_permute_fusion,
        cross_entropy_loss_fusion=args.cross_entropy_loss_fusion,
        cross_entropy_fusion_impl=args.cross_entropy_fusion_impl,
        disable_mamba_mem_eff_path=args.disable_mamba_mem_eff_path,
        use_transformer_engine_op_fuser=args.use_transformer_engine_op_fuser,
        use_fused_weighted_squared_relu=args.use_fused_weighted_squared_relu,
        cuda_graph_impl=args.cuda_graph_impl,
        cuda_graph_modules=tuple(dict.fromkeys(args.cuda_graph_modules or ())),
        cuda_graph_warmup_steps=(CUDA_GRAPH_WARMUP_STEPS if args.cuda_graph_warmup_steps is None
                                 else args.cuda_graph_warmup_steps))
    if k.cuda_graph_impl == "none":
        for flag, given in (("--cuda-graph-modules", args.cuda_graph_modules),
                            ("--cuda-graph-warmup-steps", args.cuda_graph_warmup_steps)):
            if given is not None:
                shown = " ".join(given) if isinstance(given, list) else given
                raise ValueError(f"{flag} {shown} applies with --cuda-graph-impl "
                                 f"transformer_engine only (got none)")
    validate(k, bf16=args.bf16, device=args.device, transformer_impl=transformer_impl,
             recompute_modules_given=args.recompute_modules is not None,
             moe_activation=moe_activation, expert_tp=expert_tp)
    return k


def validate(k: KernelConfig, *, bf16: bool, device: str, transformer_impl: str,
             recompute_modules_given: bool, moe_activation: str = "", expert_tp: int = 1) -> None:
    """``transformer_impl`` and ``moe_activation``: the model's (ModelFacts); ``expert_tp``: the
    LLM's expert tensor-parallel size."""
    if device == "cpu":
        check_device(k, None)
    if k.fp8_format is not None:
        if not bf16:
            raise ValueError(f"--fp8-format {k.fp8_format} needs --bf16 (FP8 GEMMs keep bf16 "
                             f"weights and activations around them)")
        if k.fp8_margin < 0 or k.fp8_amax_history_len < 1:
            raise ValueError(f"--fp8-margin {k.fp8_margin} must be >= 0 and "
                             f"--fp8-amax-history-len {k.fp8_amax_history_len} >= 1")
    g, method, n = k.recompute_granularity, k.recompute_method, k.recompute_num_layers
    if g == "full" and (method is None or n is None or n < 1):
        raise ValueError(f"--recompute-granularity full needs --recompute-method "
                         f"{'|'.join(RECOMPUTE_METHODS)} and --recompute-num-layers >= 1 "
                         f"(got {method}, {n})")
    if g != "full" and (method is not None or n is not None):
        raise ValueError(f"--recompute-method {method} and --recompute-num-layers {n} apply to "
                         f"--recompute-granularity full only (got {g})")
    if g != "selective" and recompute_modules_given:
        raise ValueError(f"--recompute-modules applies to --recompute-granularity selective only "
                         f"(got {g})")
    flag = k.needs_transformer_engine
    if flag is not None and transformer_impl != "transformer_engine":
        raise ValueError(f"{flag} needs transformer-engine layers; this model's are "
                         f"{transformer_impl} (see --transformer-impl)")
    if k.use_transformer_engine_op_fuser:
        _check_op_fuser(k, moe_activation, expert_tp)


def _check_op_fuser(k: KernelConfig, moe_activation: str, expert_tp: int) -> None:
    """What megatron-core's TEGroupedMLP asserts when it builds the layer
    (experts.py, _is_fused_impl_supported), said before any process group exists."""
    # megatron-core also fuses SwiGLU experts, but only with TE's CuTe DSL kernels (Blackwell)
    if moe_activation != "squared_relu":
        raise ValueError(f"--use-transformer-engine-op-fuser fuses squared-ReLU routed experts "
                         f"only; this model's routed experts: {moe_activation or 'none'}")
    if not k.use_fused_weighted_squared_relu:
        raise ValueError("--use-transformer-engine-op-fuser needs --use-fused-weighted-squared-relu "
                         "for this model's squared-ReLU experts")
    if expert_tp > 1:
        raise ValueError(f"--use-transformer-engine-op-fuser needs --llm-expt-tp 1 (got "
                         f"{expert_tp}): the fused experts have no tensor parallelism")


def check_device(k: KernelConfig, capability: Optional[Tuple[int, int]]) -> None:
    """Before process groups, with the compute capability of the rank's GPU (None: CPU)."""
    if capability is None:
        for flag, value in (("--fp8-format", k.fp8_format),
                            # megatron-core's checkpoint saves the CUDA RNG state
                            # (tensor_parallel/random.py, _get_all_rng_states)
                            ("--recompute-granularity", k.recompute_granularity),
                            ("--cuda-graph-impl", None if k.cuda_graph_impl == "none"
                             else k.cuda_graph_impl)):
            if value is not None:
                raise ValueError(f"{flag} {value} needs CUDA; this run is on the CPU")
        return
    if k.fp8_format is not None and capability < (8, 9):
        raise ValueError(f"--fp8-format {k.fp8_format} needs an FP8 GPU (sm_89 or newer); this "
                         f"one is sm_{capability[0]}{capability[1]}")
    if k.fp8_format is not None and k.fp8_recipe == "mxfp8" and capability < (10, 0):
        raise ValueError(f"--fp8-recipe mxfp8 needs Blackwell (sm_100 or newer); this GPU is "
                         f"sm_{capability[0]}{capability[1]}")


def causal_conv1d_available() -> bool:
    """causal-conv1d with its CUDA extension (the pure-Python part alone cannot run the path)."""
    if importlib.util.find_spec("causal_conv1d") is None:
        return False
    try:
        import causal_conv1d_cuda  # noqa: F401  (the compiled extension)
    except ImportError:
        return False
    return True


def use_mamba_mem_eff_path(k: KernelConfig) -> bool:
    return not k.disable_mamba_mem_eff_path and causal_conv1d_available()
