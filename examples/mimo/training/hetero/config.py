"""Command-line flags -> frozen per-concern configs, validated by pure functions.

Nothing here imports torch.distributed: every check runs before a process group exists.
"""

from __future__ import annotations

import argparse
import math
from fractions import Fraction
from dataclasses import dataclass
from typing import Optional, Sequence

from examples.mimo.data import DATA_PROVIDERS
from examples.mimo.interfaces import ModelFacts
from examples.mimo.model_providers import MODEL_PROVIDERS
from examples.mimo.training.hetero import graphs, kernels, profiling
from examples.mimo.training.hetero.exits import SIGNALS

DECAY_STYLES = ("constant", "linear", "cosine", "WSD")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")


@dataclass(frozen=True)
class GridConfig:
    encoder_tp: int
    encoder_dp: int
    llm_tp: int
    llm_pp: int
    llm_dp: int
    llm_ep: int
    llm_expt_tp: int
    llm_only: bool
    colocated: bool = False  # both modules on every rank, each with its own TP/DP; no bridge
    sequence_parallel: bool = False  # the LLM's TP regions split the sequence (LLM branch only)

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
    micro_batch_size: int
    global_batch_size: int
    seq_length: int
    num_microbatches: int


@dataclass(frozen=True)
class ScheduleConfig:
    """Everything in samples, as OptimizerParamScheduler steps by the global batch."""

    train_iters: int
    lr: float
    min_lr: float
    warmup_samples: int
    decay_samples: int
    decay_style: str
    wsd_decay_samples: Optional[int]
    wsd_decay_style: Optional[str]
    weight_decay: float


@dataclass(frozen=True)
class OptimConfig:
    clip_grad: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    max_consecutive_skipped_iters: int  # 0: never stop
    check_for_spiky_loss: bool = True  # divergence.py
    check_for_large_grads: bool = False
    spiky_loss_factor: float = 10.0


@dataclass(frozen=True)
class DDPConfig:
    overlap_grad_reduce: bool
    bucket_size: Optional[int]


@dataclass(frozen=True)
class RuntimeConfig:
    device: str  # auto | cuda | cpu; resolved by device.py
    bf16: bool
    seed: int
    distributed_timeout_minutes: float
    dry_run: bool


@dataclass(frozen=True)
class LogConfig:
    log_interval: int
    metrics_file: Optional[str]
    tensorboard_dir: Optional[str]
    eval_interval: Optional[int]  # validation every N iterations and at the end; None: never
    eval_iters: int  # validation global batches per evaluation


@dataclass(frozen=True)
class CheckpointConfig:
    save: Optional[str]
    load: Optional[str]
    save_interval: Optional[int]
    exit_interval: Optional[int]
    no_save_optim: bool
    no_load_optim: bool
    no_load_rng: bool
    no_load_scheduler: bool
    finetune: bool
    load_language_from: Optional[str]
    load_vision_from: Optional[str]
    allow_existing_save: bool
    override_opt_param_scheduler: bool
    use_checkpoint_opt_param_scheduler: bool
    exit_signal: Optional[str] = None  # --exit-signal-handler: the signal that makes ranks save and exit
    exit_duration_mins: Optional[float] = None
    keep_latest_checkpoints: int = 0  # 0: keep all


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
    model_provider: str
    model: object  # the provider's own frozen config
    data_provider: str
    data: object  # the data provider's own frozen config
    kernels: kernels.KernelConfig = kernels.KernelConfig()
    profile: profiling.ProfileConfig = profiling.ProfileConfig()


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
    g = p.add_argument_group("hetero grids")
    g.add_argument("--encoder-tp", type=int, default=1, help="Encoder tensor-parallel size.")
    g.add_argument("--encoder-dp", type=int, default=1, help="Encoder data-parallel size.")
    g.add_argument("--llm-tp", type=int, default=1, help="LLM tensor-parallel size.")
    g.add_argument("--llm-pp", type=int, default=1, help="LLM pipeline-parallel size.")
    g.add_argument("--llm-dp", type=int, default=1, help="LLM data-parallel size (one lane each).")
    g.add_argument("--llm-ep", type=int, default=1, help="LLM expert-parallel size.")
    g.add_argument("--llm-expt-tp", type=int, default=None,
                   help="LLM expert tensor-parallel size (default: --llm-tp).")
    g.add_argument("--llm-only", action="store_true", help="No encoder grid; text-only LLM training.")
    g.add_argument("--colocated", action="store_true",
                   help="Both modules on every rank (megatron-core's COLOCATED MimoModel), each "
                        "with its own TP/DP; --encoder-tp x --encoder-dp = --llm-tp x --llm-dp = "
                        "world size. The baseline a hetero layout is measured against.")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="Split the LLM's sequence over its --llm-tp ranks outside the TP matmuls "
                        "(MimoModel scatters the combined text and image embeddings); megatron-core "
                        "needs it for experts with --llm-tp > 1. The encoder's layers are not split.")
    g.add_argument("--context-parallel-size", type=int, default=1, help="Must be 1 (not supported).")

    b = p.add_argument_group("batch")
    b.add_argument("--micro-batch-size", type=int, default=2, help="Samples per LLM micro-batch.")
    b.add_argument("--global-batch-size", type=int, default=8, help="Samples per iteration.")
    b.add_argument("--seq-length", type=int, default=64, help="Tokens per sample.")

    t = p.add_argument_group("training and learning-rate schedule")
    t.add_argument("--train-iters", type=int, default=None, help="Iterations to train.")
    t.add_argument("--train-samples", type=int, default=None,
                   help="Samples to train; iterations = ceil(samples / global batch).")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--min-lr", type=float, default=0.0)
    t.add_argument("--lr-warmup-iters", type=int, default=None)
    t.add_argument("--lr-warmup-samples", type=int, default=None)
    t.add_argument("--lr-decay-iters", type=int, default=None, help="Default: the whole run.")
    t.add_argument("--lr-decay-samples", type=int, default=None, help="Default: the whole run.")
    t.add_argument("--lr-decay-style", choices=DECAY_STYLES, default="cosine")
    t.add_argument("--lr-wsd-decay-iters", type=int, default=None)
    t.add_argument("--lr-wsd-decay-samples", type=int, default=None)
    t.add_argument("--lr-wsd-decay-style", choices=WSD_DECAY_STYLES, default=None)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--clip-grad", type=float, default=1.0, help="Global grad-norm clip; 0 disables.")
    t.add_argument("--adam-beta1", type=float, default=0.9)
    t.add_argument("--adam-beta2", type=float, default=0.999)
    t.add_argument("--adam-eps", type=float, default=1e-8)
    t.add_argument("--max-consecutive-skipped-iters", type=int, default=10,
                   help="Stop with an error after this many iterations in a row were skipped for "
                        "non-finite gradients (a diverging run); 0 never stops.")
    t.add_argument("--check-for-spiky-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="Stop with an error (exit 1, no further save) when the loss exceeds "
                        "--spiky-loss-factor x the largest of the last 100 iterations' (a "
                        "diverging run whose loss stays finite). On by default, unlike Megatron.")
    t.add_argument("--check-for-large-grads", action=argparse.BooleanOptionalAction,
                   default=False, help="The same test on the grad norm.")
    t.add_argument("--spiky-loss-factor", type=float, default=10.0,
                   help="The factor of both checks (Megatron's fixed value: 10).")

    d = p.add_argument_group("distributed data parallel")
    d.add_argument("--overlap-grad-reduce", action="store_true",
                   help="Overlap the LLM's grad reduce with backward. The encoder never overlaps: "
                        "text-only steps leave its buckets without grads.")
    d.add_argument("--ddp-bucket-size", type=int, default=None, help="Elements per DDP bucket.")

    r = p.add_argument_group("runtime")
    r.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="cpu runs megatron-core on gloo (see device.py).")
    r.add_argument("--bf16", action="store_true", help="bf16 params and compute (CUDA only).")
    r.add_argument("--seed", type=int, default=1234)
    r.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                   help="Collective timeout; a stuck job ends within it.")
    r.add_argument("--dry-run", action="store_true",
                   help="Validate, print the resolved layout (grids, lanes, micro-batches, "
                        "parameters per branch) and exit; WORLD_SIZE gives the world size.")

    lg = p.add_argument_group("logging")
    lg.add_argument("--log-interval", type=int, default=1)
    lg.add_argument("--metrics-file", default=None,
                    help="JSON lines of per-iteration metrics, written by the logging rank.")
    lg.add_argument("--tensorboard-dir", default=None,
                    help="TensorBoard event files (Megatron's scalar names), logging rank.")
    lg.add_argument("--eval-interval", type=int, default=None,
                    help="Validation loss every N iterations and after the last one.")
    lg.add_argument("--eval-iters", type=int, default=10,
                    help="Global batches of the validation split per evaluation.")

    c = p.add_argument_group("checkpointing")
    c.add_argument("--save", default=None, help="Directory for checkpoints (iter_NNNNNNN/).")
    c.add_argument("--load", default=None,
                   help="Resume from the latest checkpoint here. An empty directory starts fresh; "
                        "a missing one only when it is also --save (auto-resume).")
    c.add_argument("--save-interval", type=int, default=None, help="Iterations between saves.")
    c.add_argument("--exit-interval", type=int, default=None,
                   help="Stop (after saving, with --save) once the iteration is a multiple of this.")
    c.add_argument("--exit-signal-handler", action="store_true",
                   help="On --exit-signal every rank finishes its iteration, saves and exits 0.")
    c.add_argument("--exit-signal", choices=SIGNALS, default="SIGTERM",
                   help="The signal --exit-signal-handler acts on (SLURM: --signal=...).")
    c.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="Save and exit once the job has run this long (before its time limit).")
    c.add_argument("--keep-latest-checkpoints", type=int, default=0,
                   help="After each save keep only the newest N iterations in --save (0: all); "
                        "the one this job resumed from and the newest known good one are kept "
                        "too. Each deletion is logged.")
    c.add_argument("--no-save-optim", action="store_true", help="Save model weights only.")
    c.add_argument("--no-load-optim", action="store_true", help="Do not load optimizer state.")
    c.add_argument("--no-load-rng", action="store_true", help="Do not load RNG state.")
    c.add_argument("--no-load-scheduler", action="store_true", help="Do not load the LR schedule.")
    c.add_argument("--finetune", action="store_true",
                   help="Load model weights only and start at iteration 0.")
    c.add_argument("--load-language-from", default=None,
                   help="Single-grid Megatron dist-checkpoint of the language model to start from.")
    c.add_argument("--load-vision-from", default=None,
                   help="Single-grid Megatron dist-checkpoint of the vision encoder to start from.")
    c.add_argument("--allow-existing-save", action="store_true",
                   help="Let --save be a directory holding checkpoints this run does not resume "
                        "(or the one --finetune loads from); its tracker will move to this run's.")
    c.add_argument("--override-opt_param-scheduler", action="store_true",
                   help="On resume, use this run's LR/WD schedule flags, not the checkpoint's.")
    c.add_argument("--use-checkpoint-opt_param-scheduler", action="store_true",
                   help="On resume, keep the checkpoint's LR/WD schedule, whatever the flags say.")

    kernels.add_args(p)
    profiling.add_args(p)

    pr = p.add_argument_group("providers")
    pr.add_argument("--model-provider", default=model_provider, help=f"One of {sorted(MODEL_PROVIDERS)}.")
    pr.add_argument("--data-provider", default=data_provider, help=f"One of {sorted(DATA_PROVIDERS)}.")
    lookup("--model-provider", MODEL_PROVIDERS, model_provider).add_args(p)
    lookup("--data-provider", DATA_PROVIDERS, data_provider).add_args(p)
    return p


def lookup(flag: str, registry: dict, name: str):
    if name not in registry:
        raise ValueError(f"{flag} {name!r} is unknown; known: {sorted(registry)}")
    return registry[name]


def parse_config(argv: Sequence[str], world_size: int) -> TrainConfig:
    """Parse and validate; raises ValueError naming the offending flags."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--model-provider", default="mock")
    pre.add_argument("--data-provider", default="mock")
    names, _ = pre.parse_known_args(argv)
    args = build_parser(names.model_provider, names.data_provider).parse_args(argv)
    return config_from_args(args, world_size)


def config_from_args(args: argparse.Namespace, world_size: int) -> TrainConfig:
    model_provider = lookup("--model-provider", MODEL_PROVIDERS, args.model_provider)
    data_provider = lookup("--data-provider", DATA_PROVIDERS, args.data_provider)
    model_cfg = model_provider.config_from_args(args)
    data_cfg = data_provider.config_from_args(args)
    grid = GridConfig(
        encoder_tp=args.encoder_tp, encoder_dp=args.encoder_dp, llm_tp=args.llm_tp,
        llm_pp=args.llm_pp, llm_dp=args.llm_dp, llm_ep=args.llm_ep,
        llm_expt_tp=args.llm_tp if args.llm_expt_tp is None else args.llm_expt_tp,
        llm_only=args.llm_only, colocated=args.colocated, sequence_parallel=args.sequence_parallel,
    )
    if args.context_parallel_size != 1:
        raise ValueError(
            f"--context-parallel-size {args.context_parallel_size}: only 1 is supported")
    validate_grid(grid, world_size)
    batch = build_batch(grid, args.micro_batch_size, args.global_batch_size, args.seq_length)
    facts = model_provider.facts(model_cfg)
    validate_model_fit(grid, facts)
    validate_sequence_parallel(grid, facts, batch.seq_length)
    kernel_cfg = kernels.from_args(args, transformer_impl=facts.transformer_impl,
                                   moe_activation=facts.moe_activation, expert_tp=grid.llm_expt_tp)
    graphs.validate(kernel_cfg, facts=facts, llm_pp=grid.llm_pp,
                    packs_sequences=data_provider.packs_sequences(data_cfg))
    data_provider.validate(data_cfg, model_provider.data_spec(model_cfg), batch.seq_length,
                           equal_images=equal_images_reason(grid), llm_only=grid.llm_only)
    runtime = RuntimeConfig(device=args.device, bf16=args.bf16, seed=args.seed,
                            distributed_timeout_minutes=args.distributed_timeout_minutes,
                            dry_run=args.dry_run)
    if args.bf16 and args.device == "cpu":
        raise ValueError("--bf16 needs --device cuda (gloo on CPU runs fp32)")
    if args.distributed_timeout_minutes <= 0:
        raise ValueError(f"--distributed-timeout-minutes {args.distributed_timeout_minutes} must be > 0")
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
        optim=OptimConfig(clip_grad=args.clip_grad, adam_beta1=args.adam_beta1,
                          adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
                          max_consecutive_skipped_iters=args.max_consecutive_skipped_iters,
                          check_for_spiky_loss=args.check_for_spiky_loss,
                          check_for_large_grads=args.check_for_large_grads,
                          spiky_loss_factor=args.spiky_loss_factor),
        ddp=DDPConfig(overlap_grad_reduce=args.overlap_grad_reduce, bucket_size=args.ddp_bucket_size),
        runtime=runtime,
        log=LogConfig(log_interval=args.log_interval, metrics_file=args.metrics_file,
                      tensorboard_dir=args.tensorboard_dir, eval_interval=args.eval_interval,
                      eval_iters=args.eval_iters),
        ckpt=ckpt,
        model_provider=args.model_provider,
        model=model_cfg,
        data_provider=args.data_provider,
        data=data_cfg,
        kernels=kernel_cfg,
        profile=profiling.from_args(args, train_iters=schedule.train_iters),
    )


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


def build_batch(grid: GridConfig, micro: int, global_: int, seq: int) -> BatchConfig:
    for flag, value in (("--micro-batch-size", micro), ("--global-batch-size", global_),
                        ("--seq-length", seq)):
        if value < 1:
            raise ValueError(f"{flag} {value} must be >= 1")
    lanes = micro * grid.llm_dp
    if global_ % lanes:
        raise ValueError(
            f"--global-batch-size {global_} must be divisible by --micro-batch-size {micro} "
            f"x --llm-dp {grid.llm_dp} = {lanes}")
    if not grid.llm_only and lanes % grid.encoder_dp:
        raise ValueError(
            f"--micro-batch-size {micro} x --llm-dp {grid.llm_dp} = {lanes} must be divisible by "
            f"--encoder-dp {grid.encoder_dp}")
    return BatchConfig(micro_batch_size=micro, global_batch_size=global_, seq_length=seq,
                       num_microbatches=global_ // lanes)


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
    return ScheduleConfig(
        train_iters=train_iters, lr=args.lr, min_lr=args.min_lr, warmup_samples=warmup,
        decay_samples=decay, decay_style=args.lr_decay_style, wsd_decay_samples=wsd,
        wsd_decay_style=args.lr_wsd_decay_style, weight_decay=args.weight_decay)


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
    return CheckpointConfig(
        save=args.save, load=args.load, save_interval=args.save_interval,
        exit_interval=args.exit_interval, no_save_optim=args.no_save_optim,
        no_load_optim=args.no_load_optim, no_load_rng=args.no_load_rng,
        no_load_scheduler=args.no_load_scheduler, finetune=args.finetune,
        load_language_from=args.load_language_from, load_vision_from=args.load_vision_from,
        allow_existing_save=args.allow_existing_save,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        exit_signal=args.exit_signal if args.exit_signal_handler else None,
        exit_duration_mins=args.exit_duration_in_mins,
        keep_latest_checkpoints=args.keep_latest_checkpoints)


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
