"""Everything the training loop uses, built once by ``build_run`` (optimizer, schedule, data,
checkpoints, logging, evaluation, profiling, CUDA graphs, exit and divergence checks), and the
loop's steps as methods of ``Run``. loop.py is the loop itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, List, Optional

import torch.distributed as dist

from examples.mimo.data.lanes import COLOCATED, ENCODER, LLM, ColocatedIterator, model_inputs
from examples.mimo.interfaces import ENCODER_MODULE, RankData, StepWork
from examples.mimo.training.hetero import compat
from examples.mimo.training.hetero.checkpointing import (Checkpointer, load_from_hf,
                                                        load_pretrained)
from examples.mimo.training.hetero.ckpt_policy import iteration_dir
from examples.mimo.training.hetero.config import TrainConfig, describe
from examples.mimo.training.hetero.divergence import DivergenceCheck
from examples.mimo.training.hetero.errors import TrainingDiverged
from examples.mimo.training.hetero.evaluation import evaluate
from examples.mimo.training.hetero.exits import ExitConditions
from examples.mimo.training.hetero.grad_sync import GradSync
from examples.mimo.training.hetero.graphs import CudaGraphs
from examples.mimo.training.hetero.logger import DataWait, IntervalLogger
from examples.mimo.training.hetero.optim import build_optimizer, build_scheduler
from examples.mimo.training.hetero.profiling import Profiler
from examples.mimo.training.hetero.runtime import Runtime
from examples.mimo.training.hetero.state import TrainState
from examples.mimo.training.hetero.step import StepResult, configure_schedule, train_step
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


@dataclass
class Run:
    rt: Runtime
    cfg: TrainConfig
    startup: StartupClock
    state: TrainState
    optimizer: Any
    scheduler: Any
    grad_sync: GradSync
    timers: Timers
    label: str  # the timer rows' name: encoder, llm, or model (colocated)
    data: DataWait
    checkpointer: Checkpointer
    exits: ExitConditions
    divergence: DivergenceCheck
    log: IntervalLogger
    profiler: Profiler
    cuda_graphs: Optional[CudaGraphs]
    saved: int  # the iteration of the latest checkpoint this run loaded or wrote
    results: List[StepResult] = field(default_factory=list)
    val_data: Any = None  # built at the first evaluation

    def step(self) -> StepResult:
        """One iteration, counted, timed and logged."""
        rt, state = self.rt, self.state
        line = self.cuda_graphs.before_step(len(self.results)) if self.cuda_graphs else None
        if line and dist.get_rank() == 0:
            print(line, flush=True)
        self.profiler.before_step(state.iteration)
        result = train_step(rt=rt, optimizer=self.optimizer, scheduler=self.scheduler,
                            grad_sync=self.grad_sync, data_iterator=self.data, timers=self.timers)
        state.advance(global_batch=self.cfg.batch.global_batch_size, skipped=result.skipped)
        self.profiler.after_step(state.iteration)
        self.timers.end_iteration()
        times = (branch_times(self.timers.take(), label=self.label, device=rt.device,
                              iterations=self.log.iterations_since_line)
                 if self.log.due(state.iteration) else None)
        self.log.record(state, result, data_wait_s=self.data.take(), times=times)
        self.results.append(result)
        if len(self.results) == 1:
            self.startup.lap("first iteration")
            line = self.startup.report()
            if line:
                print(line, flush=True)
        return result

    def stop_if_diverged(self, result: StepResult) -> None:
        """Both rules are world-wide decisions, so every rank raises here together."""
        state = self.state
        why = self.divergence.check(loss=result.lm_loss, grad_norm=result.grad_norm)
        if why is not None:
            # The weights that gave this loss are those after the previous iteration.
            withdrawn = self.checkpointer.withdraw(self.saved) \
                if self.checkpointer.last_saved == self.saved == state.iteration - 1 else ""
            raise TrainingDiverged(f"iteration {state.iteration}: {why}: the run diverged; "
                                   f"stopping without a save{withdrawn}")
        limit = self.cfg.optim.max_consecutive_skipped_iters
        if limit and state.consecutive_skipped >= limit:
            raise TrainingDiverged(
                f"iterations {state.iteration - limit + 1}-{state.iteration} were all skipped for "
                f"non-finite gradients (--max-consecutive-skipped-iters {limit}): the run "
                f"diverged; stopping without a save (checkpoints already written are untouched)")

    def save_due(self) -> bool:
        ck = self.cfg.ckpt
        return bool(ck.save and ck.save_interval and self.state.iteration % ck.save_interval == 0)

    def save(self) -> None:
        state = self.state
        if state.consecutive_skipped:
            # The weights are those that produced non-finite gradients: a checkpoint of them
            # would become the one an auto-resume picks up.
            if dist.get_rank() == 0:
                print(f"not saving iteration {state.iteration}: the last "
                      f"{state.consecutive_skipped} iteration(s) were skipped", flush=True)
            return
        self.checkpointer.save(state.iteration)
        self.saved = state.iteration

    def save_final(self) -> None:
        if self.cfg.ckpt.save and self.saved != self.state.iteration:
            self.save()

    def exit_interval_reached(self) -> bool:
        every = self.cfg.ckpt.exit_interval
        return bool(every and self.state.iteration % every == 0)

    def exit_reason(self) -> Optional[str]:
        """--exit-signal-handler / --exit-duration-in-mins (collective): why to stop now."""
        stop = self.exits.reason()
        if stop is not None and dist.get_rank() == 0:
            print(f"stopping after iteration {self.state.iteration}: {stop}; saving", flush=True)
        return stop

    def evaluate(self, force: bool = False) -> None:
        """Every --eval-interval iterations, or now (``force``: after the last one)."""
        every = self.cfg.log.eval_interval
        if every is None or not (force or self.state.iteration % every == 0):
            return
        if self.val_data is None:
            self.val_data = data_iterator(self.rt, split="val")
        result = evaluate(self.rt, self.val_data, iters=self.cfg.log.eval_iters)
        if result is not None:
            self.log.record_eval(iteration=self.state.iteration,
                                 samples=self.state.consumed_samples, loss=result[0],
                                 tokens=result[1])

    def summarize(self) -> None:
        """After a finished run: what it did and where it wrote, in one line."""
        ck, saved = self.cfg.ckpt, self.checkpointer.last_saved
        line = self.log.summary(
            checkpoint=iteration_dir(ck.save, saved) if ck.save and saved is not None else None,
            metrics_file=self.cfg.log.metrics_file, tensorboard_dir=self.cfg.log.tensorboard_dir)
        # Every rank here, after its final save: rank 0's "saved ..." line is out before the
        # logging rank's (found in CI: the two interleaved into one line on the shared stdout).
        dist.barrier()
        if line is not None:
            print(line, flush=True)

    def close(self) -> None:
        self.log.close()
        if self.cuda_graphs:
            self.cuda_graphs.close()


def build_run(rt: Runtime, startup: StartupClock) -> Run:
    """The optimizer, schedule, data and checkpoint state (restored from --load or pretrained
    branches), and everything the loop logs and checks with; laps ``startup``'s phases."""
    cfg = rt.cfg
    ck = cfg.ckpt
    optimizer = build_optimizer(rt)
    scheduler = build_scheduler(optimizer, cfg)
    startup.lap("optimizer")
    grad_sync = GradSync(branches=rt.branches, topology=rt.topology, device=rt.device)
    timers = Timers(rt.device)
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
    checkpointer = Checkpointer(rt, optimizer=optimizer, scheduler=scheduler, train_state=state,
                                data=data)
    restored = ck.load is not None and checkpointer.load()
    # Pretrained weights only start a run; a checkpoint of this run takes precedence.
    if not restored:
        hf = rt.model_provider.hf_parts(cfg.model, load_from_hf=ck.load_from_hf,
                                        language_from=ck.load_language_from,
                                        vision_from=ck.load_vision_from)
        if hf:
            load_from_hf(rt, optimizer=optimizer, parts=hf)
        language, vision = (None if LANGUAGE in hf else ck.load_language_from,
                            None if ENCODER_MODULE in hf else ck.load_vision_from)
        if language or vision:
            load_pretrained(rt, optimizer=optimizer, language_from=language, vision_from=vision)
    cuda_graphs = language_graphs(rt, optimizer)
    log_workarounds()
    startup.lap("data and checkpoint")
    o = cfg.optim
    return Run(
        rt=rt, cfg=cfg, startup=startup, state=state, optimizer=optimizer, scheduler=scheduler,
        grad_sync=grad_sync, timers=timers, data=DataWait(data), checkpointer=checkpointer,
        # one stage runs both modules when colocated: their time is one
        label=("model" if cfg.grid.colocated
               else "encoder" if rt.topology.module_name == ENCODER_MODULE else "llm"),
        exits=exits, log=interval_logger(rt), profiler=Profiler(cfg.profile, rank=dist.get_rank(),
                                                                device=rt.device),
        divergence=DivergenceCheck(loss=o.check_for_spiky_loss, grads=o.check_for_large_grads,
                                   factor=o.spiky_loss_factor, device=rt.device),
        cuda_graphs=cuda_graphs, saved=state.iteration)
