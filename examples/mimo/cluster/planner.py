"""Layout planner: the layouts N nodes of G GPUs allow for a model and global batch, each accepted
by the trainer's own validation, ranked by a cost model (examples/mimo/scripts/plan_layout.py).

The cost model, per iteration:
- compute: a branch's model FLOPs (the provider's ``flops()``) over its GPUs at a rate per GPU.
  The rate comes from a measured profile (bench_hetero.py --profile-out: each branch's FLOPs over
  its measured forward + backward time, so per-layer times scale with each layer's FLOPs), or,
  without one, from --achieved-tflops for both branches;
- the schedule: 1F1B over the micro-batches of a lane, the encoder one stage ahead of the LLM's
  PP stages: (micro-batches + stages - 1) x the slowest stage's micro-batch; colocated, both
  modules one after the other on every rank;
- tensor parallelism: 4 all-reduces of a layer's activations per layer and micro-batch over
  NVLink (--intra-node-gbps);
- after the schedule, each branch's DP gradient reduce-scatter and parameter all-gather (over the
  network when its DP group spans nodes) and its Adam step (--hbm-gbps); the branches do this in
  parallel on their own GPUs.
Memory per GPU: the estimate the trainer checks at start-up (training/hetero/memory.py), of the
layout's own parsed configuration; a layout fits when it is within that check's share of
--gpu-memory-gib.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from examples.mimo.training.hetero.config import GridConfig

POWERS = (1, 2, 4, 8)
ADAM_BYTES_PER_PARAM = 2 * (4 + 4 + 4 + 2 + 2)  # read and write main, m, v, grad, bf16 weight


@dataclass(frozen=True)
class Layout:
    grid: GridConfig  # the trainer's own grid type (llm_expt_tp = llm_tp, the default)
    micro_batch: int

    @property
    def encoder_gpus(self) -> int:
        return 0 if self.grid.colocated else self.grid.encoder_size

    @property
    def lanes_per_encoder_rank(self) -> float:
        return self.grid.llm_dp / self.grid.encoder_dp

    def flags(self) -> List[str]:
        g = self.grid
        return (["--colocated"] if g.colocated else []) + [
            "--encoder-tp", str(g.encoder_tp), "--encoder-dp", str(g.encoder_dp),
            "--llm-tp", str(g.llm_tp), "--llm-pp", str(g.llm_pp), "--llm-dp", str(g.llm_dp),
            "--llm-ep", str(g.llm_ep), "--micro-batch-size", str(self.micro_batch)] + (
            ["--sequence-parallel"] if g.sequence_parallel else [])


def layout(*, colocated: bool, encoder_tp: int, encoder_dp: int, llm_tp: int, llm_pp: int,
           llm_dp: int, llm_ep: int, micro_batch: int, sequence_parallel: bool = False) -> Layout:
    return Layout(GridConfig(encoder_tp=encoder_tp, encoder_dp=encoder_dp, llm_tp=llm_tp,
                             llm_pp=llm_pp, llm_dp=llm_dp, llm_ep=llm_ep, llm_expt_tp=llm_tp,
                             llm_only=False, colocated=colocated,
                             sequence_parallel=sequence_parallel), micro_batch)


@dataclass(frozen=True)
class Machine:
    gpus_per_node: int
    encoder_tflops: float  # achieved model TFLOP/s per GPU
    llm_tflops: float
    intra_node_gbps: float = 200.0  # NVLink, per GPU, GB/s
    inter_node_gbps: float = 40.0  # network, per GPU, GB/s
    hbm_gbps: float = 2000.0
    bytes_per_value: int = 2  # bf16 activations, weights and gradients (4: fp32)
    # measured Adam step seconds per parameter of a rank's shard (profile), else from hbm_gbps
    optimizer_s_per_param: Optional[float] = None

    def optimizer_s(self, params: float) -> float:
        per = self.optimizer_s_per_param or ADAM_BYTES_PER_PARAM / (self.hbm_gbps * 1e9)
        return params * per


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    iteration_ms: float
    encoder_ms: float  # one encoder micro-batch, forward + backward
    llm_ms: float  # one LLM stage's micro-batch, forward + backward
    sync_ms: float  # gradient sync + optimizer, the slower branch
    memory_gib: float  # the fuller GPU


def candidates(world: int, gpus_per_node: int, facts, global_batch: int) -> Iterable[Layout]:
    """Every layout of the trainer's shape rules: hetero (the encoder on whole nodes when there
    are several, on 1..G-1 GPUs of one node otherwise) and colocated."""
    nodes = world // gpus_per_node
    encoder_sizes = ([k * gpus_per_node for k in range(1, nodes)] if nodes > 1
                     else list(range(1, gpus_per_node)))
    splits = [(False, e, world - e) for e in encoder_sizes] + [(True, world, world)]
    experts = facts.num_experts
    for colocated, enc, llm in splits:
        for enc_tp in (t for t in POWERS if t <= gpus_per_node and enc % t == 0):
            for tp in (t for t in POWERS if t <= gpus_per_node):
                for pp in ((1,) if colocated else
                           [p for p in POWERS if facts.llm_num_layers % p == 0]):
                    if llm % (tp * pp):
                        continue
                    dp = llm // (tp * pp)
                    eps = [e for e in (1, 2, 4, 8, 16, 32, 64, 128, 256)
                           if (experts and experts % e == 0 and (tp * dp) % e == 0) or e == 1]
                    for ep in eps:
                        for mbs in POWERS:
                            lane_batch = mbs * dp
                            if global_batch % lane_batch or lane_batch % (enc // enc_tp):
                                continue
                            yield layout(colocated=colocated, encoder_tp=enc_tp,
                                         encoder_dp=enc // enc_tp, llm_tp=tp, llm_pp=pp,
                                         llm_dp=dp, llm_ep=ep, micro_batch=mbs,
                                         # what megatron-core asks of experts under TP
                                         sequence_parallel=tp > 1 and facts.sequence_parallel)


def _ring(nbytes: float, group: int, gbps: float) -> float:
    """Seconds of a ring all-reduce (or reduce-scatter + all-gather) of ``nbytes``."""
    return 0.0 if group <= 1 else 2 * (group - 1) / group * nbytes / (gbps * 1e9)


def estimate(option: Layout, *, facts, flops_per_sample: Tuple[float, float], seq_length: int,
             images_per_sample: float, global_batch: int, machine: Machine,
             memory_gib: float) -> Estimate:
    """``memory_gib``: the trainer's own estimate for the layout (``memory_of``)."""
    L, g, m = option, option.grid, machine
    enc_flops, llm_flops = flops_per_sample
    micro = global_batch // (L.micro_batch * g.llm_dp)
    enc_samples = L.micro_batch * g.llm_dp / g.encoder_dp  # per encoder rank and micro-batch
    llm_layers = facts.llm_num_layers / g.llm_pp
    b = m.bytes_per_value

    # compute and TP all-reduces of one micro-batch
    llm_act = L.micro_batch * seq_length * facts.llm_hidden_size * b
    llm_s = (llm_flops * L.micro_batch / (g.llm_tp * g.llm_pp) / (m.llm_tflops * 1e12)
             + 4 * llm_layers * _ring(llm_act, g.llm_tp, m.intra_node_gbps))
    enc_tokens = enc_samples * images_per_sample * facts.encoder_tokens_per_image
    enc_act = enc_tokens * facts.encoder_hidden_size * b
    enc_s = (enc_flops * enc_samples / g.encoder_tp / (m.encoder_tflops * 1e12)
             + 4 * facts.encoder_num_layers * _ring(enc_act, g.encoder_tp, m.intra_node_gbps))
    if g.colocated:
        stages, schedule = 1, micro * (enc_s + llm_s)
    else:
        stages = 1 + g.llm_pp
        schedule = (micro + stages - 1) * max(enc_s, llm_s)

    # parameters per GPU: dense ones split by TP (and PP), experts by EP (and PP)
    expert = facts.llm_expert_params / (g.llm_ep * g.llm_pp)
    dense = (facts.llm_params - facts.llm_expert_params) / (g.llm_tp * g.llm_pp)
    enc_params = facts.encoder_params / g.encoder_tp
    expert_dp = g.llm_tp * g.llm_dp // g.llm_ep

    def gbps(group_gpus: int) -> float:
        return m.intra_node_gbps if group_gpus <= m.gpus_per_node else m.inter_node_gbps

    llm_gbps = gbps(g.llm_size)  # DP groups span the LLM grid's nodes
    llm_sync = (_ring(dense * b, g.llm_dp, llm_gbps) + _ring(expert * b, expert_dp, llm_gbps)
                + m.optimizer_s(dense / g.llm_dp + expert / expert_dp))
    enc_sync = (_ring(enc_params * b, g.encoder_dp, gbps(g.encoder_size))
                + m.optimizer_s(enc_params / g.encoder_dp))
    sync = llm_sync + enc_sync if g.colocated else max(llm_sync, enc_sync)
    return Estimate(option, iteration_ms=(schedule + sync) * 1e3, encoder_ms=enc_s * 1e3,
                    llm_ms=llm_s * 1e3, sync_ms=sync * 1e3, memory_gib=memory_gib)


def memory_of(cfg, facts) -> float:
    """GiB on the fullest GPU, by the estimate the trainer checks at start-up (memory.py)."""
    from examples.mimo.training.hetero import memory

    return memory.per_gpu(cfg, memory.estimate(cfg, facts)) / memory.GIB


def calibrate(profile_path: str, shape_of) -> Dict[str, float]:
    """What a bench_hetero.py --profile-out file measured, as the cost model's constants:
    - ``encoder``/``llm``: achieved TFLOP/s per GPU, a branch's model FLOPs per GPU over its
      forward + backward time (the hetero run, the LLM-only run; a colocated run's encoder gets
      what the LLM's rate leaves of its time, or both get its one rate);
    - ``optimizer_s_per_param``: Adam step seconds per parameter of a rank's shard;
    - ``network_gbps``: the gradient sync's bandwidth, from a run whose DP group exceeds 1.
    ``shape_of(flags, world)`` gives a profiled run's (encoder FLOPs, LLM FLOPs, encoder GPUs,
    LLM GPUs, encoder params per rank, LLM params per rank, DP, bytes per value)."""
    with open(profile_path) as f:
        runs = json.load(f)["runs"]
    out: Dict[str, float] = {}
    # per-branch runs first (hetero, then LLM-only), so that a colocated run's one "model" time
    # can be split: its encoder time is what the LLM's known rate leaves of it
    order = {"hetero": 0, "llm-only": 1}
    for run in sorted(runs, key=lambda r: order.get(r["layout"], 2)):
        row = run["row"]
        enc_f, llm_f, enc_g, llm_g, enc_p, llm_p, dp, b = shape_of(run["flags"], run["world"])
        branches = ((("model", enc_f + llm_f, run["world"], enc_p + llm_p),)
                    if "model_forward_ms" in row else
                    (("encoder", enc_f, enc_g, enc_p), ("llm", llm_f, llm_g, llm_p)))
        for label, flops, gpus, params in branches:
            busy = (row.get(f"{label}_forward_ms", 0) + row.get(f"{label}_backward_ms", 0)) / 1e3
            if busy > 0 and flops > 0 and gpus:
                if label != "model":
                    out.setdefault(label, flops / gpus / busy / 1e12)
                elif "llm" in out and enc_f and busy > llm_f / gpus / (out["llm"] * 1e12):
                    out.setdefault("encoder", enc_f / gpus / (busy - llm_f / gpus / (out["llm"] * 1e12)) / 1e12)
                else:
                    for name in ("encoder", "llm"):
                        out.setdefault(name, flops / gpus / busy / 1e12)
            if params and row.get(f"{label}_optimizer_ms"):
                out.setdefault("optimizer_s_per_param", row[f"{label}_optimizer_ms"] / 1e3 / (params / dp))
            sync = row.get(f"{label}_grad_sync_ms", 0)
            if dp > 1 and sync > 0 and params:
                out.setdefault("network_gbps", 2 * (dp - 1) / dp * params * b / (sync / 1e3) / 1e9)
    if "encoder" not in out and "llm" not in out:
        raise ValueError(f"--profile {profile_path}: no run with per-branch forward/backward times")
    return out


def rank(estimates: Sequence[Estimate], memory_gib: Optional[float]) -> List[Estimate]:
    from examples.mimo.training.hetero.memory import HEADROOM

    # the part of a GPU the trainer's start-up check lets an estimate fill
    fits = [e for e in estimates if memory_gib is None or e.memory_gib <= HEADROOM * memory_gib]
    # ties (same time): fewer pipeline stages, then less TP, then more memory left
    return sorted(fits, key=lambda e: (round(e.iteration_ms, 6), e.layout.grid.llm_pp,
                                       e.layout.grid.llm_tp + e.layout.grid.encoder_tp,
                                       e.memory_gib))


def _model(flags: Sequence[str]):
    """The model provider and config of trainer flags, by the trainer's own parser and rules."""
    from examples.mimo.training.hetero.config import MODEL_PROVIDERS, build_parser, lookup

    names = build_parser().parse_known_args(list(flags))[0]
    args = build_parser(names.model_provider, names.data_provider).parse_args(list(flags))
    provider = lookup("--model-provider", MODEL_PROVIDERS, args.model_provider)
    return provider, provider.config_from_args(args)


def _per_sample_flops(provider, model_cfg, seq_length: int, images: float) -> Tuple[float, float]:
    from examples.mimo.interfaces import StepWork

    f = provider.flops(model_cfg, StepWork(sequences=1, seq_length=seq_length, images=images))
    return f.encoder, f.llm


def plan(flags: Sequence[str], *, nodes: int, gpus_per_node: int, global_batch: int,
         seq_length: int, images_per_sample: float = 1.0, achieved_tflops: float = 100.0,
         profile: Optional[str] = None, memory_gib: Optional[float] = None,
         network: Optional[dict] = None) -> Tuple[List[Estimate], List[str], Dict[str, float]]:
    """(valid layouts ranked by estimated iteration time, the trainer's messages for the shapes it
    refused, the compute rates used). Raises ValueError (the trainer's message) on bad flags."""
    from examples.mimo.training.hetero.config import parse_config

    world = nodes * gpus_per_node
    # a long run by default (schedule lengths are the user's business), their flags after it
    base = ["--train-iters", "1000000", *flags, "--global-batch-size", str(global_batch),
            "--seq-length", str(seq_length)]
    provider, model_cfg = _model(base)
    facts = provider.facts(model_cfg)
    per_sample = _per_sample_flops(provider, model_cfg, seq_length, images_per_sample)
    bytes_per_value = 2 if "--bf16" in flags else 4
    rates: Dict[str, float] = {"encoder": achieved_tflops, "llm": achieved_tflops}
    net = dict(network or {})
    if profile:
        def shape_of(run_flags, run_world):
            cfg = parse_config(run_flags, world_size=run_world)
            g, batch = cfg.grid, cfg.batch.global_batch_size
            run_facts = provider.facts(cfg.model)
            enc, llm = _per_sample_flops(provider, cfg.model, cfg.batch.seq_length,
                                         0.0 if g.llm_only else images_per_sample)
            enc_gpus = run_world if g.colocated else (0 if g.llm_only else g.encoder_size)
            llm_gpus = run_world if g.colocated else run_world - enc_gpus
            return (enc * batch, llm * batch, enc_gpus, llm_gpus,
                    run_facts.encoder_params / g.encoder_tp,
                    run_facts.llm_params / (g.llm_tp * g.llm_pp), g.llm_dp,
                    2 if cfg.runtime.bf16 else 4)
        measured = calibrate(profile, shape_of)
        rates.update({k: measured[k] for k in ("encoder", "llm") if k in measured})
        if "network_gbps" in measured:
            net.setdefault("intra_node_gbps", measured["network_gbps"])
        if "optimizer_s_per_param" in measured:
            net["optimizer_s_per_param"] = measured["optimizer_s_per_param"]
    machine = Machine(gpus_per_node=gpus_per_node, encoder_tflops=rates["encoder"],
                      llm_tflops=rates["llm"], bytes_per_value=bytes_per_value, **net)
    estimates, refused = [], {}
    for option in candidates(world, gpus_per_node, facts, global_batch):
        try:
            cfg = parse_config(base + option.flags(), world_size=world)
        except ValueError as err:
            refused.setdefault(str(err), option)
            continue
        estimates.append(estimate(option, facts=facts, flops_per_sample=per_sample,
                                  seq_length=seq_length, images_per_sample=images_per_sample,
                                  global_batch=global_batch, machine=machine,
                                  memory_gib=memory_of(cfg, facts)))
    return rank(estimates, memory_gib), list(refused), rates
