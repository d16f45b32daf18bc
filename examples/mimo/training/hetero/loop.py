"""The training loop: data, optimizer, schedule, iterations, logging."""

from __future__ import annotations

from functools import partial

import torch.distributed as dist

from examples.mimo.data import DATA_PROVIDERS
from examples.mimo.data.lanes import ENCODER, LLM, LaneIterator, collate, rank_layout
from examples.mimo.model_providers import ENCODER_MODULE, MODEL_PROVIDERS
from examples.mimo.training.hetero import checkpointing
from examples.mimo.training.hetero.grad_sync import GradSync
from examples.mimo.training.hetero.logger import IntervalLogger, report_peak_memory
from examples.mimo.training.hetero.optim import build_optimizer, build_scheduler
from examples.mimo.training.hetero.runtime import Runtime
from examples.mimo.training.hetero.step import configure_schedule, train_step
from examples.mimo.training.hetero.topology import LANGUAGE


def data_iterator(rt: Runtime, consumed_samples: int = 0) -> LaneIterator:
    cfg = rt.cfg
    role = LLM if rt.topology.module_name == LANGUAGE else ENCODER
    layout = rank_layout(role=role, dp_rank=rt.topology.module_pgc(rt.topology.module_name).dp.rank(),
                         micro_batch_size=cfg.batch.micro_batch_size, llm_dp=cfg.grid.llm_dp,
                         encoder_dp=cfg.grid.encoder_dp, num_microbatches=cfg.batch.num_microbatches)
    provider = DATA_PROVIDERS[cfg.data_provider]
    model_provider = MODEL_PROVIDERS[cfg.model_provider]
    make_sample = partial(provider.make_sample, cfg=cfg.data, spec=model_provider.data_spec(cfg.model),
                          seq_length=cfg.batch.seq_length, seed=cfg.runtime.seed,
                          with_images=not cfg.grid.llm_only)
    collate_fn = partial(collate, role=role, encoder_module=ENCODER_MODULE,
                         encoder_name=model_provider.VIT_ENCODER, fan_in=layout.fan_in,
                         device=rt.device, dtype=rt.dtype)
    return LaneIterator(layout, make_sample, collate_fn, consumed_samples)


def train(rt: Runtime) -> list:
    """Run the configured iterations; returns the StepResults (losses only on the logging rank)."""
    cfg = rt.cfg
    optimizer = build_optimizer(rt)
    scheduler = build_scheduler(optimizer, cfg)
    grad_sync = GradSync(branches=rt.branches, topology=rt.topology, device=rt.device)
    configure_schedule(rt, grad_sync)
    ck = cfg.ckpt
    restored = checkpointing.load(rt, optimizer=optimizer, scheduler=scheduler) if ck.load else None
    # Pretrained branch weights only start a run; a checkpoint of this run takes precedence.
    if restored is None and (ck.load_language_from or ck.load_vision_from):
        checkpointing.load_pretrained(rt, optimizer=optimizer, language_from=ck.load_language_from,
                                      vision_from=ck.load_vision_from)
    start, consumed = restored or (0, 0)
    data = data_iterator(rt, consumed)
    log = IntervalLogger(enabled=rt.is_logging_rank, interval=cfg.log.log_interval,
                         total_iters=cfg.schedule.train_iters,
                         global_batch=cfg.batch.global_batch_size, seq_length=cfg.batch.seq_length,
                         world_size=dist.get_world_size(), metrics_file=cfg.log.metrics_file)
    results = []
    iteration = saved = start

    def save() -> None:
        nonlocal saved
        checkpointing.save(rt, optimizer=optimizer, scheduler=scheduler, iteration=iteration,
                           consumed_samples=data.state_dict()["consumed_samples"])
        saved = iteration

    try:
        while iteration < cfg.schedule.train_iters:
            iteration += 1
            result = train_step(rt=rt, optimizer=optimizer, scheduler=scheduler,
                                grad_sync=grad_sync, data_iterator=data)
            log.record(iteration, result)
            results.append(result)
            if ck.save and ck.save_interval and iteration % ck.save_interval == 0:
                save()
            if ck.exit_interval and iteration % ck.exit_interval == 0:
                break
        if ck.save and saved != iteration:
            save()
    finally:
        log.close()
    report_peak_memory(rank=dist.get_rank(), module=rt.topology.module_name, device=rt.device)
    return results
