"""Imports Hugging Face LLaVA weights into a layout and writes the logits the model computes.

    torchrun -m tests.unit_tests.models.workers.llava_worker OUT CASE FLAGS... [:: CASE FLAGS...]

Each case is a trainer flag list (world size = this job's): the model is built, wrapped and loaded
as the trainer does it (build_runtime, build_optimizer, checkpointing.load_from_hf), then one
global batch of the trainer's own data lanes runs forward through the 1F1B schedule across the
bridge (forward only, no labels: the language model returns logits). Each LLM rank of the last
stage with TP rank 0 writes <OUT>/<CASE>.rank<N>.pt: [(input_ids [b, s], logits [b, s, vocab])]
per micro-batch, the logits gathered over TP.
"""

import os
import sys
from functools import partial

import torch
import torch.distributed as dist

from examples.mimo.training.hetero.checkpointing import load_from_hf
from examples.mimo.training.hetero.config import parse_config
from examples.mimo.training.hetero.optim import build_optimizer
from examples.mimo.training.hetero.run import data_iterator
from examples.mimo.training.hetero.runtime import build_runtime
from examples.mimo.training.hetero.topology import LANGUAGE


def forward_step(data, model, *, captured):
    batch = next(data)
    batch.pop("labels", None)  # logits, not the per-token loss
    output, _ = model(**batch)
    return output, partial(keep, batch.get("input_ids"), captured)


def keep(ids, captured, logits):
    captured.append((ids, logits.detach()))
    return logits.sum() * 0, torch.ones((), dtype=torch.int), {}


def run_case(out_dir: str, case: str, argv):
    from megatron.core.pipeline_parallel.schedules import \
        forward_backward_pipelining_without_interleaving

    cfg = parse_config(["--model-provider", "llava", "--device", "cpu", "--train-iters", "1",
                        "--distributed-timeout-minutes", "1", *argv],
                       world_size=int(os.environ["WORLD_SIZE"]))
    rt = build_runtime(cfg)
    ck = cfg.ckpt
    parts = rt.model_provider.hf_parts(cfg.model, load_from_hf=ck.load_from_hf,
                                       language_from=ck.load_language_from,
                                       vision_from=ck.load_vision_from)
    load_from_hf(rt, optimizer=build_optimizer(rt), parts=parts)
    captured = []
    with torch.no_grad():
        forward_backward_pipelining_without_interleaving(
            forward_step_func=partial(forward_step, captured=captured),
            data_iterator=data_iterator(rt), model=[rt.model],
            num_microbatches=cfg.batch.num_microbatches, seq_length=cfg.batch.seq_length,
            micro_batch_size=cfg.batch.micro_batch_size, forward_only=True,
            p2p_communicator=rt.topology.communicator, pg_collection=rt.topology.schedule_pgc)
    llm = rt.topology.module_pgc(LANGUAGE)
    if captured:
        rows = []
        for ids, logits in captured:
            shards = [torch.empty_like(logits) for _ in range(llm.tp.size())]
            dist.all_gather(shards, logits.contiguous(), group=llm.tp)
            rows.append((ids, torch.cat(shards, dim=-1)))
        if llm.tp.rank() == 0:
            torch.save(rows, f"{out_dir}/{case}.rank{dist.get_rank()}.pt")
    dist.barrier()
    rt.model.destroy()
    rt.topology.destroy()


def main(out_dir, cases):
    while cases:
        end = cases.index("::") if "::" in cases else len(cases)
        run_case(out_dir, cases[0], cases[1:end])
        cases = cases[end + 1:]
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
