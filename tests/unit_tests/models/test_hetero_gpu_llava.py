"""The llava provider on one GPU in bf16, local and transformer-engine layers, at released sizes:
a Llama of 1B's shape with CLIP ViT-L/14 at 336 (LLaVA-1.5's tower), and a Qwen3 of 0.6B's
shape (QK-norm, tied embeddings) with SigLIP so400m at 384, made by transformers from random
configs. The first iteration's loss (the imported weights') against LlavaForConditionalGeneration
on the same batch. Skips without CUDA (and the TE cases without transformer-engine).
Results: docs/results.md."""

import importlib.util

import pytest
import torch

from examples.mimo.model_providers import llava
from examples.mimo.training.hetero.config import parse_config
from tests.unit_tests.models import hf_models
from tests.unit_tests.models.dist_harness import run_train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

FAMILIES = {
    "llama_clip": dict(
        text=dict(model_type="llama", vocab_size=32064, hidden_size=2048, intermediate_size=8192,
                  num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=64, max_position_embeddings=4096,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        vision=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                    num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
                    hidden_act="quick_gelu"),
        image_token_index=32000),
    "qwen3_siglip": dict(
        text=dict(model_type="qwen3", vocab_size=151936, hidden_size=1024,
                  intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                  tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                             "rope_theta": 1e6}),
        vision=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                    num_hidden_layers=27, num_attention_heads=16, image_size=384, patch_size=14),
        image_token_index=151655, tie_word_embeddings=True, vision_feature_select_strategy="full"),
}
FLAGS = ["--model-provider", "llava", "--colocated", "--device", "cuda", "--bf16",
         "--train-iters", "1", "--global-batch-size", "2", "--micro-batch-size", "1",
         "--seq-length", "1024", "--mock-text-vocab", "4000"]
# bf16 weights and activations on both sides, different kernels (TE's fused GEMMs and attention,
# transformers' sdpa). Found on an H200: 1.3e-6 to 4.5e-5 relative; the bound leaves 20x that.
RTOL = 1e-3


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    path = hf_models.llava(tmp_path_factory.mktemp("hf") / request.param, device="cuda",
                           dtype=torch.bfloat16, **FAMILIES[request.param])
    torch.cuda.empty_cache()
    return path, {}


def transformers_loss(folder, flags, cache):
    """transformers' loss of the run's batch, once per folder (both layer kinds read it)."""
    if "loss" not in cache:
        from transformers import LlavaForConditionalGeneration

        cfg = parse_config(flags, world_size=1)
        spec = llava.data_spec(cfg.model)
        samples = hf_models.mock_batch(cfg, spec)
        model = LlavaForConditionalGeneration.from_pretrained(
            folder, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
        cache["loss"] = hf_models.llava_loss(model, samples)
        del model
        torch.cuda.empty_cache()
    return cache["loss"]


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_a_released_size_llava_from_transformers_computes_its_loss(impl, family, tmp_path):
    if impl == "transformer_engine" and importlib.util.find_spec("transformer_engine") is None:
        pytest.skip("transformer-engine is not installed")
    folder, cache = family
    flags = [*FLAGS, "--load-from-hf", folder, "--transformer-impl", impl]
    rows, _ = run_train(1, tmp_path, flags)
    theirs = transformers_loss(folder, flags, cache)
    print(f"{folder.rsplit('/', 1)[-1]} {impl}: ours {rows[0]['lm_loss']:.5f}, transformers "
          f"{theirs:.5f}, relative difference {abs(rows[0]['lm_loss'] - theirs) / theirs:.2e}")
    assert rows[0]["lm_loss"] == pytest.approx(theirs, rel=RTOL)
