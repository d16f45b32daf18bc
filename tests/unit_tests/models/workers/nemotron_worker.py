"""Builds this rank's branch of the Nemotron VLM (no training) and reports its structure.

Model construction does not run Mamba kernels, so Mamba presets build on CPU too; the provider's
own build() refuses them there because training would need the GPU. Writes
<out>/<case>.rank<N>.json:
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


def build_case(out_dir, case, cfg):
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
    with open(f"{out_dir}/{case}.rank{os.environ['RANK']}.json", "w") as f:
        json.dump(report, f)
    topology.destroy()


def main(out_dir, cases):
    """cases: NAME followed by its flags, cases separated by "::"; all built in one job."""
    configs = {}
    while cases:
        end = cases.index("::") if "::" in cases else len(cases)
        name, argv, cases = cases[0], cases[1:end], cases[end + 1:]
        configs[name] = parse_config(["--model-provider", provider.NAME, "--device", "cpu",
                                      "--train-iters", "1", *argv],
                                     world_size=int(os.environ["WORLD_SIZE"]))
    init_distributed("cpu", 1.0)
    # As the trainer's start-up; for Mamba models before megatron.core.ssm is imported (without
    # it MambaMixer cannot be built).
    compat.apply_startup(backend="gloo", timeout=timedelta(minutes=1),
                         mamba=any(provider.facts(c.model).uses_mamba for c in configs.values()))
    for name, cfg in configs.items():
        build_case(out_dir, name, cfg)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
