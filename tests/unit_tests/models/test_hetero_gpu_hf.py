"""The nemotron-20l LLM (Mamba, attention and MoE layers; 16 experts to fit one GPU) made by
transformers from a random NemotronH config, imported by the trainer on one GPU in bf16 with
local and transformer-engine layers: the first iteration's loss (the imported weights') against
transformers' on the same batch, its Mamba layers on transformers' torch path. Skips without
CUDA (and the TE case without transformer-engine). Results: docs/results.md."""

import importlib.util

import pytest
import torch

from examples.mimo.model_providers import nemotron_moe_vlm as nemotron
from examples.mimo.training.hetero.config import parse_config
from tests.unit_tests.models import hf_models
from tests.unit_tests.models.dist_harness import run_train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

SHAPE = nemotron.PRESETS["nemotron-20l"]
TEXT = dict(
    vocab_size=SHAPE.vocab_size, hidden_size=SHAPE.hidden_size,
    num_attention_heads=SHAPE.num_attention_heads, num_key_value_heads=SHAPE.num_query_groups,
    head_dim=SHAPE.kv_channels, intermediate_size=SHAPE.ffn_hidden_size, n_routed_experts=16,
    num_experts_per_tok=SHAPE.moe_router_topk, moe_intermediate_size=SHAPE.moe_ffn_hidden_size,
    moe_shared_expert_intermediate_size=SHAPE.moe_shared_expert_intermediate_size,
    mamba_num_heads=SHAPE.mamba_num_heads, mamba_head_dim=SHAPE.mamba_head_dim,
    n_groups=SHAPE.mamba_num_groups, ssm_state_size=SHAPE.mamba_state_dim,
    layers_block_type=[{"M": "linear_attention", "*": "full_attention", "E": "moe"}[s]
                       for s in SHAPE.hybrid_layer_pattern])
FLAGS = ["--model-provider", "nemotron_moe_vlm", "--llm-only", "--device", "cuda", "--bf16",
         "--train-iters", "1", "--global-batch-size", "2", "--micro-batch-size", "1",
         "--seq-length", "1024", "--mock-text-vocab", "4000"]
# bf16 weights and activations on both sides, different kernels (TE's fused GEMMs, megatron's
# and transformers' Mamba scans). Found on an H200: 1.5e-4 (local), 2.7e-4 (TE); the bound
# leaves 7x that (a random model's loss is near log(vocab) whatever the mapping: a percent
# would not tell a wrong one).
RTOL = 2e-3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = hf_models.nemotron_h(tmp_path_factory.mktemp("hf") / "nemotron20l", device="cuda",
                                dtype=torch.bfloat16, **TEXT)
    torch.cuda.empty_cache()
    return path


def transformers_loss(folder, flags):
    from transformers import NemotronHForCausalLM

    cfg = parse_config(flags, world_size=1)
    spec = nemotron.data_spec(cfg.model)
    model = NemotronHForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").cuda().eval()
    samples = hf_models.mock_batch(cfg, spec)
    loss = hf_models.llm_loss(model, samples)
    del model
    torch.cuda.empty_cache()
    return loss


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_nemotron_20l_from_transformers_computes_its_loss(impl, folder, tmp_path):
    if impl == "transformer_engine" and importlib.util.find_spec("transformer_engine") is None:
        pytest.skip("transformer-engine is not installed")
    flags = [*FLAGS, "--load-language-from", folder, "--transformer-impl", impl]
    rows, proc = run_train(1, tmp_path, flags)
    theirs = transformers_loss(folder, flags)
    print(f"{impl}: ours {rows[0]['lm_loss']:.5f}, transformers {theirs:.5f}, relative "
          f"difference {abs(rows[0]['lm_loss'] - theirs) / theirs:.2e}")
    assert rows[0]["lm_loss"] == pytest.approx(theirs, rel=RTOL)
