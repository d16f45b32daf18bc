"""Model FLOPs (model_providers/flops.py and each provider's ``flops``): against torch's FLOP
counter over a real forward and backward of each branch, and against values worked by hand."""

import json

import pytest

from examples.mimo.interfaces import StepWork
from examples.mimo.model_providers import flops as F
from examples.mimo.model_providers import mock
from examples.mimo.model_providers import nemotron_moe_vlm as nemotron
from tests.unit_tests.models.test_hetero_energon import worker


@pytest.fixture(scope="module")
def counted():
    lines = worker("flops_worker").stdout.strip().splitlines()
    return {c["case"]: c for c in map(json.loads, (ln for ln in lines if ln.startswith("{")))}


@pytest.mark.parametrize("case", ["mock", "mock-frozen-vit", "nemotron-tiny-cpu",
                                  "nemotron-projector-only", "nemotron-affine-gqa",
                                  "llava-tiny-cpu", "llava-siglip-frozen-vit",
                                  "llava-projector-only"])
def test_formula_matches_torch_flop_counter(counted, case):
    """Frozen stages too (no weight gradients, input gradients only where one must pass). The one
    gap: with the LLM frozen, megatron's router still computes its weight gradient (0.2 %).
    nemotron-affine-gqa has a dense MLP layer ('-'), which the local hybrid spec lacked before."""
    c = counted[case]
    for branch in ("encoder", "llm"):
        assert c[branch] > 0
        assert abs(c[f"formula_{branch}"] - c[branch]) / c[branch] < 0.01, (branch, c)


def test_blocks_by_hand():
    # 2 sequences of 8 tokens, hidden 16, 4 heads of 4, 2 K/V groups
    att = F.attention(2, 8, hidden=16, heads=4, groups=2, head_dim=4)
    assert att.first == 2 * 16 * 16 * 32  # QKV: 16 tokens x 16 -> (4 + 2 x 2) x 4 = 32
    assert att.core == 2 * (2 * 2 * 8 * 8 * 16)  # QK^T and PV: 2 sequences x 8 x 8 x 16
    assert att.inner == 2 * 16 * 16 * 16  # output projection
    moe = F.moe(10, 8, experts=4, topk=2, ffn=6, shared_ffn=12)
    assert moe.forward == 2 * 10 * 8 * 4 + 2 * (2 * 2 * 10 * 8 * 6) + 2 * 2 * 10 * 8 * 12
    # Mamba: 1 sequence of 4 tokens (chunk 4), hidden 8, 2 heads of 4 (inner 8), state 2, 1 group
    m = F.mamba(1, 4, 8, heads=2, head_dim=4, state=2, groups=1, conv_width=4)
    in_proj, conv = 2 * 4 * 8 * (16 + 4 + 2), 2 * 4 * (8 + 4) * 4
    scan = 2 * 4 * 4 * (2 + 8) + 4 * 4 * 2 * 8
    assert (m.first, m.inner, m.core) == (in_proj, conv + 2 * 4 * 8 * 8, scan)
    # backward: weight matmuls 1 + w + (input needed), activation matmuls 1 + 2 when one passes
    w = F.Work(first=1.0, inner=10.0, core=100.0)
    assert F.train(w, weights=True, inputs=True) == 3 + 30 + 300
    assert F.train(w, weights=True, inputs=False) == 2 + 30 + 300
    assert F.train(w, weights=False, inputs=True) == 2 + 20 + 300
    assert F.train(w, weights=False, inputs=False) == 1 + 10 + 100


def test_nemotron_20l_step_by_hand():
    """The Nemotron 20-layer LLM at seq 2048: per token and layer kind, as a reader would add it up."""
    cfg = nemotron.config_from_args(_args(nemotron, ["--model-preset", "nemotron-20l"]))
    got = nemotron.flops(cfg, StepWork(sequences=1, seq_length=2048, images=0)).llm
    h, s = 2688, 2048
    mamba = (2 * h * (2 * 4096 + 2 * 8 * 128 + 64) + 2 * (4096 + 2048) * 4
             + 2 * 128 * (8 * 128 + 4096) + 4 * 128 * 4096 + 2 * 4096 * h)
    attention = 2 * h * (32 + 4) * 128 + 2 * 2 * s * 32 * 128 + 2 * 32 * 128 * h
    moe = 2 * h * 128 + 6 * 4 * h * 1856 + 4 * h * 3712
    per_token = 8 * mamba + 2 * attention + 10 * moe + 2 * h * 131072
    assert got == pytest.approx(3 * s * per_token, rel=1e-12)
    # ~1.51 B parameters active per token (6 of 128 experts) -> ~3 GFLOP forward, x3 with backward
    assert 3 * per_token / 1e9 == pytest.approx(9.347, abs=0.001)


def _args(provider, argv):
    import argparse

    parser = argparse.ArgumentParser()
    provider.add_args(parser)
    return parser.parse_args(argv)


def test_frozen_encoder_and_llm_only():
    cfg = mock.config_from_args(_args(mock, []))
    full = mock.flops(cfg, StepWork(sequences=4, seq_length=64, images=4))
    text = mock.flops(cfg, StepWork(sequences=4, seq_length=64, images=0))
    assert text.encoder == 0 and text.llm == full.llm  # the LLM trains: its input grads run anyway
    frozen = mock.flops(mock.config_from_args(_args(mock, ["--freeze-vit", "--freeze-projection",
                                                           "--freeze-lm"])),
                        StepWork(sequences=4, seq_length=64, images=4))
    assert 3 * frozen.llm == full.llm  # forward only
    # ... and so the encoder, but for the patch convolution: it never computes an image gradient
    conv = 2 * 16 * (3 * 4 * 4) * 32  # per image: 16 patches of 3 x 4 x 4 -> 32
    assert 3 * frozen.encoder - full.encoder == 4 * conv
