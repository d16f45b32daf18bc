"""Counts the FLOPs of a real forward + backward of each branch with torch's FLOP counter (CPU,
fp32, one process) and prints them beside the provider's formula, one JSON line per case.

    python -m tests.unit_tests.models.workers.flops_worker

The LLM gets its input embeddings as the bridge hands them over: a tensor that needs a gradient
exactly when the encoder trains, so frozen stages count what autograd really runs.
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from examples.mimo.interfaces import StepWork
from examples.mimo.model_providers import llava, mock
from examples.mimo.model_providers import nemotron_moe_vlm as nemotron
from examples.mimo.training.hetero import compat
from examples.mimo.training.hetero.device import enable_cpu_emulation, seed_all

SEQUENCES, SEQ, IMAGES = 2, 48, 3
CASES = {
    "mock": (mock, []),
    "mock-frozen-vit": (mock, ["--freeze-vit"]),
    "nemotron-tiny-cpu": (nemotron, ["--model-preset", "tiny-cpu"]),
    "nemotron-projector-only": (nemotron, ["--model-preset", "tiny-cpu", "--training-stage",
                                           "projector-only"]),
    "nemotron-affine-gqa": (nemotron, ["--model-preset", "tiny-cpu", "--vision-projection-type",
                                       "affine", "--hybrid-layer-pattern", "*-E*"]),
    "llava-tiny-cpu": (llava, ["--model-preset", "tiny-cpu"]),
    "llava-siglip-frozen-vit": (llava, ["--model-preset", "tiny-cpu", "--vision-model-type",
                                        "siglip", "--vision-feature-select-strategy", "full",
                                        "--qk-layernorm", "--freeze-vit"]),
    "llava-projector-only": (llava, ["--model-preset", "tiny-cpu", "--freeze-vit", "--freeze-lm"]),
}


def counted(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def run_case(provider, argv):
    from megatron.core.transformer.spec_utils import build_module

    parser = argparse.ArgumentParser()
    provider.add_args(parser)
    cfg = provider.config_from_args(parser.parse_args(argv))
    kwargs = dict(pg_collection=None, tp=1, dtype=torch.float32)
    encoder_spec = provider.encoder_spec(cfg, **kwargs)
    encoder = encoder_spec.module.from_spec(encoder_spec)
    extra = {"ep": 1, "expt_tp": 1} if provider is nemotron else {}
    llm = build_module(provider.language_spec(cfg, pp=1, seq_length=SEQ, **kwargs, **extra))
    # as model_providers/common.freeze does on the assembled MimoModel
    encoder.encoders.requires_grad_(not cfg.freeze_vit)
    encoder.input_projections.requires_grad_(not cfg.freeze_projection)
    llm.requires_grad_(not cfg.freeze_lm)
    spec = provider.data_spec(cfg)
    images = torch.randn(IMAGES, *spec.image_shape)
    encoder_trains = any(p.requires_grad for p in encoder.parameters())

    def encoder_step():
        out = encoder(encoder_inputs={provider.VIT_ENCODER: {"images": images}})
        if out.requires_grad:
            out.float().sum().backward()

    hidden = llm.config.hidden_size
    ids = torch.randint(0, spec.vocab_size - 1, (SEQUENCES, SEQ))

    def llm_step():
        embeddings = torch.randn(SEQ, SEQUENCES, hidden, requires_grad=encoder_trains)
        loss = llm(input_ids=None, position_ids=torch.arange(SEQ).expand(SEQUENCES, SEQ),
                   attention_mask=None, decoder_input=embeddings, labels=ids)
        if loss.requires_grad:
            loss.sum().backward()

    formula = provider.flops(cfg, StepWork(sequences=SEQUENCES, seq_length=SEQ, images=IMAGES))
    return {"encoder": counted(encoder_step), "llm": counted(llm_step),
            "formula_encoder": formula.encoder, "formula_llm": formula.llm}


def main() -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("PORT", "29541"))
    enable_cpu_emulation()
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(1, 1)
    compat.global_memory_buffer()
    seed_all(0, device="cpu", tp_rank=0, ep_rank=0, etp_rank=0)
    for name, (provider, argv) in CASES.items():
        print(json.dumps({"case": name, **run_case(provider, argv)}), flush=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
