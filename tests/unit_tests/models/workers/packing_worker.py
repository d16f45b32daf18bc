"""Packed vs unpacked: the same samples through a language model, once one per row and once
packed into rows as training feeds them (lanes.model_inputs: one THD sequence, cu_seqlens,
per-sample positions). Prints a JSON line with both per-token loss sums.

    python -m tests.unit_tests.models.workers.packing_worker DATASET [--model mock|nemotron]
        [--device cpu|cuda] [--dtype fp32|bf16] [--impl local|transformer_engine] [--cross-samples]

mock: GPT with rope, local spec (CPU, fp32: bit for bit). nemotron: the tiny preset's hybrid
Mamba/attention/MoE language model (GPU: mamba-ssm's Triton kernels).
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from megatron.energon import WorkerConfig, get_loader, get_train_dataset

from examples.mimo.data.lanes import LLM, model_inputs
from examples.mimo.data.task_encoder import MimoTaskEncoder, packed_sequence_kwargs, position_ids
from examples.mimo.data.tokenizer import Tokenizer
from examples.mimo.interfaces import DataSpec
from examples.mimo.training.hetero import compat
from examples.mimo.training.hetero.device import enable_cpu_emulation, seed_all

VOCAB = 256


def build(model: str, impl: str, dtype: torch.dtype, seq: int, device: torch.device):
    from megatron.core.transformer.spec_utils import build_module

    if model == "mock":
        from examples.mimo.model_providers import mock

        cfg = mock.MockModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4,
                                   vocab_size=VOCAB, encoder_hidden_size=32, encoder_num_layers=1,
                                   encoder_num_attention_heads=4, img_h=16, img_w=16, patch_dim=4,
                                   freeze_lm=False, freeze_vit=False, freeze_projection=False)
        spec = mock.language_spec(cfg, pg_collection=None, tp=1, pp=1, dtype=dtype, seq_length=seq)
    else:
        from examples.mimo.model_providers import nemotron_moe_vlm as nemotron

        parser = argparse.ArgumentParser()
        nemotron.add_args(parser)
        cfg = nemotron.config_from_args(parser.parse_args(
            ["--model-preset", "tiny", "--vocab-size", str(VOCAB), "--transformer-impl", impl]))
        spec = nemotron.language_spec(cfg, pg_collection=None, tp=1, pp=1, ep=1, expt_tp=1,
                                      dtype=dtype, seq_length=seq)
    return build_module(spec).to(device=device, dtype=dtype).eval()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dataset")
    p.add_argument("--model", choices=("mock", "nemotron"), default="mock")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--impl", choices=("local", "transformer_engine"), default="local")
    p.add_argument("--seq-length", type=int, default=96)
    p.add_argument("--cross-samples", action="store_true",
                   help="control: Mamba state runs on across samples (seq_idx all 0)")
    a = p.parse_args()
    seq, dtype = a.seq_length, {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    device = torch.device(a.device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("PORT", "29533"))
    if a.device == "cpu":
        enable_cpu_emulation()
    else:
        torch.cuda.set_device(0)
    if a.model == "nemotron":
        compat.import_mamba_triton_kernels()  # before megatron.core.ssm is imported
    dist.init_process_group("gloo" if a.device == "cpu" else "nccl", rank=0, world_size=1)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(1, 1)
    compat.global_memory_buffer()
    seed_all(3, device=a.device, tp_rank=0, ep_rank=0, etp_rank=0)
    model = build(a.model, a.impl, dtype, seq, device)
    # Text and VQA/caption samples (images left out: only the language model is under test,
    # the placeholders are then ordinary prompt tokens).
    spec = DataSpec(vocab_size=VOCAB, image_token_id=VOCAB - 1, image_tokens=16,
                    image_shape=(3, 16, 16))
    encoder = MimoTaskEncoder(tokenizer=Tokenizer(os.path.join(a.dataset, "tokenizer")), spec=spec,
                              seq_length=seq, with_images=False)
    dataset = get_train_dataset(os.path.join(a.dataset, "blend.yaml"),
                                worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0),
                                batch_size=None, task_encoder=encoder, shuffle_buffer_size=None,
                                max_samples_per_sequence=None)
    # Two packed rows of several samples each: the rows' boundaries are crossed in the THD layout.
    it, rows = iter(get_loader(dataset)), []
    for _ in range(2):
        samples = []
        while sum(s.input_ids.numel() for s in samples) < seq - 30:
            samples.append(next(it))
        rows.append(samples)
    samples = [s for row in rows for s in row]
    packed = encoder.batch([encoder.pack_selected_samples(row) for row in rows])
    unpacked = encoder.batch(samples)

    def loss_sum(batch, packing: bool):
        batch = dict(batch, position_ids=position_ids(batch["seqlens"], seq))
        if packing:
            batch["packing_kwargs"] = packed_sequence_kwargs(batch["seqlens"], seq)
        inputs = model_inputs(batch, role=LLM, encoder_module="images", encoder_name="vit",
                              fan_in=False, device=device, dtype=dtype)
        packed_seq_params = None
        if packing:
            from megatron.core.packed_seq_params import PackedSeqParams

            packed_seq_params = PackedSeqParams(qkv_format="thd", **inputs["packing_kwargs"])
            if a.cross_samples:
                packed_seq_params.seq_idx = torch.zeros_like(packed_seq_params.seq_idx)
        with torch.no_grad():
            per_token = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                              attention_mask=None, labels=inputs["labels"],
                              packed_seq_params=packed_seq_params)
        mask = inputs["loss_mask"]
        return (per_token.float() * mask).sum().item(), mask.sum().item()

    (a_sum, ta), (b_sum, tb) = loss_sum(unpacked, False), loss_sum(packed, True)
    print(json.dumps({"samples": len(samples), "rows": [len(r) for r in rows],
                      "unpacked": a_sum, "packed": b_sum, "tokens": [ta, tb],
                      "keys": [[k for r in packed["keys"] for k in r],
                               [k for r in unpacked["keys"] for k in r]],
                      "workarounds": compat.active()}))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
