"""Packed vs unpacked: the same samples through the mock provider's language model (local spec,
CPU, fp32), once one per row and once packed into one row with the block-causal mask and
per-sample positions. Prints a JSON line with both per-token loss sums.

    python -m tests.unit_tests.models.workers.packing_worker DATASET
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from megatron.energon import WorkerConfig, get_loader, get_train_dataset

from examples.mimo.data.task_encoder import MimoTaskEncoder, block_causal_mask, position_ids
from examples.mimo.data.tokenizer import Tokenizer
from examples.mimo.interfaces import DataSpec
from examples.mimo.model_providers import mock
from examples.mimo.training.hetero.device import enable_cpu_emulation, seed_all

SEQ = 96


def main(root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("PORT", "29533"))
    enable_cpu_emulation()
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state
    from megatron.core.transformer.spec_utils import build_module

    parallel_state.initialize_model_parallel(1, 1)
    seed_all(3, device="cpu", tp_rank=0, ep_rank=0, etp_rank=0)
    cfg = mock.MockModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, vocab_size=256,
                               encoder_hidden_size=32, encoder_num_layers=1,
                               encoder_num_attention_heads=4, img_h=16, img_w=16, patch_dim=4,
                               freeze_lm=False, freeze_vit=False, freeze_projection=False)
    model = build_module(mock.language_spec(cfg, pg_collection=None, tp=1, pp=1,
                                            dtype=torch.float32, seq_length=SEQ)).eval()
    # Text and VQA/caption samples (images left out: only the language model is under test,
    # the placeholders are then ordinary prompt tokens).
    spec = DataSpec(vocab_size=256, image_token_id=255, image_tokens=16, image_shape=(3, 16, 16))
    encoder = MimoTaskEncoder(tokenizer=Tokenizer(os.path.join(root, "tokenizer")), spec=spec,
                              seq_length=SEQ, with_images=False)
    dataset = get_train_dataset(os.path.join(root, "blend.yaml"),
                                worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0),
                                batch_size=None, task_encoder=encoder, shuffle_buffer_size=None,
                                max_samples_per_sequence=None)
    samples, it = [], iter(get_loader(dataset))
    while sum(s.input_ids.numel() for s in samples) < SEQ - 30:
        samples.append(next(it))
    packed = encoder.pack_selected_samples(samples)
    unpacked = encoder.batch(samples)
    rows = encoder.batch([packed])

    def loss_sum(batch) -> float:
        seqlens = batch["seqlens"]
        with torch.no_grad():
            per_token = model(input_ids=batch["input_ids"], position_ids=position_ids(seqlens, SEQ),
                              attention_mask=block_causal_mask(seqlens, SEQ), labels=batch["labels"])
        return (per_token.float() * batch["loss_mask"]).sum().item(), batch["loss_mask"].sum().item()

    (a, ta), (b, tb) = loss_sum(unpacked), loss_sum(rows)
    print(json.dumps({"samples": len(samples), "unpacked": a, "packed": b, "tokens": [ta, tb],
                      "keys": [packed.keys, [k for r in unpacked["keys"] for k in r]]}))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
