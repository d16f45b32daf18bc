"""Builds this rank's branch of the Nemotron VLM (no training) and reports its structure.

Model construction does not run Mamba kernels, so Mamba presets build on CPU too; the provider's
own build() refuses them there because training would need the GPU. Writes <out>/rank<N>.json:
branch name, parameter counts per part, trainable counts per part, LLM layer kinds.
"""

import json
import os
import sys
from datetime import timedelta

import torch

from examples.mimo.model_providers import common
from examples.mimo.model_providers import nemotron_moe_vlm as provider
from examples.mimo.training.hetero import compat
from examples.mimo.training.hetero.config import parse_config
from examples.mimo.training.hetero.device import init_distributed, seed_all
from examples.mimo.training.hetero.topology import LANGUAGE, Topology


def main(out_dir, argv):
    cfg = parse_config(["--model-provider", provider.NAME, "--device", "cpu", "--train-iters", "1",
                        *argv],
                       world_size=int(os.environ["WORLD_SIZE"]))
    init_distributed("cpu", 1.0)
    # As the trainer's start-up does for Mamba models: without it MambaMixer cannot be built.
    if provider.facts(cfg.model).uses_mamba:
        compat.import_mamba_triton_kernels()
    topology = Topology(cfg.grid, timeout=timedelta(minutes=1), pipeline_dtype=torch.float32)
    own = topology.module_pgc(topology.module_name)
    seed_all(0, device="cpu", tp_rank=own.tp.rank(), ep_rank=own.ep.rank(),
             etp_rank=own.expt_tp.rank())
    grid, m = cfg.grid, cfg.model
    model = common.assemble(
        topology=topology, image_token_id=m.image_token_id,
        language_spec=lambda pgc: provider.language_spec(
            m, pg_collection=pgc, tp=grid.llm_tp, pp=grid.llm_pp, ep=grid.llm_ep,
            expt_tp=grid.llm_expt_tp, dtype=torch.float32, seq_length=cfg.batch.seq_length),
        encoder_spec=lambda pgc: provider.encoder_spec(m, pg_collection=pgc, tp=grid.encoder_tp,
                                                       dtype=torch.float32))
    common.freeze(model, lm=m.freeze_lm, vit=m.freeze_vit, projection=m.freeze_projection)

    parts, trainable = {}, {}
    for name, p in model.named_parameters():
        part = ("projection" if "input_projections" in name else "vit" if "encoders" in name
                else "lm")
        parts[part] = parts.get(part, 0) + p.numel()
        trainable[part] = trainable.get(part, 0) + (p.numel() if p.requires_grad else 0)
    report = {"module": topology.module_name, "params": parts, "trainable": trainable}
    if topology.module_name == LANGUAGE:
        decoder = model.language_model.decoder
        report["layers"] = [type(layer).__name__ for layer in decoder.layers]
        report["final_norm"] = type(decoder.final_norm).__name__
        report["mixers"] = [type(getattr(layer, "mixer", None)).__name__ for layer in decoder.layers]
    else:
        report["encoder"] = type(model.modality_submodules["images"].encoders["radio"]).__name__
    with open(f"{out_dir}/rank{os.environ['RANK']}.json", "w") as f:
        json.dump(report, f)
    topology.destroy()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
