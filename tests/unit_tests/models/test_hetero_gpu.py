"""GPU tier: NCCL + bf16 hetero training, encoder on GPU 0 and the LLM on the rest.

    torchrun --nproc-per-node 2 -m pytest tests/unit_tests/models/test_hetero_gpu.py

Skips under plain pytest and on machines without a GPU per rank.
"""

import math
import os

import pytest
import torch

WORLD = int(os.environ.get("WORLD_SIZE", "1"))
pytestmark = pytest.mark.skipif(
    WORLD < 2 or torch.cuda.device_count() < WORLD,
    reason="needs torchrun with one GPU per rank and at least 2 ranks")


def _train(extra):
    from examples.mimo.training.hetero.config import parse_config
    from examples.mimo.training.hetero.loop import train
    from examples.mimo.training.hetero.runtime import build_runtime

    cfg = parse_config(["--device", "cuda", "--bf16", "--llm-dp", str(WORLD - 1),
                        "--global-batch-size", str(8 * (WORLD - 1)), "--train-iters", "30",
                        "--lr", "2e-3", "--lr-warmup-iters", "3", "--log-interval", "10",
                        "--distributed-timeout-minutes", "4", *extra], world_size=WORLD)
    rt = build_runtime(cfg)
    results = train(rt)
    logging_rank = rt.is_logging_rank
    rt.close()
    assert not any(r.skipped for r in results)
    assert all(math.isfinite(r.grad_norm) and r.grad_norm > 0 for r in results)
    return results if logging_rank else None


def test_bf16_nccl_training_loss_falls():
    results = _train([])
    if results is not None:
        losses = [r.lm_loss for r in results]
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3


def test_nemotron_tiny_with_mamba_layers_trains():
    """The tiny preset's Mamba layer runs mamba-ssm's Triton kernels; MoE reports its aux loss."""
    results = _train(["--model-provider", "nemotron_moe_vlm", "--model-preset", "tiny",
                      "--seq-length", "64"])
    if results is not None:
        losses = [r.lm_loss for r in results]
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
        balance = [r.moe_losses["seq_load_balancing_loss"] for r in results]
        assert all(math.isfinite(b) and b > 0 for b in balance)
