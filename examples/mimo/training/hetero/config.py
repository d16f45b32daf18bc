"""Command-line flags -> frozen per-concern configs, validated by pure functions.

Nothing here imports torch.distributed: every check runs before a process group exists.
"""

from __future__ import annotations

import argparse
import math
import os
from fractions import Fraction
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple

from examples.mimo.data import DATA_PROVIDERS
from examples.mimo.flags import (FREE, LAYOUT, MATCH, QUIET, SCHEDULE, Flag, add_group, arg,
                                 derived, option, read)
from examples.mimo.interfaces import ModelFacts
from examples.mimo.model_providers import MODEL_PROVIDERS
from examples.mimo.model_providers.hf_checkpoint import Reader, is_hf_folder
from examples.mimo.training.hetero import graphs, kernels, profiling
from examples.mimo.training.hetero.exits import SIGNALS

DECAY_STYLES = ("constant", "linear", "cosine", "WSD")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")


@dataclass(frozen=True)
class GridConfig:
    encoder_tp: int = option("--encoder-tp", LAYOUT, type=int, default=1,
                             help="Encoder tensor-parallel size.")
    encoder_dp: int = option("--encoder-dp", FREE, type=int, default=1,
                             help="Encoder data-parallel size.")
    llm_tp: int = option("--llm-tp", LAYOUT, type=int, default=1, help="LLM tensor-parallel size.")
    llm_pp: int = option("--llm-pp", LAYOUT, type=int, default=1,
                         help="LLM pipeline-parallel size.")
    llm_dp: int = option("--llm-dp", FREE, type=int, default=1,
                         help="LLM data-parallel size (one lane each).")
    llm_ep: int = option("--llm-ep", LAYOUT, type=int, default=1, help="LLM expert-parallel size.")
    llm_expt_tp: int = derived(LAYOUT, arg("--llm-expt-tp", type=int, default=None,
                                            help="LLM expert tensor-parallel size (default: "
                                                 "--llm-tp)."), default=1)
    llm_only: bool = option("--llm-only", MATCH, action="store_true",
                            help="No encoder grid; text-only LLM training.")
    # both modules on every rank, each with its own TP/DP; no bridge
    colocated: bool = option(
        "--colocated", FREE, action="store_true",
        help="Both modules on every rank (megatron-core's COLOCATED MimoModel), each with its own "
             "TP/DP; --encoder-tp x --encoder-dp = --llm-tp x --llm-dp = world size. The "
             "baseline a hetero layout is measured against.")
    # the LLM's TP regions split the sequence (LLM branch only)
    sequence_parallel: bool = option(
        "--sequence-parallel", FREE, action="store_true",
        help="Split the LLM's sequence over its --llm-tp ranks outside the TP matmuls (MimoModel "
             "scatters the combined text and image embeddings); megatron-core needs it for "
             "experts with --llm-tp > 1. The encoder's layers are not split.")
    context_parallel_size: int = option("--context-parallel-size", FREE, type=int, default=1,
                                        help="Must be 1 (not supported).")

    @property
    def encoder_size(self) -> int:
        """GPUs the encoder runs on."""
        return 0 if self.llm_only else self.encoder_tp * self.encoder_dp

    @property
    def llm_size(self) -> int:
        return self.llm_tp * self.llm_pp * self.llm_dp

    @property
    def llm_offset(self) -> int:
        """First rank of the LLM grid: after the encoder's, or 0 when they share the ranks."""
        return 0 if self.colocated else self.encoder_size

    @property
    def world_size(self) -> int:
        return self.llm_offset + self.llm_size

    @property
    def llm_expt_dp(self) -> int:
        # Within one PP stage the expert view re-factors the same tp*dp ranks.
        return self.llm_tp * self.llm_dp // (self.llm_ep * self.llm_expt_tp)


@dataclass(frozen=True)
class BatchConfig:
    micro_batch_size: int = option("--micro-batch-size", FREE, type=int, default=2,
                                   help="Samples per LLM micro-batch.")
    global_batch_size: int = option("--global-batch-size", FREE, type=int, default=8,
                                    help="Samples per iteration.")
    seq_length: int = option("--seq-length", FREE, type=int, default=64, help="Tokens per sample.")
    num_microbatches: int = derived(FREE, default=1)


def _in_samples(name: str, help: str = None) -> Tuple[Flag, Flag]:
    """The pair of flags of a schedule length: in iterations or in samples (Megatron's)."""
    return (arg(f"--{name}-iters", type=int, default=None, help=help),
            arg(f"--{name}-samples", type=int, default=None, help=help))


@dataclass(frozen=True)
class ScheduleConfig:
    """Everything in samples, as OptimizerParamScheduler steps by the global batch."""

    train_iters: int = derived(FREE, arg("--train-iters", type=int, default=None,
                                          help="Iterations to train."),
                               arg("--train-samples", type=int, default=None,
                                    help="Samples to train; iterations = ceil(samples / global "
                                         "batch)."))
    warmup_samples: int = derived(SCHEDULE, *_in_samples("lr-warmup"))
    decay_samples: int = derived(SCHEDULE, *_in_samples("lr-decay", "Default: the whole run."))
    lr: float = option("--lr", SCHEDULE, type=float, default=1e-3)
    min_lr: float = option("--min-lr", SCHEDULE, type=float, default=0.0)
    decay_style: str = option("--lr-decay-style", SCHEDULE, choices=DECAY_STYLES, default="cosine")
    wsd_decay_samples: Optional[int] = derived(SCHEDULE, *_in_samples("lr-wsd-decay"), default=None)
    wsd_decay_style: Optional[str] = option("--lr-wsd-decay-style", SCHEDULE,
                                            choices=WSD_DECAY_STYLES, default=None)
    weight_decay: float = option("--weight-decay", SCHEDULE, type=float, default=0.01)


@dataclass(frozen=True)
class OptimConfig:
    clip_grad: float = option("--clip-grad", FREE, type=float, default=1.0,
                              help="Global grad-norm clip; 0 disables.")
    adam_beta1: float = option("--adam-beta1", FREE, type=float, default=0.9)
    adam_beta2: float = option("--adam-beta2", FREE, type=float, default=0.999)
    adam_eps: float = option("--adam-eps", FREE, type=float, default=1e-8)
    max_consecutive_skipped_iters: int = option(
        "--max-consecutive-skipped-iters", FREE, type=int, default=10,
        help="Stop with an error after this many iterations in a row were skipped for non-finite "
             "gradients (a diverging run); 0 never stops.")
    # divergence.py
    check_for_spiky_loss: bool = option(
        "--check-for-spiky-loss", FREE, action=argparse.BooleanOptionalAction, default=True,
        help="Stop with an error (exit 1, no further save) when the loss exceeds "
             "--spiky-loss-factor x the largest of the last 100 iterations' (a diverging run "
             "whose loss stays finite). On by default, unlike Megatron.")
    check_for_large_grads: bool = option("--check-for-large-grads", FREE,
                                         action=argparse.BooleanOptionalAction, default=False,
                                         help="The same test on the grad norm.")
    spiky_loss_factor: float = option("--spiky-loss-factor", FREE, type=float, default=10.0,
                                      help="The factor of both checks (Megatron's fixed value: "
                                           "10).")


@dataclass(frozen=True)
class DDPConfig:
    overlap_grad_reduce: bool = option(
        "--overlap-grad-reduce", FREE, action="store_true",
        help="Overlap the LLM's grad reduce with backward. The encoder never overlaps: text-only "
             "steps leave its buckets without grads.")
    bucket_size: Optional[int] = option("--ddp-bucket-size", FREE, type=int, default=None,
                                        help="Elements per DDP bucket.")


@dataclass(frozen=True)
class RuntimeConfig:
    # resolved by device.py
    device: str = option("--device", QUIET, choices=("auto", "cuda", "cpu"), default="auto",
                         help="cpu runs megatron-core on gloo (see device.py).")
    bf16: bool = option("--bf16", FREE, action="store_true",
                        help="bf16 params and compute (CUDA only).")
    seed: int = option("--seed", FREE, type=int, default=1234)
    distributed_timeout_minutes: float = option(
        "--distributed-timeout-minutes", QUIET, type=float, default=10.0,
        help="Collective timeout; a stuck job ends within it.")
    kernel_cache_dir: Optional[str] = option(
        "--kernel-cache-dir", QUIET, default=None,
        help="Where the first iteration's compiled kernels are kept (TRITON_CACHE_DIR, "
             "TORCHINDUCTOR_CACHE_DIR), so that a requeued or resumed job reuses them "
             "(default: <--save>/kernel-cache; a variable set by the caller wins).")
    verbose_warnings: bool = option(
        "--verbose-warnings", QUIET, action="store_true",
        help="Show the libraries' notices (experimental APIs, fallbacks from packages not "
             "installed, their own deprecations), each once; by default they are counted "
             "(notices.py). Warnings from this package's code are always shown.")
    dry_run: bool = option("--dry-run", QUIET, action="store_true",
                           help="Validate, print the resolved layout (grids, lanes, micro-batches, "
                                "parameters per branch) and the memory estimate, and exit; "
                                "WORLD_SIZE gives the world size.")
    skip_memory_check: bool = option(
        "--skip-memory-check", QUIET, action="store_true",
        help="Start even when the estimated peak memory per GPU (memory.py) exceeds the GPU's.")


@dataclass(frozen=True)
class LogConfig:
    log_interval: int = option("--log-interval", QUIET, type=int, default=1)
    metrics_file: Optional[str] = option(
        "--metrics-file", QUIET, default=None,
        help="JSON lines of per-iteration metrics, written by the logging rank.")
    tensorboard_dir: Optional[str] = option(
        "--tensorboard-dir", QUIET, default=None,
        help="TensorBoard event files (Megatron's scalar names), logging rank.")
    eval_interval: Optional[int] = option(
        "--eval-interval", QUIET, type=int, default=None,
        help="Validation loss every N iterations and after the last one.")
    eval_iters: int = option("--eval-iters", QUIET, type=int, default=10,
                             help="Global batches of the validation split per evaluation.")


@dataclass(frozen=True)
class CheckpointConfig:
    save: Optional[str] = option("--save", QUIET, default=None,
                                 help="Directory for checkpoints (iter_NNNNNNN/).")
    load: Optional[str] = option(
        "--load", QUIET, default=None,
        help="Resume from the latest checkpoint here. An empty directory starts fresh; a "
             "missing one only when it is also --save (auto-resume).")
    save_interval: Optional[int] = option("--save-interval", QUIET, type=int, default=None,
                                          help="Iterations between saves.")
    exit_interval: Optional[int] = option(
        "--exit-interval", QUIET, type=int, default=None,
        help="Stop (after saving, with --save) once the iteration is a multiple of this.")
    # the signal that makes ranks save and exit
    exit_signal: Optional[str] = derived(
        QUIET, arg("--exit-signal-handler", action="store_true",
                    help="On --exit-signal every rank finishes its iteration, saves and exits 0."),
        arg("--exit-signal", choices=SIGNALS, default="SIGTERM",
             help="The signal --exit-signal-handler acts on (SLURM: --signal=...)."),
        default=None)
    exit_duration_mins: Optional[float] = option(
        "--exit-duration-in-mins", QUIET, type=float, default=None,
        help="Save and exit once the job has run this long (before its time limit).")
    keep_latest_checkpoints: int = option(
        "--keep-latest-checkpoints", QUIET, type=int, default=0,
        help="After each save keep only the newest N iterations in --save (0: all); the one "
             "this job resumed from and the newest known good one are kept too. Each deletion "
             "is logged.")
    no_save_optim: bool = option("--no-save-optim", QUIET, action="store_true",
                                 help="Save model weights only.")
    no_load_optim: bool = option("--no-load-optim", QUIET, action="store_true",
                                 help="Do not load optimizer state.")
    no_load_rng: bool = option("--no-load-rng", QUIET, action="store_true",
                               help="Do not load RNG state.")
    no_load_scheduler: bool = option("--no-load-scheduler", QUIET, action="store_true",
                                     help="Do not load the LR schedule.")
    finetune: bool = option("--finetune", QUIET, action="store_true",
                            help="Load model weights only and start at iteration 0.")
    load_language_from: Optional[str] = option(
        "--load-language-from", QUIET, default=None,
        help="The language model to start from: a Hugging Face folder (config.json + "
             "*.safetensors; its shape replaces the preset's), a checkpoint of this trainer, or "
             "a single-grid Megatron dist-checkpoint of that branch.")
    load_vision_from: Optional[str] = option(
        "--load-vision-from", QUIET, default=None,
        help="The vision encoder to start from, as --load-language-from.")
    load_from_hf: Optional[str] = option(
        "--load-from-hf", QUIET, default=None,
        help="A whole Hugging Face VLM folder (e.g. nemotron_h_omni) to start both branches and "
             "the projector from; its config.json gives the model's shape. Local only.")
    allow_existing_save: bool = option(
        "--allow-existing-save", QUIET, action="store_true",
        help="Let --save be a directory holding checkpoints this run does not resume (or the one "
             "--finetune loads from); its tracker will move to this run's.")
    override_opt_param_scheduler: bool = option(
        "--override-opt_param-scheduler", QUIET, action="store_true",
        help="On resume, use this run's LR/WD schedule flags, not the checkpoint's.")
    use_checkpoint_opt_param_scheduler: bool = option(
        "--use-checkpoint-opt_param-scheduler", QUIET, action="store_true",
        help="On resume, keep the checkpoint's LR/WD schedule, whatever the flags say.")


@dataclass(frozen=True)
class TrainConfig:
    grid: GridConfig
    batch: BatchConfig
    schedule: ScheduleConfig
    optim: OptimConfig
    ddp: DDPConfig
    runtime: RuntimeConfig
    log: LogConfig
    ckpt: CheckpointConfig
    model: object  # the provider's own frozen config
    data: object  # the data provider's own frozen config
    model_provider: str = option("--model-provider", MATCH, default="mock",
                                 help=f"One of {sorted(MODEL_PROVIDERS)}.")
    data_provider: str = option("--data-provider", FREE, default="mock",
                                help=f"One of {sorted(DATA_PROVIDERS)}.")
    kernels: kernels.KernelConfig = kernels.KernelConfig()
    profile: profiling.ProfileConfig = profiling.ProfileConfig()


# The trainer's concerns in --help order, each with its group's title.
GROUPS = ((GridConfig, "hetero grids"), (BatchConfig, "batch"),
          (ScheduleConfig, "training and learning-rate schedule"),
          (OptimConfig, "optimizer and divergence checks"),
          (DDPConfig, "distributed data parallel"), (RuntimeConfig, "runtime"),
          (LogConfig, "logging"), (CheckpointConfig, "checkpointing"),
          (kernels.KernelConfig, kernels.GROUP), (profiling.ProfileConfig, profiling.GROUP))


class _Parser(argparse.ArgumentParser):
    """Unknown or malformed flags raise ValueError like every other configuration error (the
    entrypoint prints one line), instead of printing the whole usage on every rank."""

    def error(self, message):
        raise ValueError(message)


def build_parser(model_provider: str = "mock", data_provider: str = "mock") -> argparse.ArgumentParser:
    p = _Parser(
        description="Heterogeneous-parallel MIMO training: encoder and LLM on disjoint grids.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # --train-iter must not silently mean --train-iters
    )
    for cls, title in GROUPS:
        add_group(p, title, cls)
    providers = add_group(p, "providers", TrainConfig)
    providers.set_defaults(model_provider=model_provider, data_provider=data_provider)
    lookup("--model-provider", MODEL_PROVIDERS, model_provider).add_args(p)
    lookup("--data-provider", DATA_PROVIDERS, data_provider).add_args(p)
    return p


def lookup(flag: str, registry: dict, name: str):
    if name not in registry:
        raise ValueError(f"{flag} {name!r} is unknown; known: {sorted(registry)}")
    return registry[name]


def parse_config(argv: Sequence[str], world_size: int) -> TrainConfig:
    """Parse and validate; raises ValueError naming the offending flags."""
    # The providers' names first: they choose which provider flags the parser has.
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_group(pre, "providers", TrainConfig)
    names, _ = pre.parse_known_args(argv)
    args = build_parser(names.model_provider, names.data_provider).parse_args(argv)
    return config_from_args(args, world_size)


def config_from_args(args: argparse.Namespace, world_size: int) -> TrainConfig:
    model_provider = lookup("--model-provider", MODEL_PROVIDERS, args.model_provider)
    data_provider = lookup("--data-provider", DATA_PROVIDERS, args.data_provider)
    model_cfg = model_provider.config_from_args(args)
    data_cfg = data_provider.config_from_args(args)
    validate_hf_sources(args, model_provider, model_cfg)
    grid = GridConfig(**read(GridConfig, args),
                      llm_expt_tp=args.llm_tp if args.llm_expt_tp is None else args.llm_expt_tp)
    if grid.context_parallel_size != 1:
        raise ValueError(
            f"--context-parallel-size {grid.context_parallel_size}: only 1 is supported")
    validate_grid(grid, world_size)
    batch = build_batch(grid, BatchConfig(**read(BatchConfig, args)))
    facts = model_provider.facts(model_cfg)
    validate_model_fit(grid, facts)
    validate_sequence_parallel(grid, facts, batch.seq_length)
    kernel_cfg = kernels.from_args(args, transformer_impl=facts.transformer_impl,
                                   moe_activation=facts.moe_activation, expert_tp=grid.llm_expt_tp)
    graphs.validate(kernel_cfg, facts=facts, llm_pp=grid.llm_pp,
                    packs_sequences=data_provider.packs_sequences(data_cfg))
    data_provider.validate(data_cfg, model_provider.data_spec(model_cfg), batch.seq_length,
                           equal_images=equal_images_reason(grid), llm_only=grid.llm_only)
    if args.bf16 and args.device == "cpu":
        raise ValueError("--bf16 needs --device cuda (gloo on CPU runs fp32)")
    if args.distributed_timeout_minutes <= 0:
        raise ValueError(f"--distributed-timeout-minutes {args.distributed_timeout_minutes} must be > 0")
    if args.kernel_cache_dir is not None and os.path.exists(args.kernel_cache_dir) and \
            not os.path.isdir(args.kernel_cache_dir):
        raise ValueError(f"--kernel-cache-dir {args.kernel_cache_dir} is a file, not a directory")
    if args.log_interval < 1:
        raise ValueError(f"--log-interval {args.log_interval} must be >= 1")
    if args.eval_interval is not None and args.eval_interval < 1:
        raise ValueError(f"--eval-interval {args.eval_interval} must be >= 1")
    if args.eval_iters < 1:
        raise ValueError(f"--eval-iters {args.eval_iters} must be >= 1")
    if args.ddp_bucket_size is not None and args.ddp_bucket_size < 1:
        raise ValueError(f"--ddp-bucket-size {args.ddp_bucket_size} must be >= 1")
    if args.clip_grad < 0:
        raise ValueError(f"--clip-grad {args.clip_grad} must be >= 0")
    if args.spiky_loss_factor <= 1:
        raise ValueError(f"--spiky-loss-factor {args.spiky_loss_factor} must be > 1")
    if args.max_consecutive_skipped_iters < 0:
        raise ValueError(f"--max-consecutive-skipped-iters {args.max_consecutive_skipped_iters} "
                         f"must be >= 0")
    ckpt = build_checkpoint_config(args)
    schedule = build_schedule(args, batch.global_batch_size)
    return TrainConfig(
        grid=grid,
        batch=batch,
        schedule=schedule,
        optim=OptimConfig(**read(OptimConfig, args)),
        ddp=DDPConfig(**read(DDPConfig, args)),
        runtime=RuntimeConfig(**read(RuntimeConfig, args)),
        log=LogConfig(**read(LogConfig, args)),
        ckpt=ckpt,
        model_provider=args.model_provider,
        model=model_cfg,
        data_provider=args.data_provider,
        data=data_cfg,
        kernels=kernel_cfg,
        profile=profiling.from_args(args, train_iters=schedule.train_iters),
    )


def validate_hf_sources(args: argparse.Namespace, provider, model_cfg) -> None:
    if args.load_from_hf is not None and args.llm_only:
        raise ValueError(f"--load-from-hf {args.load_from_hf} starts both branches; with "
                         f"--llm-only use --load-language-from {args.load_from_hf}")
    hf = args.load_from_hf is not None or any(
        is_hf_folder(p) for p in (args.load_language_from, args.load_vision_from))
    if not hf:
        return
    parts = provider.hf_parts(model_cfg, load_from_hf=args.load_from_hf,
                              language_from=args.load_language_from,
                              vision_from=args.load_vision_from)
    if not parts:
        raise ValueError(f"--model-provider {args.model_provider} does not import Hugging Face "
                         f"folders (nemotron_moe_vlm and llava do)")
    for folder in sorted({p.folder for p in parts.values()}):
        Reader(folder)  # every weights file's header, here rather than on every rank later


def validate_grid(grid: GridConfig, world_size: int) -> None:
    sizes = {"--llm-tp": grid.llm_tp, "--llm-pp": grid.llm_pp, "--llm-dp": grid.llm_dp,
             "--llm-ep": grid.llm_ep, "--llm-expt-tp": grid.llm_expt_tp}
    if not grid.llm_only:
        sizes.update({"--encoder-tp": grid.encoder_tp, "--encoder-dp": grid.encoder_dp})
    for flag, value in sizes.items():
        if value < 1:
            raise ValueError(f"{flag} {value} must be >= 1")
    if grid.colocated:
        validate_colocated(grid, world_size)
    if grid.world_size != world_size:
        encoder = ("0 (--llm-only)" if grid.llm_only else
                   f"--encoder-tp {grid.encoder_tp} x --encoder-dp {grid.encoder_dp} = {grid.encoder_size}")
        raise ValueError(
            f"world size {world_size} != encoder ranks {encoder} + LLM ranks --llm-tp {grid.llm_tp} "
            f"x --llm-pp {grid.llm_pp} x --llm-dp {grid.llm_dp} = {grid.llm_size}")
    if not (grid.llm_only or grid.colocated) and (grid.encoder_dp % grid.llm_dp
                                                  and grid.llm_dp % grid.encoder_dp):
        # megatron-core's BridgeCommunicator.build_comm_map pairs the encoder's DP ranks with the
        # LLM's first-stage DP ranks by fan-in or fan-out, and raises after the groups exist.
        raise ValueError(f"--encoder-dp {grid.encoder_dp} and --llm-dp {grid.llm_dp}: one must be "
                         f"a multiple of the other (the bridge fans out or in)")
    expert_span = grid.llm_ep * grid.llm_expt_tp
    if (grid.llm_tp * grid.llm_dp) % expert_span:
        raise ValueError(
            f"--llm-ep {grid.llm_ep} x --llm-expt-tp {grid.llm_expt_tp} = {expert_span} must divide "
            f"--llm-tp {grid.llm_tp} x --llm-dp {grid.llm_dp} = {grid.llm_tp * grid.llm_dp}")


def equal_images_reason(grid: GridConfig) -> str:
    """Why the layout needs the same image tokens on every encoder rank per micro-batch ('' if
    it does not): megatron-core 0.19.2 splits or joins the encoder's output by token count there."""
    if grid.llm_only or grid.encoder_dp == grid.llm_dp:
        return ""
    dp = f"--encoder-dp {grid.encoder_dp}, --llm-dp {grid.llm_dp}"
    if grid.colocated:
        return f"--colocated with {dp}"
    return f"fan-in ({dp})" if grid.encoder_dp > grid.llm_dp else ""


def validate_colocated(grid: GridConfig, world_size: int) -> None:
    if grid.llm_only:
        raise ValueError("--colocated and --llm-only exclude each other (--llm-only has no encoder)")
    if grid.llm_pp != 1:
        raise ValueError(f"--colocated needs --llm-pp 1, not {grid.llm_pp} (megatron-core's "
                         f"colocated MimoModel has no pipeline)")
    sizes = (f"--encoder-tp {grid.encoder_tp} x --encoder-dp {grid.encoder_dp} = {grid.encoder_size}"
             f", --llm-tp {grid.llm_tp} x --llm-dp {grid.llm_dp} = {grid.llm_size}")
    if grid.encoder_size != world_size or grid.llm_size != world_size:
        raise ValueError(f"--colocated puts both modules on all {world_size} ranks: {sizes}")


def build_batch(grid: GridConfig, given: BatchConfig) -> BatchConfig:
    """``given`` as the flags say, with its micro-batches per iteration."""
    micro, global_ = given.micro_batch_size, given.global_batch_size
    for flag_, value in (("--micro-batch-size", micro), ("--global-batch-size", global_),
                         ("--seq-length", given.seq_length)):
        if value < 1:
            raise ValueError(f"{flag_} {value} must be >= 1")
    lanes = micro * grid.llm_dp
    if global_ % lanes:
        raise ValueError(
            f"--global-batch-size {global_} must be divisible by --micro-batch-size {micro} "
            f"x --llm-dp {grid.llm_dp} = {lanes}")
    if not grid.llm_only and lanes % grid.encoder_dp:
        raise ValueError(
            f"--micro-batch-size {micro} x --llm-dp {grid.llm_dp} = {lanes} must be divisible by "
            f"--encoder-dp {grid.encoder_dp}")
    return replace(given, num_microbatches=global_ // lanes)


def validate_model_fit(grid: GridConfig, facts: ModelFacts) -> None:
    if facts.llm_num_layers % grid.llm_pp:
        raise ValueError(
            f"--llm-pp {grid.llm_pp} must divide the LLM's {facts.llm_num_layers} layers")
    if facts.llm_num_heads % grid.llm_tp:
        raise ValueError(
            f"--llm-tp {grid.llm_tp} must divide the LLM's {facts.llm_num_heads} attention heads")
    if facts.llm_num_query_groups % grid.llm_tp:
        raise ValueError(
            f"--llm-tp {grid.llm_tp} must divide the LLM's {facts.llm_num_query_groups} query groups")
    if facts.llm_vocab_size % grid.llm_tp:
        # megatron-core splits the embedding and output rows over TP without padding them (an
        # imported vocabulary must keep its size); it would stop only after the process groups
        raise ValueError(f"--llm-tp {grid.llm_tp} must divide the LLM's vocabulary of "
                         f"{facts.llm_vocab_size}")
    if not grid.llm_only and facts.encoder_num_heads % grid.encoder_tp:
        raise ValueError(
            f"--encoder-tp {grid.encoder_tp} must divide the encoder's "
            f"{facts.encoder_num_heads} attention heads")
    if grid.llm_ep > 1 and not facts.num_experts:
        raise ValueError(f"--llm-ep {grid.llm_ep} needs a MoE language model (it has no experts)")
    if facts.num_experts and facts.num_experts % grid.llm_ep:
        raise ValueError(
            f"--llm-ep {grid.llm_ep} must divide the LLM's {facts.num_experts} experts")


def validate_sequence_parallel(grid: GridConfig, facts: ModelFacts, seq_length: int) -> None:
    if grid.sequence_parallel:
        if not facts.sequence_parallel:
            raise ValueError("--sequence-parallel: this --model-provider's language model cannot "
                             "split its sequence")
        if grid.llm_tp == 1:
            raise ValueError("--sequence-parallel needs --llm-tp > 1 (it splits the sequence over "
                             "the LLM's TP ranks), not --llm-tp 1")
        if seq_length % grid.llm_tp:
            raise ValueError(f"--seq-length {seq_length} must be divisible by --llm-tp "
                             f"{grid.llm_tp} with --sequence-parallel")
    elif facts.num_experts and grid.llm_tp > 1:
        # megatron-core's TransformerConfig refuses it, after the process groups exist
        raise ValueError(f"--llm-tp {grid.llm_tp} with experts needs --sequence-parallel")


def build_schedule(args: argparse.Namespace, global_batch: int) -> ScheduleConfig:
    if (args.train_iters is None) == (args.train_samples is None):
        raise ValueError(
            f"give exactly one of --train-iters ({args.train_iters}) and "
            f"--train-samples ({args.train_samples})")
    sample_based = args.train_samples is not None
    unit, other = ("samples", "iters") if sample_based else ("iters", "samples")
    for name in ("lr_warmup", "lr_decay", "lr_wsd_decay"):
        if getattr(args, f"{name}_{other}") is not None:
            raise ValueError(
                f"--{name.replace('_', '-')}-{other} cannot be used with --train-{unit}; "
                f"use --{name.replace('_', '-')}-{unit}")

    def samples(name: str, default: Optional[int]) -> Optional[int]:
        value = getattr(args, f"{name}_{unit}")
        if value is None:
            return default
        if value < 0:
            raise ValueError(f"--{name.replace('_', '-')}-{unit} {value} must be >= 0")
        return value if sample_based else value * global_batch

    if sample_based:
        if args.train_samples < 1:
            raise ValueError(f"--train-samples {args.train_samples} must be >= 1")
        train_iters = math.ceil(args.train_samples / global_batch)
    else:
        if args.train_iters < 1:
            raise ValueError(f"--train-iters {args.train_iters} must be >= 1")
        train_iters = args.train_iters
    warmup = samples("lr_warmup", 0)
    decay = samples("lr_decay", train_iters * global_batch)
    wsd = samples("lr_wsd_decay", None)
    if decay < 1:
        raise ValueError(f"--lr-decay-{unit} must be >= 1")
    if warmup >= decay:
        raise ValueError(f"--lr-warmup-{unit} ({warmup} samples) must be < --lr-decay-{unit} "
                         f"({decay} samples)")
    if args.lr_decay_style == "WSD":
        if wsd is None or args.lr_wsd_decay_style is None:
            raise ValueError(f"--lr-decay-style WSD needs --lr-wsd-decay-{unit} and "
                             f"--lr-wsd-decay-style")
        if not 0 < wsd <= decay - warmup:
            raise ValueError(f"--lr-wsd-decay-{unit} ({wsd} samples) must be in (0, decay - warmup "
                             f"= {decay - warmup} samples]")
    elif wsd is not None or args.lr_wsd_decay_style is not None:
        raise ValueError(f"--lr-wsd-decay-{unit}/--lr-wsd-decay-style need --lr-decay-style WSD "
                         f"(got {args.lr_decay_style})")
    if args.lr <= 0 or not 0 <= args.min_lr <= args.lr:
        raise ValueError(f"need --lr > 0 and 0 <= --min-lr <= --lr (got {args.lr}, {args.min_lr})")
    if args.weight_decay < 0:
        raise ValueError(f"--weight-decay {args.weight_decay} must be >= 0")
    return ScheduleConfig(**read(ScheduleConfig, args), train_iters=train_iters,
                          warmup_samples=warmup, decay_samples=decay, wsd_decay_samples=wsd)


def build_checkpoint_config(args: argparse.Namespace) -> CheckpointConfig:
    for flag, value in (("--save-interval", args.save_interval), ("--exit-interval", args.exit_interval)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value} must be >= 1")
    if args.keep_latest_checkpoints < 0:
        raise ValueError(f"--keep-latest-checkpoints {args.keep_latest_checkpoints} must be >= 0")
    if args.keep_latest_checkpoints and args.save is None:
        raise ValueError(f"--keep-latest-checkpoints {args.keep_latest_checkpoints} needs --save")
    if args.save_interval is not None and args.save is None:
        raise ValueError(f"--save-interval {args.save_interval} needs --save")
    if args.no_save_optim and args.save is None:
        raise ValueError("--no-save-optim needs --save")
    load_flags = [f for f, v in (("--no-load-optim", args.no_load_optim),
                                 ("--no-load-rng", args.no_load_rng),
                                 ("--no-load-scheduler", args.no_load_scheduler),
                                 ("--finetune", args.finetune),
                                 ("--override-opt_param-scheduler", args.override_opt_param_scheduler),
                                 ("--use-checkpoint-opt_param-scheduler",
                                  args.use_checkpoint_opt_param_scheduler)) if v]
    if load_flags and args.load is None:
        raise ValueError(f"{', '.join(load_flags)} need --load")
    if args.llm_only and args.load_vision_from is not None:
        raise ValueError("--load-vision-from has no encoder to load into with --llm-only")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ValueError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler "
                         "exclude each other")
    if args.allow_existing_save and args.save is None:
        raise ValueError("--allow-existing-save needs --save")
    if args.exit_duration_in_mins is not None and args.exit_duration_in_mins <= 0:
        raise ValueError(f"--exit-duration-in-mins {args.exit_duration_in_mins} must be > 0")
    exits = [f for f, v in (("--exit-signal-handler", args.exit_signal_handler),
                            ("--exit-duration-in-mins", args.exit_duration_in_mins)) if v]
    if exits and args.save is None:
        raise ValueError(f"{', '.join(exits)} save before exiting: needs --save")
    return CheckpointConfig(**read(CheckpointConfig, args),
                            exit_signal=args.exit_signal if args.exit_signal_handler else None)


def describe(cfg: TrainConfig, facts: ModelFacts) -> str:
    """The resolved layout, for --dry-run: ranks of each grid, lanes, micro-batches, parameters."""
    g, b = cfg.grid, cfg.batch
    lines = [f"world size {g.world_size}"]
    if not g.llm_only:
        lines.append(f"  encoder grid: ranks 0-{g.encoder_size - 1}, tp {g.encoder_tp} x dp "
                     f"{g.encoder_dp}")
    if g.colocated:
        lines.append("  colocated: both modules on every rank, each with its own TP/DP (no bridge)")
    lines.append(f"  LLM grid: ranks {g.llm_offset}-{g.world_size - 1}, tp {g.llm_tp} x pp "
                 f"{g.llm_pp} x dp {g.llm_dp}; experts: ep {g.llm_ep} x expt-tp {g.llm_expt_tp} "
                 f"x expt-dp {g.llm_expt_dp}")
    lines.append(f"batch: global {b.global_batch_size} = micro-batch {b.micro_batch_size} x "
                 f"{g.llm_dp} lanes (LLM DP) x {b.num_microbatches} micro-batches; seq "
                 f"{b.seq_length}")
    if not g.llm_only:
        per_rank = b.micro_batch_size * g.llm_dp // g.encoder_dp
        kind = ("fan-out" if g.encoder_dp < g.llm_dp else "one-to-one" if g.encoder_dp == g.llm_dp
                else "fan-in")
        lines.append(f"  each encoder DP rank encodes the images of {per_rank} samples per "
                     f"micro-batch: {Fraction(g.llm_dp, g.encoder_dp)} lane(s), {kind}")
        lines.append(f"parameters: encoder {facts.encoder_params:,} (ViT + projector), LLM "
                     f"{facts.llm_params:,}")
    else:
        lines.append(f"parameters: LLM {facts.llm_params:,}")
    s = cfg.schedule
    lines.append(f"training: {s.train_iters} iterations, {s.train_iters * b.global_batch_size} "
                 f"samples, {cfg.model_provider} model, {cfg.data_provider} data")
    return "\n".join(lines)
