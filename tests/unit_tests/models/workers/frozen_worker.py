"""Projector-only stage: trains with --freeze-lm --freeze-vit and reports, per parameter group
on each rank, whether training changed it. Writes <out>/rank<N>.json."""

import json
import os
import sys

import torch

from examples.mimo.training.hetero.config import parse_config
from examples.mimo.training.hetero.loop import train
from examples.mimo.training.hetero.runtime import build_runtime


def main(out_dir, argv):
    cfg = parse_config(argv, world_size=int(os.environ["WORLD_SIZE"]))
    rt = build_runtime(cfg)
    before = {n: p.detach().clone() for n, p in rt.model.named_parameters()}
    results = train(rt)
    changed = {}
    for n, p in rt.model.named_parameters():
        part = "projection" if "input_projections" in n else "vit" if "encoders" in n else "lm"
        changed.setdefault(part, []).append(not torch.equal(before[n], p.detach()))
    report = {part: (any(v), all(v)) for part, v in changed.items()}
    report["params"] = sum(p.numel() for p in rt.model.parameters())
    report["losses"] = [r.lm_loss for r in results]
    with open(f"{out_dir}/rank{os.environ['RANK']}.json", "w") as f:
        json.dump(report, f)
    rt.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
