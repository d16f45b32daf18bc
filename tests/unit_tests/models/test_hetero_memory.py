"""The peak-memory estimate (training/hetero/memory.py): its parts move with the flags as the
memory they stand for does, the start-up check refuses in one line naming what would fit, and
the dry run prints it. Pure, in-process; its error against measured GPU peaks is in
docs/results.md."""

import pytest

from examples.mimo import train_hetero
from examples.mimo.model_providers import MODEL_PROVIDERS
from examples.mimo.training.hetero import memory
from examples.mimo.training.hetero.config import parse_config
from examples.mimo.training.hetero.errors import ConfigError

GIB = 2 ** 30
N20 = ["--model-provider", "nemotron_moe_vlm", "--model-preset", "nemotron-20l", "--num-experts",
       "16", "--seq-length", "4096", "--micro-batch-size", "4", "--global-batch-size", "8",
       "--train-iters", "3", "--device", "auto"]
ONE_GPU = ["--llm-only", "--llm-dp", "1"]


def parts(*flags, world=1):
    cfg = parse_config([*N20, *flags], world_size=world)
    facts = MODEL_PROVIDERS[cfg.model_provider].facts(cfg.model)
    return cfg, facts, {b.branch: b for b in memory.estimate(cfg, facts)}


def test_the_parts_follow_their_flags():
    cfg, facts, base = parts(*ONE_GPU)
    lm = base["language model"]
    assert lm.weights == pytest.approx(4 * facts.llm_params)  # fp32 on the CPU: 4 bytes each
    assert lm.grads == pytest.approx(4 * facts.llm_params)  # the DDP's fp32 buffer
    assert lm.optimizer == pytest.approx(8 * facts.llm_params)  # fp32: no main copy, 2 moments
    recomputed = parts(*ONE_GPU, "--recompute-granularity", "full", "--recompute-method",
                       "uniform", "--recompute-num-layers", "1")[2]["language model"]
    assert recomputed.activations < lm.activations / 2 and recomputed.weights == lm.weights
    half = parts(*ONE_GPU, "--micro-batch-size", "2")[2]["language model"]
    assert half.activations < lm.activations and half.optimizer == lm.optimizer
    fused = parts(*ONE_GPU, "--cross-entropy-loss-fusion")[2]["language model"]
    # the fp32 copy, softmax and gradient of 16,384 tokens x 131,072 entries are gone
    assert lm.activations - fused.activations == pytest.approx(12 * 4 * 4096 * 131072)


def test_sharding_divides_what_it_shards():
    _, facts, one = parts("--llm-only", "--llm-dp", "2", world=2)
    _, _, ep = parts("--llm-only", "--llm-dp", "2", "--llm-ep", "2", world=2)
    dense = facts.llm_params - facts.llm_expert_params
    # the routed experts' weights halve with EP; the optimizer shards over DP either way
    assert one["language model"].weights - ep["language model"].weights == \
        pytest.approx(4 * facts.llm_expert_params / 2)
    assert one["language model"].optimizer == pytest.approx(8 * (dense + facts.llm_expert_params) / 2)


def test_a_frozen_branch_has_no_gradients_or_optimizer_state():
    _, facts, stage1 = parts("--training-stage", "projector-only", "--encoder-dp", "1",
                             "--llm-dp", "1", world=2)
    assert stage1["language model"].grads == stage1["language model"].optimizer == 0
    # the projector's (a fifth of the vision side: its 20,480-wide MLP), not the ViT's
    assert stage1["encoder"].grads == 4 * facts.encoder_trainable_params
    assert 0 < facts.encoder_trainable_params < facts.encoder_params / 4


def test_colocated_sums_both_branches_on_each_gpu():
    cfg, facts, _ = parts("--colocated", "--encoder-dp", "1", "--llm-dp", "1")
    branches = memory.estimate(cfg, facts)
    assert memory.per_gpu(cfg, branches) == pytest.approx(sum(b.total for b in branches))


def test_a_job_over_the_gpu_is_one_line_with_what_would_fit():
    cfg, facts, _ = parts(*ONE_GPU, "--micro-batch-size", "8", "--global-batch-size", "8")
    total = memory.per_gpu(cfg, memory.estimate(cfg, facts))
    line = memory.problem(cfg, facts, device_bytes=total)  # only 90 % of it may be filled
    assert "\n" not in line
    assert line.startswith(f"estimated peak memory {total / GIB:.1f} GiB per GPU exceeds "
                           f"{0.9 * total / GIB:.1f} GiB (90% of the GPU's {total / GIB:.1f} GiB): "
                           f"language model {total / GIB:.1f} GiB (weights ")
    assert "would fit: --recompute-granularity full" in line
    assert line.endswith("(--skip-memory-check starts anyway)")
    assert memory.problem(cfg, facts, device_bytes=2 * total) is None


def test_the_rank_refuses_before_any_process_group_unless_told_not_to(monkeypatch):
    monkeypatch.setattr(memory, "device_bytes", lambda local_rank: 8 * GIB)
    cuda = [f if f != "auto" else "cuda" for f in N20] + ONE_GPU
    with pytest.raises(ConfigError, match=r"estimated peak memory .* exceeds 7.2 GiB"):
        train_hetero.check_memory(parse_config(cuda, world_size=1))
    train_hetero.check_memory(parse_config([*cuda, "--skip-memory-check"], world_size=1))


def test_the_dry_run_prints_the_estimate(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(train_hetero, "quiet_library_warnings", lambda **kw: None)
    train_hetero.main([*N20, *ONE_GPU, "--dry-run"])
    out = capsys.readouterr().out
    assert "memory (estimate, per GPU of each grid): language model " in out
    assert "(weights " in out and "activations " in out


# Peaks measured on one H200 (torch.cuda.max_memory_allocated), nemotron-20l with 16 experts, TE,
# seq 4096, global batch 8, LLM only: docs/benchmarks.md (the fast-path, capacity and CUDA-graph
# tables, their commands there), earlier commits of this code than the estimate's.
F = ["--moe-router-fusion", "--moe-permute-fusion", "--cross-entropy-loss-fusion",
     "--use-transformer-engine-op-fuser", "--use-fused-weighted-squared-relu"]
MEASURED = [
    (["--micro-batch-size", "4", *F], 91.76),
    (["--micro-batch-size", "1", *F], 59.04),
    (["--micro-batch-size", "4", *F, "--moe-expert-capacity-factor", "1.5",
      "--moe-pad-expert-input-to-capacity"], 102.71),
    (["--model-preset", "nemotron-54l", "--micro-batch-size", "1", *F, "--recompute-granularity",
      "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"], 115.94),
]


# Measured on 2026-12-05 by this code (docs/results.md): local specs, unfused cross entropy,
# whose term (16 bytes a logit) was set from these; the four above (fused) were not fitted.
LOCAL = [
    (["--micro-batch-size", "2", "--global-batch-size", "4"], 83.62),
    (["--micro-batch-size", "1", "--global-batch-size", "2"], 65.73),
    (["--num-experts", "32", "--seq-length", "2048", "--micro-batch-size", "2",
      "--global-batch-size", "4"], 93.75),
    (["--micro-batch-size", "4", "--recompute-granularity", "full", "--recompute-method",
      "uniform", "--recompute-num-layers", "1"], 86.55),
]


@pytest.mark.parametrize("flags, peak_gib", [
    (["--transformer-impl", "transformer_engine", "--global-batch-size", "8", *f], p)
    for f, p in MEASURED] + [(["--transformer-impl", "local", *f], p) for f, p in LOCAL])
def test_the_estimate_is_within_ten_percent_of_peaks_measured_on_an_h200(flags, peak_gib,
                                                                          monkeypatch):
    from examples.mimo.model_providers import specs

    monkeypatch.setattr(specs, "check_transformer_impl", lambda impl: None)  # no TE here
    cuda = [f if f != "auto" else "cuda" for f in N20] + ONE_GPU + ["--bf16", *flags]
    cfg = parse_config(cuda, world_size=1)
    facts = MODEL_PROVIDERS[cfg.model_provider].facts(cfg.model)
    estimate = memory.per_gpu(cfg, memory.estimate(cfg, facts)) / GIB
    assert estimate == pytest.approx(peak_gib, rel=0.1)
