"""The training loop: data, optimizer, schedule, checkpoints, iterations, logging."""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch.distributed as dist

from examples.mimo.data.lanes import COLOCATED, ENCODER, LLM, ColocatedIterator, model_inputs
from examples.mimo.interfaces import ENCODER_MODULE, RankData, StepWork
from examples.mimo.training.hetero import compat
from examples.mimo.training.hetero.checkpointing import Checkpointer, load_pretrained
from examples.mimo.training.hetero.config import describe
from examples.mimo.training.hetero.divergence import DivergenceCheck
from examples.mimo.training.hetero.errors import TrainingDiverged
from examples.mimo.training.hetero.evaluation import evaluate
from examples.mimo.training.hetero.exits import ExitConditions
from examples.mimo.training.hetero.grad_sync import GradSync
from examples.mimo.training.hetero.graphs import CudaGraphs
from examples.mimo.training.hetero.logger import DataWait, IntervalLogger, report_peak_memory
from examples.mimo.training.hetero.optim import build_optimizer, build_scheduler
from examples.mimo.training.hetero.profiling import Profiler
from examples.mimo.training.hetero.runtime import Runtime
from examples.mimo.training.hetero.state import TrainState
from examples.mimo.training.hetero.step import configure_schedule, train_step
from examples.mimo.training.hetero.timers import (StartupClock, Timers, branch_times,
                                                  instrument_communicator)
from examples.mimo.training.hetero.topology import LANGUAGE


def data_iterator(rt: Runtime, split: str = "train"):
    cfg, g = rt.cfg, rt.cfg.grid
    is_llm = rt.topology.module_name == LANGUAGE

    def build(role: str, module: str):
        rank = RankData(is_llm=role != ENCODER, dp_rank=rt.topology.module_pgc(module).dp.rank(),
                        llm_dp=g.llm_dp, encoder_dp=g.encoder_dp,
                        micro_batch_size=cfg.batch.micro_batch_size,
                        num_microbatches=cfg.batch.num_microbatches,
                        seq_length=cfg.batch.seq_length, seed=cfg.runtime.seed,
                        with_images=not g.llm_only)
        to_model = partial(model_inputs, role=role, encoder_module=ENCODER_MODULE,
                           encoder_name=rt.model_provider.VIT_ENCODER,
                           fan_in=role == ENCODER and g.encoder_dp > g.llm_dp,
                           device=rt.device, dtype=rt.dtype)
        return rt.data_provider.build_iterator(cfg.data, spec=rt.model_provider.data_spec(cfg.model),
                                               rank=rank, to_model=to_model, split=split)

    if g.colocated and g.encoder_dp != g.llm_dp:
        return ColocatedIterator(build(LLM, LANGUAGE), build(ENCODER, ENCODER_MODULE))
    if g.colocated:
        return build(COLOCATED, LANGUAGE)
    return build(LLM, LANGUAGE) if is_llm else build(ENCODER, ENCODER_MODULE)


def interval_logger(rt: Runtime) -> IntervalLogger:
    cfg = rt.cfg
    spec = rt.model_provider.data_spec(cfg.model)

    def flops(images: float):
        return rt.model_provider.flops(cfg.model, StepWork(sequences=cfg.batch.global_batch_size,
                                                           seq_length=cfg.batch.seq_length,
                                                           images=images))

    return IntervalLogger(enabled=rt.is_logging_rank, interval=cfg.log.log_interval,
                          total_iters=cfg.schedule.train_iters,
                          global_batch=cfg.batch.global_batch_size, seq_length=cfg.batch.seq_length,
                          encoder_gpus=cfg.grid.encoder_size, llm_gpus=cfg.grid.llm_size,
                          world=cfg.grid.world_size,
                          flops=flops, tokens_per_image=0 if cfg.grid.llm_only else spec.image_tokens,
                          metrics_file=cfg.log.metrics_file, tensorboard_dir=cfg.log.tensorboard_dir,
                          config_text="\n".join("    " + line for line in (
                              describe(cfg, rt.model_provider.facts(cfg.model)) + "\n\n"
                              + repr(cfg)).splitlines()))


def log_workarounds() -> None:
    """Once per job: the megatron-core workarounds any rank applied or used so far."""
    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, compat.active())
    if dist.get_rank() == 0:
        used = dict.fromkeys(n for rank_names in names for n in rank_names)
        note = compat.version_note()
        print(f"megatron-core workarounds active: {', '.join(used)}" + (f" ({note})" if note else ""),
              flush=True)


def language_graphs(rt: Runtime, optimizer) -> Optional[CudaGraphs]:
    """The language model's CUDA graphs (--cuda-graph-impl) on ranks that hold it, else None."""
    llm = rt.branches.get(LANGUAGE)
    if rt.cfg.kernels.cuda_graph_impl == "none" or llm is None:
        return None
    b = rt.cfg.batch
    return CudaGraphs(rt.cfg.kernels, llm=llm, config=rt.model_provider.module_config(llm.module),
                      pg_collection=rt.topology.module_pgc(LANGUAGE), seq_length=b.seq_length,
                      micro_batch_size=b.micro_batch_size, global_batch_size=b.global_batch_size,
                      data_parallel_size=rt.cfg.grid.llm_dp, optimizer=optimizer,
                      rank=dist.get_rank())


def train(rt: Runtime, *, startup: Optional[StartupClock] = None) -> list:
    """Run the configured iterations; returns the StepResults (losses only on the logging rank).
    ``startup``: the clock started with the process (train_hetero), else one started here."""
    startup = startup or StartupClock()
    cfg = rt.cfg
    ck = cfg.ckpt
    optimizer = build_optimizer(rt)
    scheduler = build_scheduler(optimizer, cfg)
    startup.lap("optimizer")
    grad_sync = GradSync(branches=rt.branches, topology=rt.topology, device=rt.device)
    timers = Timers(rt.device)
    label = ("model" if cfg.grid.colocated  # one stage runs both modules: their time is one
             else "encoder" if rt.topology.module_name == ENCODER_MODULE else "llm")
    instrument_communicator(rt.topology.communicator, timers)
    configure_schedule(rt, grad_sync, timers)
    state = TrainState()
    # Before the first DataLoader worker forks: the workers inherit the handler, so a signal sent
    # to every process of the job (SLURM signals a whole step) sets a flag there too instead of
    # killing them in the middle of the iteration that is to finish.
    if ck.save is not None:
        compat.checkpoint_writer_server(ck.exit_signal)
    exits = ExitConditions(signal_name=ck.exit_signal, duration_mins=ck.exit_duration_mins,
                           device=rt.device)
    data = data_iterator(rt)
    timed_data = DataWait(data)
    checkpointer = Checkpointer(rt, optimizer=optimizer, scheduler=scheduler, train_state=state,
                                data=data)
    restored = ck.load is not None and checkpointer.load()
    # Pretrained branch weights only start a run; a checkpoint of this run takes precedence.
    if not restored and (ck.load_language_from or ck.load_vision_from):
        load_pretrained(rt, optimizer=optimizer, language_from=ck.load_language_from,
                        vision_from=ck.load_vision_from)
    cuda_graphs = language_graphs(rt, optimizer)
    log_workarounds()
    startup.lap("data and checkpoint")
    log = interval_logger(rt)
    val_data = None

    def maybe_evaluate(force: bool = False) -> None:
        nonlocal val_data
        every = cfg.log.eval_interval
        if every is None or not (force or state.iteration % every == 0):
            return
        if val_data is None:
            val_data = data_iterator(rt, split="val")
        result = evaluate(rt, val_data, iters=cfg.log.eval_iters)
        if result is not None:
            log.record_eval(iteration=state.iteration, samples=state.consumed_samples,
                            loss=result[0], tokens=result[1])

    limit = cfg.optim.max_consecutive_skipped_iters
    o = cfg.optim
    divergence = DivergenceCheck(loss=o.check_for_spiky_loss, grads=o.check_for_large_grads,
                                 factor=o.spiky_loss_factor, device=rt.device)
    profiler = Profiler(cfg.profile, rank=dist.get_rank(), device=rt.device)
    results = []
    saved = state.iteration
    stop = None

    def save() -> None:
        nonlocal saved
        if state.consecutive_skipped:
            # The weights are those that produced non-finite gradients: a checkpoint of them
            # would become the one an auto-resume picks up.
            if dist.get_rank() == 0:
                print(f"not saving iteration {state.iteration}: the last "
                      f"{state.consecutive_skipped} iteration(s) were skipped", flush=True)
            return
        checkpointer.save(state.iteration)
        saved = state.iteration

    try:
        while state.iteration < cfg.schedule.train_iters:
            line = cuda_graphs.before_step(len(results)) if cuda_graphs else None
            if line and dist.get_rank() == 0:
                print(line, flush=True)
            profiler.before_step(state.iteration)
            result = train_step(rt=rt, optimizer=optimizer, scheduler=scheduler,
                                grad_sync=grad_sync, data_iterator=timed_data, timers=timers)
            state.advance(global_batch=cfg.batch.global_batch_size, skipped=result.skipped)
            profiler.after_step(state.iteration)
            timers.end_iteration()
            times = (branch_times(timers.take(), label=label, device=rt.device,
                                  iterations=log.iterations_since_line)
                     if log.due(state.iteration) else None)
            log.record(state, result, data_wait_s=timed_data.take(), times=times)
            results.append(result)
            if len(results) == 1:
                startup.lap("first iteration")
                line = startup.report()
                if line:
                    print(line, flush=True)
            why = divergence.check(loss=result.lm_loss, grad_norm=result.grad_norm)
            if why is not None:
                # The weights that gave this loss are those after the previous iteration.
                withdrawn = checkpointer.withdraw(saved) \
                    if checkpointer.last_saved == saved == state.iteration - 1 else ""
                raise TrainingDiverged(f"iteration {state.iteration}: {why}: the run diverged; "
                                       f"stopping without a save{withdrawn}")
            # The skip decision is world-wide, so every rank stops here together.
            if limit and state.consecutive_skipped >= limit:
                raise TrainingDiverged(
                    f"iterations {state.iteration - limit + 1}-{state.iteration} were all skipped for "
                    f"non-finite gradients (--max-consecutive-skipped-iters {limit}): the run "
                    f"diverged; stopping without a save (checkpoints already written are untouched)")
            if ck.save and ck.save_interval and state.iteration % ck.save_interval == 0:
                save()
            if ck.exit_interval and state.iteration % ck.exit_interval == 0:
                break
            stop = exits.reason()
            if stop is not None:
                if dist.get_rank() == 0:
                    print(f"stopping after iteration {state.iteration}: {stop}; saving", flush=True)
                break
            if state.iteration < cfg.schedule.train_iters:
                maybe_evaluate()
        profiler.close(state.iteration)
        if stop is None:
            maybe_evaluate(force=True)  # as Megatron: once more after the last iteration
        if ck.save and saved != state.iteration:
            save()
        exits.finish()
    finally:
        log.close()
        if cuda_graphs:
            cuda_graphs.close()
    report_peak_memory(rank=dist.get_rank(), module=rt.topology.module_name, device=rt.device)
    return results
