"""Checkpoint helpers run under torchrun.

    ckpt_worker.py kill_during_save <rank> <iteration> <train_hetero flags...>
        SIGKILLs <rank> inside the save of <iteration>, after the other ranks started writing.
    ckpt_worker.py write_language <dir> <seed> <drop_key|-> <train_hetero flags...>
        (1 process) saves a plain single-grid megatron-core language model as a dist-checkpoint,
        and its full state dict as <dir>.pt, optionally without one key.
    ckpt_worker.py check_language <reference.pt> <out_dir> <train_hetero flags...>
        builds the hetero run with --load-language-from and records, on every LLM rank, whether
        each language-model weight equals the reference.
"""

import json
import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.transformer.spec_utils import build_module

from examples.mimo import train_hetero
from examples.mimo.model_providers.mock import language_spec
from examples.mimo.training.hetero import checkpointing
from examples.mimo.training.hetero.config import GridConfig, parse_config
from examples.mimo.training.hetero.device import init_distributed
from examples.mimo.training.hetero.optim import build_optimizer
from examples.mimo.training.hetero.runtime import build_runtime
from examples.mimo.training.hetero.topology import LANGUAGE, Topology


def kill_during_save(rank: int, iteration: int, argv):
    real_save = dist_checkpointing.save

    def save(state, path, **kwargs):
        if f"iter_{iteration:07d}" in path and int(os.environ["RANK"]) == rank:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(state, path, **kwargs)

    checkpointing.dist_checkpointing.save = save
    train_hetero.run(argv)


def single_rank_language(argv):
    cfg = parse_config(argv, world_size=2)
    init_distributed("cpu", 1)
    single = GridConfig(1, 1, 1, 1, 1, 1, 1, True)
    topo = Topology(single, timeout=timedelta(minutes=1), pipeline_dtype=torch.float32)
    return cfg, topo


def write_language(path: str, seed: int, drop: str, argv):
    cfg, topo = single_rank_language(argv)
    torch.manual_seed(seed)
    lm = build_module(language_spec(cfg.model, pg_collection=topo.module_pgc(LANGUAGE), tp=1, pp=1,
                                    dtype=torch.float32, seq_length=cfg.batch.seq_length))
    sharded = lm.sharded_state_dict(prefix="", metadata={"dp_cp_group": topo.module_pgc(LANGUAGE).dp_cp})
    if drop != "-":
        del sharded[drop]
    os.makedirs(path)
    dist_checkpointing.save(sharded, path)
    torch.save({k: v for k, v in lm.state_dict().items() if "_extra_state" not in k}, path + ".pt")
    topo.destroy()
    dist.destroy_process_group()


def check_language(reference: str, out_dir: str, argv):
    cfg = parse_config(argv, world_size=int(os.environ["WORLD_SIZE"]))
    rt = build_runtime(cfg)
    optimizer = build_optimizer(rt)
    checkpointing.load_pretrained(rt, optimizer=optimizer, language_from=cfg.ckpt.load_language_from,
                                  vision_from=None)
    if LANGUAGE in rt.branches:
        want = torch.load(reference, weights_only=True)
        got = rt.branches[LANGUAGE].module.state_dict()
        same = {k: torch.equal(got[k], v) for k, v in want.items()}
        with open(f"{out_dir}/rank{os.environ['RANK']}.json", "w") as f:
            json.dump(same, f)
    rt.close()


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "kill_during_save":
        kill_during_save(int(rest[0]), int(rest[1]), rest[2:])
    elif mode == "write_language":
        write_language(rest[0], int(rest[1]), rest[2], rest[3:])
    else:
        check_language(rest[0], rest[1], rest[2:])
