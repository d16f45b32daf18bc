"""megatron-core's own training loop (``megatron.training.pretrain``) on the language model of a
train_hetero configuration: the same hybrid LLM, batch, optimizer and kernel options, Megatron's
mock GPT data. The yardstick for our LLM-only ms/iteration on the same GPU:

    python examples/mimo/scripts/megatron_yardstick.py --warmup 4 --measure 8 -- TRAIN_HETERO_FLAGS

prints the mean ms/iteration of iterations warmup+1 .. warmup+measure (Megatron's line at
--log-interval 1; its first interval also holds start-up), the statistic of our interval rows.
With ``--startup ROUNDS`` it times instead, from launch to the end of the first iteration (its
log line), our train_hetero and megatron.training on the same flags, alternating ROUNDS times,
and prints each run, the means and their ratio.
Needs Python 3.12 (megatron.training), transformer-engine (its only hybrid specs), one GPU. Differences that remain: Megatron's mixer is the stock
MambaMixer (ours subclasses it for packed samples only: unpacked batches take the same path);
its data are MockGPTDataset tokens, ours the mock provider's.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from typing import List, Optional

ENTRY = "--megatron-entry"
LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([\d.]+)")
FIRST_ITERATION = re.compile(r"iteration\s+1/\s*\d+ \|")  # both loops' first interval line
LAYOUT = ["--llm-only", "--llm-dp", "1"]


def megatron_flags(cfg, *, train_iters: int) -> List[str]:
    """megatron.training flags for the language model of ``cfg`` (a nemotron_moe_vlm TrainConfig),
    read off the TransformerConfig our provider builds for it, so the two cannot drift apart."""
    if cfg.model_provider != "nemotron_moe_vlm":
        raise ValueError(f"--model-provider {cfg.model_provider}: the yardstick builds the Nemotron "
                         f"hybrid LLM only")
    import torch

    from examples.mimo.model_providers.nemotron_moe_vlm import language_config

    m, b = cfg.model, cfg.batch
    t = language_config(m, tp=1, pp=1, ep=1, expt_tp=1, kernels=cfg.kernels,
                        dtype=torch.bfloat16 if cfg.runtime.bf16 else torch.float32)
    if t.activation_func.__name__ != "squared_relu" or t.gated_linear_unit or t.add_bias_linear:
        raise ValueError("the yardstick maps the Nemotron MLP (squared ReLU, no GLU, no biases)")
    flags = [
        "--hybrid-layer-pattern", m.arch.hybrid_layer_pattern, "--hidden-size", t.hidden_size,
        "--ffn-hidden-size", t.ffn_hidden_size, "--num-attention-heads", t.num_attention_heads,
        "--kv-channels", t.kv_channels, "--group-query-attention",
        "--num-query-groups", t.num_query_groups,
        "--mamba-num-heads", t.mamba_num_heads, "--mamba-head-dim", t.mamba_head_dim,
        "--mamba-state-dim", t.mamba_state_dim, "--mamba-num-groups", t.mamba_num_groups,
        "--num-experts", t.num_moe_experts, "--moe-ffn-hidden-size", t.moe_ffn_hidden_size,
        "--moe-shared-expert-intermediate-size", t.moe_shared_expert_intermediate_size,
        "--moe-router-topk", t.moe_router_topk,
        "--moe-router-score-function", t.moe_router_score_function,
        "--moe-router-topk-scaling-factor", t.moe_router_topk_scaling_factor,
        "--moe-router-dtype", t.moe_router_dtype,
        "--moe-router-load-balancing-type", t.moe_router_load_balancing_type,
        "--moe-aux-loss-coeff", t.moe_aux_loss_coeff,
        "--moe-token-dispatcher-type", t.moe_token_dispatcher_type,
        "--squared-relu", "--normalization", t.normalization, "--disable-bias-linear",
        "--init-method-std", t.init_method_std, "--position-embedding-type", "none",
        "--untie-embeddings-and-output-weights", "--attention-dropout", t.attention_dropout,
        "--hidden-dropout", t.hidden_dropout,
        "--seq-length", b.seq_length, "--max-position-embeddings", b.seq_length,
        "--micro-batch-size", b.micro_batch_size, "--global-batch-size", b.global_batch_size,
        "--train-iters", train_iters, "--lr", cfg.schedule.lr, "--min-lr", cfg.schedule.min_lr,
        "--lr-decay-style", "constant", "--clip-grad", cfg.optim.clip_grad,
        "--adam-beta1", cfg.optim.adam_beta1, "--adam-beta2", cfg.optim.adam_beta2,
        "--adam-eps", cfg.optim.adam_eps, "--use-distributed-optimizer",
        "--transformer-impl", m.transformer_impl, "--seed", cfg.runtime.seed,
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", m.arch.vocab_size,
        # Megatron's loader would build a [seq, seq] mask per sample; both stacks attend causally.
        "--no-create-attention-mask-in-dataloader",
        # without apex the output layer's fused weight-gradient accumulation raises
        "--no-gradient-accumulation-fusion",
        "--eval-iters", 0, "--eval-interval", 10 ** 6, "--log-interval", 1,
        "--timing-log-level", 0,  # levels 1-2 synchronise around every timed span
    ]
    switches = {"--bf16": t.bf16, "--use-cpu-initialization": t.use_cpu_initialization,
                "--calculate-per-token-loss": t.calculate_per_token_loss,
                "--moe-router-enable-expert-bias": t.moe_router_enable_expert_bias,
                "--moe-grouped-gemm": t.moe_grouped_gemm,
                "--disable-mamba-mem-eff-path": not t.use_mamba_mem_eff_path,
                "--moe-pad-expert-input-to-capacity": t.moe_pad_expert_input_to_capacity,
                "--moe-router-fusion": t.moe_router_fusion,
                "--moe-permute-fusion": t.moe_permute_fusion,
                "--cross-entropy-loss-fusion": t.cross_entropy_loss_fusion,
                "--use-transformer-engine-op-fuser": t.use_transformer_engine_op_fuser,
                "--use-fused-weighted-squared-relu": t.use_fused_weighted_squared_relu,
                # megatron's default compiles the residual add (torch.compile); ours adds eagerly
                "--no-bias-dropout-fusion": not t.bias_dropout_fusion}
    flags += [flag for flag, on in switches.items() if on]
    if t.moe_expert_capacity_factor is not None:
        flags += ["--moe-expert-capacity-factor", t.moe_expert_capacity_factor,
                  "--moe-token-drop-policy", t.moe_token_drop_policy]
    if t.fp8 is not None:
        flags += ["--fp8-format", t.fp8, "--fp8-recipe", t.fp8_recipe, "--fp8-margin", t.fp8_margin,
                  "--fp8-amax-history-len", t.fp8_amax_history_len,
                  "--fp8-amax-compute-algo", t.fp8_amax_compute_algo]
    if t.recompute_granularity is not None:
        flags += ["--recompute-granularity", t.recompute_granularity]
        if t.recompute_granularity == "full":
            flags += ["--recompute-method", t.recompute_method,
                      "--recompute-num-layers", t.recompute_num_layers]
        else:
            flags += ["--recompute-modules", *t.recompute_modules]
    if t.cross_entropy_loss_fusion:
        flags += ["--cross-entropy-fusion-impl", t.cross_entropy_fusion_impl]
    return [str(f) for f in flags]


def _pretrain() -> None:
    """The torchrun entry: sys.argv holds Megatron's flags only (pretrain re-reads them)."""
    import torch

    from examples.mimo.training.hetero.compat import import_mamba_triton_kernels

    # the same workaround our runs apply: without it a pure-Python mamba-ssm reads as missing
    import_mamba_triton_kernels()
    from megatron.core.datasets import utils as dataset_utils

    # initialize_megatron runs `make` in megatron/core/datasets to build its helpers; the wheel
    # ships them built but no Makefile, so make fails and the run exits.
    dataset_utils.compile_helpers = lambda: None
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset
    from megatron.core.enums import ModelType
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training import get_args, pretrain
    from megatron.training.argument_utils import hybrid_config_from_args, pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    def datasets(num_samples, vp_stage=None):
        args = get_args()
        config = GPTDatasetConfig(
            random_seed=args.seed, sequence_length=args.seq_length, blend=None, split=args.split,
            tokenizer=build_tokenizer(args), reset_position_ids=False, reset_attention_mask=False,
            eod_mask_loss=False, create_attention_mask=False, path_to_cache=None,
            mmap_bin_files=True)
        return BlendedMegatronDatasetBuilder(MockGPTDataset, num_samples, lambda: True, config).build()

    datasets.is_distributed = True

    def loss_func(loss_mask, per_token_loss):
        mask = loss_mask.reshape(-1).float()
        loss_sum = (per_token_loss.reshape(-1).float() * mask).sum()
        tokens = mask.sum().to(torch.int)
        return loss_sum, tokens, {"lm loss": torch.cat([loss_sum.detach().view(1),
                                                        tokens.detach().float().view(1)])}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        tokens, labels, loss_mask, position_ids = (
            batch[k].cuda(non_blocking=True) for k in ("tokens", "labels", "loss_mask", "position_ids"))
        output = model(tokens, position_ids, None, labels=labels, loss_mask=loss_mask)
        return output, lambda out: loss_func(loss_mask, out)

    args = parse_and_validate_args()
    cfg = pretrain_cfg_container_from_args(args, hybrid_config_from_args(args))
    pretrain(cfg, datasets, ModelType.encoder_or_decoder, forward_step)


# a Python exception's last line, as a rank prints it ("[rank0]: " under torchrun's log prefix)
ERROR_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?((?:[\w.]*\.)?\w*(?:Error|Exception)\b:.*)$", re.M)


def failure_line(log_text: str) -> str:
    """The first exception a failed run raised (the root cause; torchrun's ChildFailedError
    trailer is not it), or the log's last two lines."""
    for m in ERROR_LINE.finditer(log_text):
        if "ChildFailedError" not in m.group(1):
            return m.group(1).strip()[:300]
    return " / ".join(log_text.strip().splitlines()[-2:])[-300:]


def mean_ms(log_text: str, first: int, last: int) -> float:
    times = {int(i): float(ms) for i, ms in LINE.findall(log_text)}
    window = [times[i] for i in range(first, last + 1) if i in times]
    if len(window) != last - first + 1:
        raise ValueError(f"megatron logged iterations {sorted(times)[:3]}..{sorted(times)[-3:]}; "
                         f"needed {first}-{last}")
    return sum(window) / len(window)


def run(train_hetero_flags: List[str], *, warmup: int, measure: int, log: str,
        profile_dir: Optional[str] = None, profiled: int = 2) -> float:
    """Mean ms/iteration of megatron.training on ``train_hetero_flags``' language model. With
    ``profile_dir``, ``profiled`` more iterations run under megatron's own torch profiler, which
    writes ``profile_dir/torch_profile/rank-0.json.gz`` (the measured ones are not profiled)."""
    end = warmup + measure
    cfg = te_config([*LAYOUT, *train_hetero_flags, "--train-iters", str(end)])
    flags = megatron_flags(cfg, train_iters=end + (profiled if profile_dir else 0))
    if profile_dir:
        # megatron writes the trace to tensorboard_dir/../torch_profile
        flags += ["--profile", "--use-pytorch-profiler", "--profile-step-start", str(end),
                  "--profile-step-end", str(end + profiled), "--profile-ranks", "0",
                  "--tensorboard-dir", os.path.join(profile_dir, "tensorboard")]
    with open(log, "w") as out:
        code = subprocess.run(megatron_command(flags), stdout=out, stderr=subprocess.STDOUT,
                              text=True).returncode
    text = open(log, errors="replace").read()
    if code:
        raise RuntimeError(f"megatron.training failed (exit {code}): {failure_line(text)}")
    return mean_ms(text, warmup + 1, end)


def te_config(flags: List[str]):
    """The one-rank TrainConfig of ``flags``; ValueError unless its layers are TE's."""
    from examples.mimo.training.hetero.config import parse_config

    cfg = parse_config(flags, world_size=1)
    if cfg.model.transformer_impl != "transformer_engine":
        # training/models/hybrid.py builds hybrid_stack_spec (TE modules) whatever the impl
        raise ValueError(f"--transformer-impl {cfg.model.transformer_impl}: the yardstick needs "
                         f"transformer_engine, megatron.training's only hybrid spec")
    return cfg


def megatron_command(flags: List[str]) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
            os.path.abspath(__file__), ENTRY, *flags]


def seconds_to_first_iteration(cmd: List[str], log: str, name: str) -> float:
    """Wall seconds from starting ``cmd`` to its first iteration's log line (the process then
    runs to its end, which is not timed)."""
    start, seen = time.perf_counter(), None
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")
        for line in proc.stdout:
            if seen is None and FIRST_ITERATION.search(line):
                seen = time.perf_counter() - start
            out.write(line)
        code = proc.wait()
    if code or seen is None:
        text = open(log, errors="replace").read()
        raise RuntimeError(f"{name} {'failed (exit %d)' % code if code else 'logged no first iteration'}"
                           f": {failure_line(text)}")
    return seen


def startup_rounds(train_hetero_flags: List[str], *, rounds: int, logs: str) -> dict:
    """Launch to the end of the first iteration, ours and megatron.training's, alternating."""
    flags = [*LAYOUT, *train_hetero_flags, "--train-iters", "1", "--log-interval", "1"]
    cfg = te_config(flags)
    ours = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
            "-m", "examples.mimo.train_hetero", *flags]
    theirs = megatron_command(megatron_flags(cfg, train_iters=1))
    os.makedirs(logs, exist_ok=True)
    times = {"ours": [], "megatron": []}
    for r in range(rounds):
        for name, cmd in (("ours", ours), ("megatron", theirs)):
            times[name].append(seconds_to_first_iteration(
                cmd, os.path.join(logs, f"startup-{name}-{r}.log"), name))
            print(f"round {r + 1}: {name} {times[name][-1]:.1f} s to the end of iteration 1",
                  flush=True)
    means = {k: statistics.mean(v) for k, v in times.items()}
    return {"times": times, "means": means, "ratio": means["ours"] / means["megatron"]}


def main(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--measure", type=int, default=8)
    p.add_argument("--log", default="megatron_yardstick.log")
    p.add_argument("--startup", type=int, default=0, metavar="ROUNDS",
                   help="time launch to the end of the first iteration, ours and megatron's, "
                        "alternating ROUNDS times (logs beside --log)")
    p.add_argument("flags", nargs=argparse.REMAINDER, help="-- then train_hetero flags")
    a = p.parse_args(argv)
    if a.startup:
        out = startup_rounds([f for f in a.flags if f != "--"], rounds=a.startup,
                             logs=os.path.dirname(os.path.abspath(a.log)))
        print(f"launch to the end of iteration 1, mean of {a.startup}: ours "
              f"{out['means']['ours']:.1f} s, megatron.training {out['means']['megatron']:.1f} s, "
              f"ours/megatron {out['ratio']:.2f}")
        return 0
    ms = run([f for f in a.flags if f != "--"], warmup=a.warmup, measure=a.measure, log=a.log)
    print(f"megatron.training: {ms:.1f} ms/iteration (mean of iterations {a.warmup + 1}-"
          f"{a.warmup + a.measure}); log: {a.log}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "../../..")))
    if len(sys.argv) > 1 and sys.argv[1] == ENTRY:
        del sys.argv[1]
        _pretrain()
    else:
        sys.exit(main(sys.argv[1:]))
