"""Builds a Topology per layout, records every group's ranks, and pushes a tensor across the
encoder->LLM bridge; then destroys it and builds the next. Writes <out>/<layout>.rank<N>.json."""

import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from examples.mimo.interfaces import ENCODER_MODULE
from examples.mimo.training.hetero import compat
from examples.mimo.training.hetero.config import GridConfig
from examples.mimo.training.hetero.device import init_distributed
from examples.mimo.training.hetero.topology import REQUIRED_GROUPS, Topology

ROWS_PER_ENCODER_RANK = 4


def check(out_dir: str, name: str, encoder_tp, encoder_dp, llm_tp, llm_pp, llm_dp, llm_ep, llm_only):
    grid = GridConfig(encoder_tp=encoder_tp, encoder_dp=encoder_dp, llm_tp=llm_tp, llm_pp=llm_pp,
                      llm_dp=llm_dp, llm_ep=llm_ep, llm_expt_tp=llm_tp, llm_only=bool(llm_only))
    topo = Topology(grid, timeout=timedelta(minutes=1), pipeline_dtype=torch.float32)
    rank = dist.get_rank()
    pgc = topo.module_pgc(topo.module_name)
    groups = {f: dist.get_process_group_ranks(getattr(pgc, f)) for f in REQUIRED_GROUPS}
    for f in ("embd", "pos_embd"):
        pg = getattr(pgc, f)
        groups[f] = None if pg is None else dist.get_process_group_ranks(pg)
    received = None
    if not grid.llm_only:
        if topo.module_name == ENCODER_MODULE:
            # Row r of encoder DP rank e carries the value 100 * e + r.
            e = pgc.dp.rank()
            rows = 100.0 * e + torch.arange(ROWS_PER_ENCODER_RANK, dtype=torch.float32)
            topo.communicator.send_forward({ENCODER_MODULE: rows[:, None].repeat(1, 8)})
        elif pgc.pp.rank() == 0:
            got = topo.communicator.recv_forward()[ENCODER_MODULE]
            assert torch.equal(got, got[:, :1].expand_as(got))
            received = got[:, 0].tolist()
    with open(f"{out_dir}/{name}.rank{rank}.json", "w") as f:
        json.dump({"module": topo.module_name, "groups": groups, "received": received}, f)
    topo.destroy()


def main(out_dir: str, layouts):
    """Each layout in turn in one job (same world size): name:e_tp,e_dp,l_tp,l_pp,l_dp,l_ep,only"""
    init_distributed("cpu", 1)
    compat.apply_startup(backend="gloo", timeout=timedelta(minutes=1), mamba=False)  # as the trainer
    for layout in layouts:
        name, sizes = layout.split(":")
        check(out_dir, name, *map(int, sizes.split(",")))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
