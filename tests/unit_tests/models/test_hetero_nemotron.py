"""Nemotron MoE VLM provider: presets, validation, built structure and parameter counts, freezing,
dynamic-resolution RADIO, and the tiny CPU preset training in the hetero loop."""

import json

import pytest
import torch

from examples.mimo.model_providers import nemotron_moe_vlm as nemotron
from examples.mimo.training.hetero.config import parse_config
from examples.mimo.training.hetero.kernels import KernelConfig
from tests.unit_tests.models.dist_harness import torchrun, train

BASE = ["--model-provider", "nemotron_moe_vlm", "--train-iters", "1", "--device", "cpu"]
# Shrinks every width of a preset and keeps its layer pattern, so large shapes build on CPU.
SMALL = ["--hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
         "--kv-channels", "16", "--num-experts", "4", "--moe-ffn-hidden-size", "32",
         "--moe-shared-expert-intermediate-size", "48", "--moe-router-topk", "2",
         "--mamba-num-heads", "4", "--mamba-head-dim", "16", "--mamba-state-dim", "16",
         "--mamba-num-groups", "2", "--vocab-size", "128", "--vision-num-layers", "2",
         "--vision-hidden-size", "32", "--vision-ffn-hidden-size", "64",
         "--vision-num-attention-heads", "4", "--img-h", "32", "--img-w", "32", "--patch-dim", "8",
         "--max-img-size", "64", "--class-token-len", "2",
         "--vision-projection-ffn-hidden-size", "96"]
LAYER_CLASS = {"M": "MambaLayer", "*": "TransformerLayer", "E": "MoETransformerLayer"}


def config(*extra, world_size=2):
    # 512 tokens hold the 256 image tokens of the full-size presets.
    return parse_config([*BASE, "--seq-length", "512", *extra], world_size=world_size).model


# ---- presets and flags (pure) --------------------------------------------------------------

@pytest.mark.parametrize("preset, layers, mamba, attention, moe", [
    ("tiny", 4, 1, 1, 2), ("tiny-cpu", 4, 0, 2, 2), ("nemotron-20l", 20, 8, 2, 10),
    ("nemotron-54l", 54, 21, 6, 27)])
def test_preset_layer_patterns(preset, layers, mamba, attention, moe):
    pattern = config("--model-preset", preset).arch.hybrid_layer_pattern
    assert (len(pattern), pattern.count("M"), pattern.count("*"), pattern.count("E")) == \
        (layers, mamba, attention, moe)
    # Every MoE layer follows one sequence mixer.
    assert pattern[1::2] == "E" * moe and "E" not in pattern[0::2]


def test_nemotron_shapes_share_the_nano_widths():
    for preset in ("nemotron-20l", "nemotron-54l"):
        a = config("--model-preset", preset).arch
        assert (a.hidden_size, a.num_attention_heads, a.kv_channels, a.num_experts,
                a.moe_router_topk, a.moe_ffn_hidden_size, a.moe_shared_expert_intermediate_size,
                a.mamba_num_heads * a.mamba_head_dim, a.vocab_size) == \
            (2688, 32, 128, 128, 6, 1856, 3712, 4096, 131072)
        assert (a.vision_num_layers, a.vision_hidden_size, a.patch_dim) == (32, 1280, 16)


def test_size_flags_override_one_field_of_the_preset():
    base = config("--model-preset", "nemotron-20l")
    cfg = config("--model-preset", "nemotron-20l", "--num-experts", "16")
    assert cfg.arch.num_experts == 16
    assert cfg.arch.hybrid_layer_pattern == base.arch.hybrid_layer_pattern
    assert cfg.arch.hidden_size == base.arch.hidden_size


def test_defaults_image_tokens_and_facts():
    cfg = config("--model-preset", "nemotron-20l", "--seq-length", "512")
    assert cfg.image_token_id == 131071 and cfg.transformer_impl == "local"
    assert nemotron.data_spec(cfg).image_tokens == 256  # 512/16 = 32 patches a side, 2x2 shuffled
    facts = nemotron.facts(cfg)
    assert (facts.llm_num_layers, facts.num_experts, facts.llm_moe_layers) == (20, 128, 10)


def test_training_stage_projector_only_freezes_vit_and_lm():
    cfg = config("--training-stage", "projector-only")
    assert (cfg.freeze_vit, cfg.freeze_lm, cfg.freeze_projection) == (True, True, False)


@pytest.mark.parametrize("extra, message", [
    (["--hybrid-layer-pattern", "M*X"], "--hybrid-layer-pattern 'M*X'"),
    (["--hybrid-layer-pattern", ""], "no layers"),
    (["--num-query-groups", "3"], "--num-query-groups 3 must divide --num-attention-heads 4"),
    (["--mamba-num-groups", "3"], "--mamba-num-groups 3 must divide --mamba-num-heads 8"),
    (["--moe-router-topk", "5"], "--moe-router-topk 5 must be <= --num-experts 4"),
    (["--img-h", "40"], "--img-h 40 must be a multiple of 2 x --patch-dim 8"),
    (["--img-w", "128"], "--img-w 128 must be <= --max-img-size 64"),
    (["--hidden-size", "0"], "--hidden-size 0 must be >= 1"),
    (["--image-token-id", "256"], "--image-token-id 256 must be in [0, --vocab-size 256)"),
    (["--image-token-id", "7"], "image token id 7 lies among the mock text ids"),
    (["--moe-aux-loss-coeff", "-1"], "--moe-aux-loss-coeff -1.0 must be >= 0"),
    (["--moe-router-bias-update-rate", "-1"], "--moe-router-bias-update-rate -1.0 must be >= 0"),
    (["--moe-router-topk-scaling-factor", "0"], "--moe-router-topk-scaling-factor 0.0 must be > 0"),
    (["--moe-expert-capacity-factor", "0"], "--moe-expert-capacity-factor 0.0 must be > 0"),
    (["--moe-pad-expert-input-to-capacity"],
     "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor"),
    (["--training-stage", "projector-only", "--freeze-projection"], "nothing to train"),
    (["--transformer-impl", "transformer_engine"], "needs transformer_engine"),
    (["--llm-ep", "2", "--llm-only", "--llm-dp", "2", "--num-experts", "3",
      "--moe-router-topk", "2"], "--llm-ep 2 must divide the LLM's 3 experts"),
    (["--llm-tp", "4", "--llm-only"], "--llm-tp 4 must divide the LLM's 2 query groups"),
    (["--llm-tp", "2", "--llm-only", "--llm-dp", "2", "--sequence-parallel", "--vocab-size", "255",
      "--image-token-id", "254"], "--llm-tp 2 must divide the LLM's vocabulary of 255"),
    # Found on CPU/gloo (issue 16): megatron-core's TransformerConfig raised after the groups.
    (["--llm-tp", "2", "--llm-only", "--llm-dp", "2"],
     "--llm-tp 2 with experts needs --sequence-parallel"),
    (["--sequence-parallel"], "--sequence-parallel needs --llm-tp > 1"),
    (["--sequence-parallel", "--llm-tp", "2", "--llm-only", "--llm-dp", "2", "--seq-length", "33"],
     "--seq-length 33 must be divisible by --llm-tp 2 with --sequence-parallel"),
    (["--seq-length", "5"], "--seq-length 5 must be >= image tokens 4 + 2"),
    (["--mock-text-vocab", "1"], "--mock-text-vocab 1 must be >= 2"),
    (["--mock-text-vocab", "255"], "--mock-text-vocab 255 must be <= vocabulary size 256 - 2"),
])
def test_bad_options_are_rejected_before_any_process_group(extra, message):
    world = 4 if "--llm-tp" in extra else 2
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("*", r"\*").replace("+", r"\+")):
        parse_config([*BASE, "--model-preset", "tiny", *extra], world_size=world)


def test_unknown_preset_is_rejected_with_the_known_names():
    with pytest.raises(ValueError, match="--model-preset: invalid choice: 'nemotron-99l'.*nemotron-54l"):
        parse_config([*BASE, "--model-preset", "nemotron-99l"], world_size=2)


def test_mamba_layers_are_refused_off_cuda():
    cfg = config("--model-preset", "tiny")
    with pytest.raises(ValueError, match="Mamba layers .* need CUDA"):
        nemotron.build(cfg, topology=None, dtype=torch.float32, seq_length=64,
                       device=torch.device("cpu"), kernels=KernelConfig())


# ---- built structure, parameter counts, freezing (2 gloo ranks: encoder, LLM) ---------------

BUILDS = {
    "tiny": (["--training-stage", "projector-only"], {"vit", "lm"}),
    "tiny-cpu": (["--freeze-vit"], {"vit"}),
    "nemotron-20l": ([*SMALL, "--freeze-lm", "--vision-projection-type", "affine"], {"lm"}),
    "nemotron-54l": ([*SMALL, "--freeze-projection"], {"projection"}),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every preset built in one 2-rank job (encoder rank 0, LLM rank 1)."""
    out = tmp_path_factory.mktemp("built")
    cases = []
    for preset, (extra, _) in BUILDS.items():
        cases += [*(["::"] if cases else []), preset, "--model-preset", preset, *extra]
    torchrun(2, "tests.unit_tests.models.workers.nemotron_worker", [str(out), *cases], timeout=300)
    return out


@pytest.mark.parametrize("preset", sorted(BUILDS))
def test_built_model_layers_parameter_counts_and_freezing(built, preset):
    extra, frozen = BUILDS[preset]
    encoder, llm = (json.loads((built / f"{preset}.rank{r}.json").read_text()) for r in (0, 1))
    cfg = config("--model-preset", preset, *extra)
    a = cfg.arch
    assert llm["module"] == "language" and encoder["module"] == "images"
    assert llm["layers"] == [LAYER_CLASS[s] for s in a.hybrid_layer_pattern]
    assert llm["final_norm"] == "RMSNorm" and encoder["encoder"] == "RadioEncoder"
    # The provider's own counts (what --dry-run prints) against the built model.
    vit, projection = nemotron.vision_params(a, cfg.vision_projection_type)
    params = {"lm": nemotron.language_params(a), "vit": vit, "projection": projection}
    facts = nemotron.facts(cfg)
    assert (facts.llm_params, facts.encoder_params) == (params["lm"], vit + projection)
    assert {**encoder["params"], **llm["params"]} == params
    trainable = {**encoder["trainable"], **llm["trainable"]}
    assert trainable == {part: 0 if part in frozen else n for part, n in params.items()}


def test_dynamic_resolution_packs_images_without_mixing_them(tmp_path):
    torchrun(1, "tests.unit_tests.models.workers.radio_worker", [str(tmp_path)], timeout=240)
    r = json.loads((tmp_path / "result.json").read_text())
    # 32x32 -> 4x4 patches -> 4 tokens; 16x48 -> 2x6 patches -> 3 tokens; 4 x hidden 32 channels
    assert r["shapes"] == [[7, 128], [7, 128], [4, 128]]
    assert r["packed_vs_alone"] < 1e-5 * r["scale"]
    assert r["packed_vs_fixed"] < 1e-5 * r["scale"]


# ---- training in the hetero loop (CPU/gloo) ---------------------------------------------------

TINY_CPU_RUN = ["--model-provider", "nemotron_moe_vlm", "--model-preset", "tiny-cpu",
                "--train-iters", "20", "--lr", "2e-3", "--lr-warmup-iters", "2", "--seq-length", "64"]


@pytest.fixture(scope="module")
def tiny_cpu_run(tmp_path_factory):
    return train(2, tmp_path_factory.mktemp("tiny_cpu"), TINY_CPU_RUN)


def test_tiny_cpu_preset_trains_in_the_hetero_loop(tiny_cpu_run):
    metrics = tiny_cpu_run
    assert [m["iteration"] for m in metrics] == list(range(1, 21))
    losses = [m["lm_loss"] for m in metrics]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    balance = [m["seq_load_balancing_loss"] for m in metrics]
    assert all(0.9 < b < 4.0 for b in balance)  # 1.0 is perfectly balanced


def test_save_and_resume_continue_the_tiny_cpu_run_exactly(tiny_cpu_run, tmp_path):
    """MoE router state (expert bias) and optimizer state survive a checkpoint: the run saved at
    3 and resumed to 6 repeats the straight run's losses bit for bit."""
    ckpt = str(tmp_path / "ckpt")
    first = train(2, tmp_path, [*TINY_CPU_RUN, "--save", ckpt, "--exit-interval", "3"],
                  name="resumed")
    second = train(2, tmp_path, [*TINY_CPU_RUN, "--load", ckpt, "--exit-interval", "6"],
                   name="resumed")
    assert [m["iteration"] for m in second] == list(range(1, 7))  # appended to the first 3
    assert first[:3] == second[:3]
    for key in ("lm_loss", "seq_load_balancing_loss", "grad_norm"):
        assert [m[key] for m in second] == [m[key] for m in tiny_cpu_run[:6]]


def test_sequence_parallel_tp2_matches_tp1(tiny_cpu_run, tmp_path):
    """TP 2 with MoE needs sequence parallelism (megatron-core refuses it otherwise): the LLM
    branch on two TP ranks, its combined embeddings scattered over the sequence by MimoModel,
    repeats the one-rank run's losses and gradient norms up to summation order."""
    run = train(3, tmp_path, [*TINY_CPU_RUN, "--exit-interval", "4", "--llm-tp", "2",
                              "--sequence-parallel"])
    for key in ("lm_loss", "grad_norm"):
        assert [m[key] for m in run] == pytest.approx([m[key] for m in tiny_cpu_run[:4]], rel=1e-4)


def test_expert_parallel_trains_and_resumes_exactly(tmp_path):
    """EP 2 over two LLM DP ranks (found failing on CPU/gloo: the alltoall dispatcher handed gloo
    its split sizes as tensors). Each EP rank draws its own experts, so the model is not EP 1's;
    the run saved at 2 and resumed to 4 repeats the straight run bit for bit."""
    ep = [*TINY_CPU_RUN, "--llm-dp", "2", "--llm-ep", "2"]
    straight = train(3, tmp_path, [*ep, "--exit-interval", "4"], name="straight")
    ckpt = str(tmp_path / "ckpt")
    train(3, tmp_path, [*ep, "--save", ckpt, "--exit-interval", "2"], name="resumed")
    resumed = train(3, tmp_path, [*ep, "--load", ckpt, "--exit-interval", "4"], name="resumed")
    assert [m["iteration"] for m in resumed] == [1, 2, 3, 4]
    assert straight[3]["lm_loss"] < straight[0]["lm_loss"]
    for key in ("lm_loss", "seq_load_balancing_loss", "grad_norm"):
        assert [m[key] for m in resumed] == [m[key] for m in straight]


def test_expert_capacity_padding_keeps_the_model_until_tokens_are_dropped(tiny_cpu_run, tmp_path):
    """Padded to a capacity no expert can exceed (4 experts, top-2: factor 2 is a whole
    micro-batch per expert), the experts compute what dropless routing does; at a quarter of that
    the dispatcher drops tokens and the loss moves: the flags reach megatron's dispatcher.
    Compared at the first iteration, whose loss the imported weights alone decide: the padded
    GEMMs sum in another order, and Adam's first step (about lr x the sign of each gradient)
    turns that noise in near-zero gradients into weight changes of 2 lr."""
    first = {}
    for factor in ("2.0", "0.5"):
        run = train(2, tmp_path, [*TINY_CPU_RUN, "--exit-interval", "1", "--moe-expert-capacity-factor",
                                  factor, "--moe-pad-expert-input-to-capacity"], name=factor)
        first[factor] = run[0]["lm_loss"]
    dropless = tiny_cpu_run[0]["lm_loss"]
    assert first["2.0"] == pytest.approx(dropless, rel=1e-6)
    assert abs(first["0.5"] - dropless) > 100 * 1e-6 * dropless