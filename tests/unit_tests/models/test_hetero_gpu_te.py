"""GPU tier, one GPU: the transformer-engine path and the fast-path options, on the Nemotron tiny
preset (Mamba, attention and MoE layers; RADIO ViT), colocated so that both branches run.

    pytest tests/unit_tests/models/test_hetero_gpu_te.py        (or torchrun --nproc-per-node 1 -m pytest ...)

Each test trains in this process (world size 1). Skips without a GPU, under a larger torchrun
world, and (per test) without transformer-engine or causal-conv1d.
"""

import importlib.util
import json
import math
import os
import re

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("WORLD_SIZE", "1") != "1",
    reason="needs a GPU and a world of one rank")
needs_te = pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                              reason="transformer-engine is not installed")

TINY = ["--model-provider", "nemotron_moe_vlm", "--model-preset", "tiny", "--seq-length", "64",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "2e-3",
        "--lr-warmup-iters", "3", "--log-interval", "5", "--distributed-timeout-minutes", "4"]
COLOCATED = ["--colocated", "--encoder-dp", "1", "--llm-dp", "1"]
# FP8 GEMMs need both weight dimensions to be multiples of 16: Mamba's in_proj is
# 2 x heads x head_dim + 2 x groups x state + heads rows (16 heads: 592).
FP8_SIZES = ["--mamba-num-heads", "16"]


@pytest.fixture(autouse=True)
def single_rank_world(monkeypatch):
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517")):
        if key not in os.environ:
            monkeypatch.setenv(key, value)


def _run(flags, *, iters, weights=None, rename=None, inspect=None, cpu_init=True):
    """Train ``iters`` iterations; returns (losses, {parameter name: fp32 CPU copy of the initial
    weights}). ``weights`` replace the initial weights first, under ``rename(name, names of the
    built model)`` when given. ``cpu_init``: the runs a test compares start from the same weights
    (GPU initialisation draws from the RNG tracker, whose kind CUDA graphs switch)."""
    from examples.mimo.training.hetero.config import parse_config
    from examples.mimo.training.hetero.loop import train
    from examples.mimo.training.hetero.runtime import build_runtime

    cfg = parse_config(["--device", "cuda", *flags, "--train-iters", str(iters),
                        *(["--use-cpu-initialization"] if cpu_init else [])], world_size=1)
    rt = build_runtime(cfg)
    try:
        params = {_plain(n): p for n, p in rt.model.named_parameters()}
        initial = {n: p.detach().float().cpu().clone() for n, p in params.items()}
        if weights is not None:
            mapped = {(rename(n, set(params)) if rename else n): w for n, w in weights.items()}
            assert set(mapped) == set(params), (
                f"unmatched: {sorted(set(mapped) - set(params))[:8]} / "
                f"{sorted(set(params) - set(mapped))[:8]}")
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(mapped[n].view(p.shape))
        if inspect is not None:
            inspect(rt.model)
        results = train(rt)
    finally:
        rt.close()
    assert not any(r.skipped for r in results)
    assert all(math.isfinite(r.lm_loss) for r in results)
    return [r.lm_loss for r in results], initial


def _plain(name: str) -> str:
    return name.replace(".module.", ".")  # DDP's wrapper


def local_to_te(name: str, te_names: set) -> str:
    """A local-spec parameter's name in the TE specs, where a pre-norm is fused into the next
    linear (``layer_norm_weight``; not before MoE, whose router reads the normed input too) and
    routed experts are one grouped GEMM (``weight{e}``)."""
    for pattern, fused in ((r"\.input_layernorm\.(weight|bias)$", r".self_attention.linear_qkv.layer_norm_\1"),
                           (r"(\.layers\.\d+)\.norm\.weight$", r"\1.mixer.in_proj.layer_norm_weight"),
                           (r"\.pre_mlp_layernorm\.(weight|bias)$", r".mlp.linear_fc1.layer_norm_\1"),
                           (r"\.experts\.local_experts\.(\d+)\.(linear_fc\d)\.weight$", r".experts.\2.weight\1")):
        renamed = re.sub(pattern, fused, name)
        if renamed != name and renamed in te_names:
            return renamed
    return name


def _curve_gap(a, b):
    return max(abs(x - y) for x, y in zip(a, b))


@needs_te
def test_te_specs_build_te_layers_in_both_branches_and_train():
    from megatron.core.extensions.transformer_engine import (
        TEGroupedLinear,
        TELayerNormColumnParallelLinear,
    )

    from examples.mimo.interfaces import ENCODER_MODULE

    seen = {}

    def inspect(model):
        for branch, module in (("llm", model.language_model),
                               ("encoder", model.modality_submodules[ENCODER_MODULE])):
            kinds = {type(m) for m in module.modules()}
            seen[branch] = kinds
        assert TELayerNormColumnParallelLinear in seen["encoder"]  # RADIO's TE ViT layer
        assert TELayerNormColumnParallelLinear in seen["llm"]
        assert any(issubclass(k, TEGroupedLinear) for k in seen["llm"])  # grouped-GEMM experts

    losses, _ = _run([*TINY, *COLOCATED, "--bf16", "--transformer-impl", "transformer_engine"],
                     iters=30, inspect=inspect, cpu_init=False)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3


@needs_te
def test_te_loss_curve_matches_local_within_bf16_noise():
    """Same initial weights (local's, renamed), data and steps on both backends. Tolerance: the
    gap between TE and local bf16 may be at most 3x local bf16's own gap to fp32 over the same 20
    iterations (each bf16 curve sits about one noise unit from fp32, in its own direction), with
    an absolute floor of 2e-3 for the case where that noise is tiny."""
    local, weights = _run([*TINY, *COLOCATED, "--bf16", "--transformer-impl", "local"], iters=20)
    fp32, _ = _run([*TINY, *COLOCATED, "--transformer-impl", "local"], iters=20, weights=weights)
    te, _ = _run([*TINY, *COLOCATED, "--bf16", "--transformer-impl", "transformer_engine"],
                 iters=20, weights=weights, rename=local_to_te)
    noise, gap = _curve_gap(local, fp32), _curve_gap(te, local)
    print(json.dumps({"local_bf16": local, "fp32": fp32, "te_bf16": te, "noise": noise, "gap": gap}))
    assert gap <= max(3 * noise, 2e-3), (gap, noise)
    assert local[-1] < local[0] - 0.3  # the curves compared are ones of a model that learns


@needs_te
def test_fp8_trains_within_tolerance_of_bf16():
    """30 iterations, same weights. FP8 (e4m3, 3 mantissa bits: 6% relative rounding per element)
    averages out over dot products of >= 64 terms; allowed: each iteration within 5% of bf16's
    loss and the mean of the last 10 within 2%."""
    base = [*TINY, *COLOCATED, *FP8_SIZES, "--bf16", "--transformer-impl", "transformer_engine"]
    bf16, weights = _run(base, iters=30)
    for fmt in ("hybrid", "e4m3"):
        fp8, _ = _run([*base, "--fp8-format", fmt], iters=30, weights=weights)
        rel = [abs(a - b) / b for a, b in zip(fp8, bf16)]
        tail = abs(sum(fp8[-10:]) - sum(bf16[-10:])) / sum(bf16[-10:])
        print(json.dumps({"fp8": fmt, "max_rel": max(rel), "last10_rel": tail}))
        assert max(rel) < 0.05 and tail < 0.02, (fmt, max(rel), tail)


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
@pytest.mark.parametrize("recompute", [
    ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
    ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2"],
    ["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "moe", "shared_experts"],
], ids=["full-uniform", "full-block", "selective"])
def test_recompute_gives_the_same_losses(impl, recompute):
    """Recomputing activations in backward changes memory, not the function: fp32, so the only
    difference is the order of floating-point sums in kernels (Triton's scans, atomics)."""
    if impl == "transformer_engine" and importlib.util.find_spec("transformer_engine") is None:
        pytest.skip("transformer-engine is not installed")
    base = [*TINY, *COLOCATED, "--transformer-impl", impl]
    plain, weights = _run(base, iters=6)
    again, _ = _run([*base, *recompute], iters=6, weights=weights)
    assert _curve_gap(plain, again) < 1e-4 * plain[0], (plain, again)


@pytest.mark.skipif(importlib.util.find_spec("causal_conv1d") is None, reason="causal-conv1d is not installed")
def test_mamba_fused_path_is_used_and_matches_the_unfused_one():
    from examples.mimo.model_providers.specs import causal_conv1d_available

    assert causal_conv1d_available(), "causal_conv1d is importable but its CUDA extension is not"
    used = []

    def inspect(model):
        used.extend(m.use_mem_eff_path for m in model.modules() if hasattr(m, "use_mem_eff_path"))

    base = [*TINY, *COLOCATED, "--transformer-impl", "local"]
    fused, weights = _run(base, iters=10, inspect=inspect)
    assert used and all(used)
    unfused, _ = _run([*base, "--disable-mamba-mem-eff-path"], iters=10, weights=weights)
    assert _curve_gap(fused, unfused) < 1e-3 * unfused[0], (fused, unfused)


@needs_te
def test_profiler_counts_kernels_and_syncs_and_our_data_path_does_not_sync(tmp_path):
    _run([*TINY, "--llm-only", "--llm-dp", "1", "--bf16", "--transformer-impl", "transformer_engine",
          "--profile", "--use-pytorch-profiler", "--profile-step-start", "3",
          "--profile-step-end", "5", "--profile-dir", str(tmp_path)], iters=6)
    s = json.loads((tmp_path / "summary-rank-0.json").read_text())
    print(json.dumps(s, indent=1))
    assert s["iterations_profiled"] == [4, 5] and s["kernels_per_iteration"] > 100
    assert 0 < s["gpu_busy_fraction"] <= 1 and s["item_calls_per_iteration"] > 0
    # megatron-core's alltoall dispatcher waits for the per-expert token counts once per MoE
    # layer and micro-batch (token_dispatcher.py, _maybe_dtoh_and_synchronize)
    moe_layers, microbatches = 2, 4
    assert s["sync_calls_per_iteration"]["cudaEventSynchronize"] == moe_layers * microbatches
    sites = s["sync_sites_per_iteration"]
    assert any("megatron/core/models/mimo/" in site for site in sites), sites
    dispatcher = [n for site, n in sites.items() if "transformer/moe/token_dispatcher.py" in site]
    assert dispatcher == [moe_layers * microbatches], sites
    # host-to-GPU copies of the micro-batches came from pageable memory: 3 syncs each (H100)
    assert not any("examples/mimo/data/" in site for site in sites), sites
    assert (tmp_path / "rank-0.json.gz").stat().st_size > 0


@needs_te
def test_expert_capacity_padding_removes_the_dispatchers_host_sync(tmp_path):
    """With every expert padded to its capacity the alltoall dispatcher knows the shapes without
    asking the GPU: the per-layer, per-micro-batch cudaEventSynchronize of the dropless run goes."""
    _run([*TINY, "--llm-only", "--llm-dp", "1", "--bf16", "--transformer-impl", "transformer_engine",
          "--moe-expert-capacity-factor", "2.0", "--moe-pad-expert-input-to-capacity",
          "--profile", "--use-pytorch-profiler", "--profile-step-start", "3",
          "--profile-step-end", "5", "--profile-dir", str(tmp_path)], iters=6)
    s = json.loads((tmp_path / "summary-rank-0.json").read_text())
    print(json.dumps(s["sync_calls_per_iteration"]))
    assert s["sync_calls_per_iteration"].get("cudaEventSynchronize", 0) == 0


@needs_te
def test_op_fuser_experts_match_the_unfused_ones_in_fewer_kernels(tmp_path):
    """TE's op fuser runs the experts' FC1, probability-weighted squared ReLU and FC2 as one op
    sequence (on Hopper in bf16 with cuBLASLt >= 13.4: one grouped GEMM per FC over GPU-side
    token counts; the H100 and H200 here have 13.1, so a GEMM per expert). Same
    weights and data: within bf16 noise of the unfused experts, measured as in the TE vs local
    test (3x the unfused bf16 curve's gap to fp32, floor 2e-3), in fewer kernels per iteration."""
    import transformer_engine_torch as tex

    fused_impl = []

    def inspect(model):
        fused_impl.extend(m._with_fused_impl for m in model.modules() if hasattr(m, "_with_fused_impl"))

    te = [*TINY, "--llm-only", "--llm-dp", "1", "--transformer-impl", "transformer_engine"]
    profile = ["--profile", "--use-pytorch-profiler", "--profile-step-start", "8",
               "--profile-step-end", "10"]
    plain, weights = _run([*te, "--bf16", *profile, "--profile-dir", str(tmp_path / "plain")],
                          iters=20)
    fp32, _ = _run(te, iters=20, weights=weights)
    fused, _ = _run([*te, "--bf16", "--use-transformer-engine-op-fuser",
                     "--use-fused-weighted-squared-relu", *profile,
                     "--profile-dir", str(tmp_path / "fused")], iters=20, weights=weights,
                    inspect=inspect)
    assert fused_impl and all(fused_impl)
    noise, gap = _curve_gap(plain, fp32), _curve_gap(fused, plain)
    kernels = {name: json.loads((tmp_path / name / "summary-rank-0.json").read_text())[
        "kernels_per_iteration"] for name in ("plain", "fused")}
    print(json.dumps({"noise": noise, "gap": gap, "kernels": kernels,
                      "cublaslt": tex.get_cublasLt_version()}))
    assert gap <= max(3 * noise, 2e-3), (gap, noise)
    assert kernels["fused"] < kernels["plain"], kernels


GRAPHED = ["--cuda-graph-impl", "transformer_engine", "--cuda-graph-warmup-steps", "3"]


@needs_te
@pytest.mark.parametrize("model,parts", [
    ([], ["--cuda-graph-modules", "mamba", "attn", "moe_router", "moe_preprocess"]),
    (["--moe-expert-capacity-factor", "2.0", "--moe-pad-expert-input-to-capacity"], []),
], ids=["dropless-parts-of-layers", "padded-whole-layers"])
def test_cuda_graphs_replay_the_eager_losses_and_resume_from_a_checkpoint(tmp_path, capsys,
                                                                          monkeypatch, model, parts):
    """The language model's layers captured after 3 eager iterations and replayed: same weights
    and data as an eager run, so the losses are the eager run's up to the order of sums in
    kernels (bf16; allowed 2e-3 relative, the floor of the TE vs local test). Every layer of
    every later micro-batch is a replay. A checkpoint saved from a graphed run (the graph-safe
    RNG tracker's states as tensors) resumes, and its first 3 iterations run eagerly again."""
    from megatron.core.transformer.module import GraphableMegatronModule

    replays = []
    replay = GraphableMegatronModule._te_cuda_graph_replay

    def counted(self, *args, **kwargs):
        replays.append(type(self).__name__)
        return replay(self, *args, **kwargs)

    monkeypatch.setattr(GraphableMegatronModule, "_te_cuda_graph_replay", counted)
    base = [*TINY, "--llm-only", "--llm-dp", "1", "--bf16", "--transformer-impl",
            "transformer_engine", *model]
    graphs = [*GRAPHED, *parts]
    eager, weights = _run(base, iters=12)
    assert not replays
    graphed, _ = _run([*base, *graphs], iters=12, weights=weights)
    layers, microbatches = 4, 4  # "ME*E"; global batch 8 of micro-batches of 2
    assert len(replays) == 9 * microbatches * layers, len(replays)
    assert "MambaLayer" in replays
    assert "CUDA graphs: 4 language-model layers captured after 3 eager iterations" in \
        capsys.readouterr().out
    gap = max(abs(a - b) / b for a, b in zip(graphed, eager))
    print(json.dumps({"eager": eager, "graphed": graphed, "max_rel_gap": gap}))
    assert graphed[:3] == eager[:3] and gap <= 2e-3, gap

    ckpt = ["--save", str(tmp_path / "ckpt"), "--save-interval", "6"]
    # the same 12-iteration schedule, stopped after 6 (a changed schedule is refused on resume)
    first, _ = _run([*base, *graphs, *ckpt, "--exit-interval", "6"], iters=12, weights=weights)
    replays.clear()
    resumed, _ = _run([*base, *graphs, *ckpt, "--load", str(tmp_path / "ckpt")], iters=12)
    assert len(replays) == 3 * microbatches * layers, len(replays)
    rest = max(abs(a - b) / b for a, b in zip(first + resumed, graphed))
    print(json.dumps({"first": first, "resumed": resumed, "max_rel_gap_to_uninterrupted": rest}))
    assert len(resumed) == 6 and rest <= 2e-3, rest
