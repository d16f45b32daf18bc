"""Dynamic-resolution RADIO against itself and against fixed resolution, on one rank.

Writes <out>/result.json with the largest absolute differences of: two images packed together vs
each image packed alone (attention must not cross images), and one image packed vs the same image
through the fixed-resolution path (patch order, class tokens, pixel shuffle must agree).
"""

import json
import sys
from datetime import timedelta

import torch

from examples.mimo.model_providers import nemotron_moe_vlm as provider
from examples.mimo.images import patchify
from examples.mimo.model_providers.radio_encoder import RadioEncoder
from examples.mimo.training.hetero import compat
from examples.mimo.training.hetero.config import parse_config
from examples.mimo.training.hetero.device import init_distributed, seed_all
from examples.mimo.training.hetero.topology import Topology


def build(cfg, pgc, dynamic):
    m = cfg.model
    spec = provider.encoder_spec(m, pg_collection=pgc, tp=1, dtype=torch.float32)
    params = dict(spec.submodules["encoders"][provider.VIT_ENCODER].params,
                  dynamic_resolution=dynamic)
    return RadioEncoder(**params).eval()


def main(out_dir):
    cfg = parse_config(["--model-provider", provider.NAME, "--model-preset", "tiny-cpu",
                        "--device", "cpu", "--train-iters", "1", "--llm-only"], world_size=1)
    init_distributed("cpu", 1.0)
    compat.apply_startup(backend="gloo", timeout=timedelta(minutes=1), mamba=False)  # as the trainer
    topology = Topology(cfg.grid, timeout=timedelta(minutes=1), pipeline_dtype=torch.float32)
    pgc = topology.module_pgc(topology.module_name)
    seed_all(0, device="cpu", tp_rank=0, ep_rank=0, etp_rank=0)
    fixed, dynamic = build(cfg, pgc, False), build(cfg, pgc, True)
    dynamic.load_state_dict(fixed.state_dict())
    p = cfg.model.arch.patch_dim
    a = torch.randn(3, cfg.model.arch.img_h, cfg.model.arch.img_w)
    b = torch.randn(3, 16, 48)
    with torch.no_grad():
        both = dynamic(packed_patches=torch.cat([patchify(a, p), patchify(b, p)])[None],
                       imgs_sizes=[tuple(a.shape[1:]), tuple(b.shape[1:])])
        alone = torch.cat([dynamic(packed_patches=patchify(x, p)[None], imgs_sizes=[tuple(x.shape[1:])])
                           for x in (a, b)])
        via_fixed = fixed(images=a[None])[0]
    result = {"shapes": [list(both.shape), list(alone.shape), list(via_fixed.shape)],
              "packed_vs_alone": (both - alone).abs().max().item(),
              "packed_vs_fixed": (alone[:via_fixed.shape[0]] - via_fixed).abs().max().item(),
              "scale": via_fixed.abs().max().item()}
    with open(f"{out_dir}/result.json", "w") as f:
        json.dump(result, f)
    topology.destroy()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
