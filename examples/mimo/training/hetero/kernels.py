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
from dataclasses import dataclass
from typing import Optional, Tuple

from examples.mimo.flags import FREE, QUIET, arg, derived, option, read
from examples.mimo.model_providers import specs

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


GROUP = "kernels, precision and activation memory"


@dataclass(frozen=True)
class KernelConfig:
    use_cpu_initialization: bool = option(
        "--use-cpu-initialization", QUIET, action="store_true",
        help="Draw the initial weights whole on the CPU and split them (as on CPU runs, always): "
             "the same initial model in every layout, for a given --seed, at about a minute "
             "for nemotron-20l. By default a GPU run draws each rank's shard on its GPU "
             "(Megatron's default): seconds, but the initial weights depend on the layout.")
    # None: bf16 (or fp32) everywhere
    fp8_format: Optional[str] = option(
        "--fp8-format", FREE, choices=FP8_FORMATS, default=None,
        help="FP8 GEMMs in the language model (transformer-engine, Hopper or newer, with "
             "--bf16). hybrid: e4m3 forward, e5m2 gradients.")
    fp8_recipe: str = option("--fp8-recipe", FREE, choices=FP8_RECIPES, default="delayed")
    fp8_margin: int = option("--fp8-margin", FREE, type=int, default=0)
    fp8_amax_history_len: int = option("--fp8-amax-history-len", FREE, type=int, default=1)
    fp8_amax_compute_algo: str = option("--fp8-amax-compute-algo", FREE,
                                        choices=("most_recent", "max"), default="most_recent")
    recompute_granularity: Optional[str] = option(
        "--recompute-granularity", FREE, choices=RECOMPUTE_GRANULARITIES, default=None,
        help="full: recompute whole layers in backward (with --recompute-method and "
             "--recompute-num-layers); selective: only --recompute-modules.")
    recompute_method: Optional[str] = option(
        "--recompute-method", FREE, choices=RECOMPUTE_METHODS, default=None,
        help="uniform: checkpoint every --recompute-num-layers layers as one unit; block: "
             "recompute the first --recompute-num-layers layers of each stage.")
    recompute_num_layers: Optional[int] = option("--recompute-num-layers", FREE, type=int,
                                                 default=None)
    recompute_modules: Tuple[str, ...] = derived(
        FREE, arg("--recompute-modules", nargs="+", choices=RECOMPUTE_MODULES, default=None,
                   help="Selective recompute's modules (default: core_attn)."),
        default=("core_attn",))
    moe_router_fusion: bool = option("--moe-router-fusion", FREE, action="store_true",
                                     help="transformer-engine's fused top-k router and aux-loss "
                                          "scores.")
    moe_permute_fusion: bool = option("--moe-permute-fusion", FREE, action="store_true",
                                      help="transformer-engine's fused token permute/unpermute "
                                           "for the experts.")
    cross_entropy_loss_fusion: bool = option(
        "--cross-entropy-loss-fusion", FREE, action="store_true",
        help="Fused cross entropy: no fp32 copy of the [tokens, vocabulary] logits.")
    cross_entropy_fusion_impl: str = option("--cross-entropy-fusion-impl", FREE,
                                            choices=CROSS_ENTROPY_IMPLS, default="native")
    disable_mamba_mem_eff_path: bool = option(
        "--disable-mamba-mem-eff-path", FREE, action="store_true",
        help="Keep Mamba on the unfused path even when causal-conv1d's CUDA extension is "
             "installed (by default the fused path is used whenever it is).")
    use_transformer_engine_op_fuser: bool = option(
        "--use-transformer-engine-op-fuser", FREE, action="store_true",
        help="Routed experts as one TE op sequence (FC1, scaled activation, FC2). On Hopper in "
             "bf16 with cuBLASLt >= 13.4, one grouped GEMM per FC over token counts left on the "
             "GPU; with an older cuBLASLt, TE's GEMM per expert.")
    use_fused_weighted_squared_relu: bool = option(
        "--use-fused-weighted-squared-relu", FREE, action="store_true",
        help="The experts' squared ReLU and router-probability weighting in one kernel; the op "
             "fuser needs it for squared-ReLU experts.")
    cuda_graph_impl: str = option(
        "--cuda-graph-impl", FREE, choices=CUDA_GRAPH_IMPLS, default="none",
        help="transformer_engine: after --cuda-graph-warmup-steps eager iterations, capture each "
             "language-model layer (or --cuda-graph-modules of it) as a CUDA graph and replay it "
             "in training: one launch instead of each kernel's. megatron-core's local and "
             "full_iteration are not offered.")
    # (): whole layers
    cuda_graph_modules: Tuple[str, ...] = derived(
        FREE, arg("--cuda-graph-modules", "--cuda-graph-scope", nargs="+",
                   choices=CUDA_GRAPH_MODULES, default=None,
                   help="The parts of each layer to graph (default: whole layers). Dropless MoE "
                        "layers cannot be graphed whole (their expert shapes vary): e.g. mamba "
                        "attn moe_router moe_preprocess."),
        default=())
    cuda_graph_warmup_steps: int = derived(
        FREE, arg("--cuda-graph-warmup-steps", type=int, default=None,
                   help=f"Eager iterations before the capture (default "
                        f"{CUDA_GRAPH_WARMUP_STEPS})."),
        default=CUDA_GRAPH_WARMUP_STEPS)

    @property
    def use_mamba_mem_eff_path(self) -> bool:
        """Mamba's fused path: not disabled, and causal-conv1d's CUDA extension is there."""
        return not self.disable_mamba_mem_eff_path and specs.causal_conv1d_available()

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

    def init_fields(self) -> dict:
        """What every TransformerConfig of the model takes, its projector's too."""
        return dict(use_cpu_initialization=self.use_cpu_initialization)

    def transformer_fields(self, *, fp8: bool, graphs: bool = False) -> dict:
        """TransformerConfig fields of one branch; ``fp8`` and ``graphs`` say whether this branch
        takes FP8 and CUDA graphs (the language model only: graphs.py)."""
        out = dict(**self.init_fields(), recompute_granularity=self.recompute_granularity,
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


def from_args(args: argparse.Namespace, *, transformer_impl: str, moe_activation: str = "",
              expert_tp: int = 1) -> KernelConfig:
    k = KernelConfig(
        **read(KernelConfig, args),
        recompute_modules=tuple(args.recompute_modules or ("core_attn",)),
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
