"""Distributed checkpoints of a hetero run, in Megatron's layout, without parallel_state.

    <save>/latest_checkpointed_iteration.txt      the last complete iteration
    <save>/iter_0000010/                           torch_dist shards, common state, metadata

Contents: both MimoModel branches (keys "modality_submodules.images.module..." and
"language_model.module..." never collide), the MimoOptimizer state (per branch, prefixed by megatron-core
with "mimo.<branch>."), per-branch RNG state, and as common state the scheduler, iteration, consumed
samples, data position and the configuration.

A save goes to "iter_N.tmp" and is renamed by rank 0 only after every rank finished writing; the
tracker is then replaced atomically. A crash mid-save leaves the previous checkpoint and tracker
intact. Loading reads every pickled object with torch.load(weights_only=True).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies import torch as dcp_strategy
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException

from examples.mimo.model_providers import ENCODER_MODULE
from examples.mimo.training.hetero.runtime import Runtime, branch
from examples.mimo.training.hetero.topology import LANGUAGE

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 1
# Fields of the saved configuration that may change across a resume (layout and run control).
RESHARDABLE = {"grid", "batch.micro_batch_size", "batch.num_microbatches", "ddp", "log", "ckpt",
               "runtime.device", "runtime.distributed_timeout_minutes", "schedule.train_iters"}


class CheckpointError(RuntimeError):
    pass


def _safe_load_bytes(self, read_item, value):
    # torch's DCP planner unpickles ShardedObjects with weights_only=False, which would run code
    # embedded in a checkpoint. Everything we store is tensors and plain Python data.
    try:
        obj = torch.load(value, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"refusing to unpickle checkpoint object {read_item.dest_index.fqn!r}: "
                              f"it is not plain data ({err})") from err
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


dcp_strategy.MCoreLoadPlanner.load_bytes = _safe_load_bytes


def read(template: dict, path: str, what: str, **kwargs):
    """dist_checkpointing.load with its errors turned into one CheckpointError naming the path."""
    try:
        return dist_checkpointing.load(template, path, **kwargs)
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        # torch's checkpoint layer wraps per-rank failures as (exception, traceback).
        failures = getattr(err, "failures", {}) or {}
        causes = [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        reason = "; ".join(str(c) for c in causes) or str(err)
        raise CheckpointError(f"cannot load {path} {what}: {reason}") from err


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "metadata.json")) and \
        os.path.isfile(os.path.join(path, ".metadata"))


def _sharded_state(rt: Runtime, optimizer, *, with_optim: bool, with_rng: bool, is_loading: bool):
    model_sd = rt.model.sharded_state_dict()
    state = {"model": model_sd}
    if with_optim:
        # Reshardable across DP. ("fully_reshardable" cannot be loaded back with torch Adam in 0.19.2:
        # its loader copies into every tensor of the Adam state, "step" included.)
        per_branch = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "dp_reshardable"})
        # Branches this rank does not run come back as {}; leaving them out keeps the common
        # state identical on every rank.
        state["optimizer"] = {name: sd for name, sd in per_branch.items() if sd}
    if with_rng:
        state["rng"] = _rng_object(rt)
    return state


def _rng_object(rt: Runtime) -> ShardedObject:
    name = rt.topology.module_name
    pgc = rt.topology.module_pgc(name)
    data = {"cpu": torch.get_rng_state()}
    if rt.device.type == "cuda":
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        data["cuda"] = torch.cuda.get_rng_state()
        data["tracker"] = get_cuda_rng_tracker().get_states()
    return ShardedObject(f"rng_state.{name}", data,
                         (pgc.pp.size(), pgc.tp.size(), pgc.dp.size()),
                         (pgc.pp.rank(), pgc.tp.rank(), pgc.dp.rank()), replica_id=0)


def _restore_rng(rt: Runtime, data: dict) -> None:
    torch.set_rng_state(data["cpu"])
    if "cuda" in data and rt.device.type == "cuda":
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        torch.cuda.set_rng_state(data["cuda"])
        get_cuda_rng_tracker().set_states(data["tracker"])


def _inner_adams(optimizer):
    for top in optimizer._active_optimizers:
        for opt in getattr(top, "chained_optimizers", [top]):
            yield opt


def _prime_optimizer_state(optimizer) -> None:
    """Give every Adam parameter a zero state at step 0 before a load.

    Without transformer-engine or apex, megatron-core 0.19.2 uses torch's Adam, whose state only
    exists after a first step; DistributedOptimizer.state_dict() then asserts while building the
    load template. The checkpoint overwrites all of it."""
    for opt in _inner_adams(optimizer):
        inner = opt.optimizer
        opt.init_state_fn(inner, opt.config)
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p].setdefault("step", torch.tensor(0.0))


def _restore_adam_steps(optimizer) -> None:
    """Set torch Adam's per-parameter "step" from the loaded param groups, one tensor each.

    megatron-core 0.19.2 saves the step in the param groups, but on load it writes one shared tensor
    into every parameter's state (Adam would then advance it once per parameter) and overwrites it
    with the template's value while copying the parameter state back."""
    for opt in _inner_adams(optimizer):
        inner = opt.optimizer
        for group in inner.param_groups:
            if "step" not in group:
                raise CheckpointError("optimizer param groups in the checkpoint carry no step")
            for p in group["params"]:
                inner.state[p]["step"] = torch.tensor(float(group["step"]))


def _config_dict(rt: Runtime) -> dict:
    return dataclasses.asdict(rt.cfg)


def save(rt: Runtime, *, optimizer, scheduler, iteration: int, consumed_samples: int) -> str:
    cfg = rt.cfg.ckpt
    start = time.perf_counter()
    final = iteration_dir(cfg.save, iteration)
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # what a crashed save of this iteration left
        os.makedirs(tmp)
    dist.barrier()
    state = _sharded_state(rt, optimizer, with_optim=not cfg.no_save_optim, with_rng=True,
                           is_loading=False)
    state.update(checkpoint_version=CHECKPOINT_VERSION, iteration=iteration,
                 consumed_samples=consumed_samples, scheduler=scheduler.state_dict(),
                 args=_config_dict(rt))
    dist_checkpointing.save(state, tmp, validate_access_integrity=True)
    dist.barrier()
    if dist.get_rank() == 0:
        old = final + ".old"
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        tracker_tmp = os.path.join(cfg.save, TRACKER + ".tmp")
        with open(tracker_tmp, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tracker_tmp, os.path.join(cfg.save, TRACKER))
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    if dist.get_rank() == 0:
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(final) for f in fs)
        print(f"saved {final} ({size / 2**20:.1f} MiB) in {time.perf_counter() - start:.2f} s",
              flush=True)
    return final


def find_checkpoint(root: str) -> Optional[Tuple[int, str]]:
    """(iteration, directory) of the latest complete checkpoint, or None if there is none yet."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.exists(tracker):
        leftovers = [d for d in os.listdir(root) if d.startswith("iter_")] \
            if os.path.isdir(root) else []
        if leftovers:
            raise CheckpointError(f"{tracker} is missing but {root} holds {sorted(leftovers)}")
        return None
    try:
        with open(tracker) as f:
            text = f.read().strip()
    except OSError as err:
        raise CheckpointError(f"cannot read {tracker}: {err}") from err
    if not text.isdigit():
        raise CheckpointError(f"{tracker} should hold an iteration number, found {text!r}")
    path = iteration_dir(root, int(text))
    if not os.path.isdir(path):
        raise CheckpointError(f"{tracker} names iteration {text} but {path} does not exist")
    if not _is_complete(path):
        raise CheckpointError(f"{path} is incomplete (no metadata.json or .metadata)")
    return int(text), path


def _check_compatible(saved: dict, current: dict, prefix: str = "") -> list:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        if name in RESHARDABLE:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _check_compatible(a, b, name + ".")
        elif a != b and not (isinstance(a, (list, tuple)) and list(a) == list(b or [])):
            diffs.append(f"{name}: checkpoint {a!r}, now {b!r}")
    return diffs


def load(rt: Runtime, *, optimizer, scheduler) -> Optional[Tuple[int, int]]:
    """Restore from --load: (iteration, consumed samples), or None when there is no checkpoint."""
    cfg = rt.cfg.ckpt
    found = find_checkpoint(cfg.load)
    if found is None:
        if dist.get_rank() == 0:
            print(f"no checkpoint in {cfg.load}: starting from iteration 0", flush=True)
        return None
    iteration, path = found
    start = time.perf_counter()
    common = dist_checkpointing.load_common_state_dict(path)
    if common.get("checkpoint_version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {common.get('checkpoint_version')!r}, "
                              f"expected {CHECKPOINT_VERSION}")
    current = _config_dict(rt)
    diffs = _check_compatible(common["args"], current)
    if diffs:
        raise CheckpointError(f"{path} was written by an incompatible run:\n  " + "\n  ".join(diffs))
    same_layout = common["args"]["grid"] == current["grid"]
    with_optim = not (cfg.no_load_optim or cfg.finetune)
    # RNG state is per rank position; it only means something on the layout that wrote it.
    with_rng = not (cfg.no_load_rng or cfg.finetune) and same_layout
    if with_optim:
        _prime_optimizer_state(optimizer)
    template = _sharded_state(rt, optimizer, with_optim=with_optim, with_rng=with_rng,
                              is_loading=True)
    state = read(template, path, "into this layout", strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    rt.model.load_state_dict(state["model"], strict=True)
    # In fp32 the optimizer's main parameters are views of the model's leaf parameters.
    with torch.no_grad():
        if with_optim:
            # A rank whose branch is frozen has no optimizer state, and an empty section is not stored.
            optimizer.load_state_dict(state.get("optimizer", {}))
            _restore_adam_steps(optimizer)
        else:
            optimizer.reload_model_params()
    if with_rng:
        _restore_rng(rt, state["rng"])
    if cfg.finetune:
        iteration, consumed = 0, 0
    else:
        consumed = common["consumed_samples"]
        if not cfg.no_load_scheduler:
            scheduler.load_state_dict(common["scheduler"])
    if dist.get_rank() == 0:
        print(f"loaded {path} (iteration {iteration}"
              f"{'' if same_layout else ', resharded from another layout'}) in "
              f"{time.perf_counter() - start:.2f} s", flush=True)
    return iteration, consumed


def load_pretrained(rt: Runtime, *, optimizer, language_from: Optional[str],
                    vision_from: Optional[str]) -> None:
    """Start a branch from a single-grid Megatron dist-checkpoint of that branch alone.

    Every rank joins each load (dist_checkpointing coordinates over the world); ranks of the other
    branch ask for nothing. Keys must match exactly both ways; the distributed optimizer's fp32
    main parameters are then refreshed from the loaded weights."""
    for name, source in ((LANGUAGE, language_from), (ENCODER_MODULE, vision_from)):
        if source is None:
            continue
        module = None
        template = {}
        if name in rt.branches:
            module = unwrap_model(branch(rt.model, name))
            pgc = rt.topology.module_pgc(name)
            template = module.sharded_state_dict(prefix="", metadata={"dp_cp_group": pgc.dp_cp})
        if not _is_complete(source):
            raise CheckpointError(f"{source} is not a complete dist-checkpoint")
        state, missing, unexpected = read(template, source, f"into the {name} branch",
                                          strict=StrictHandling.RETURN_ALL)
        # dist_checkpointing's words: "unexpected" = the model has it, the checkpoint does not
        # (it would stay randomly initialised); "missing" = the checkpoint has it, no rank asked.
        problems = [f"not in checkpoint: {k}" for k in sorted(unexpected)
                    if not k.endswith("_extra_state")]
        problems += [f"not in model: {k}" for k in sorted(missing) if not k.endswith("_extra_state")]
        # Counted over all ranks, so every rank raises together.
        flags = torch.tensor([len(problems)], device=rt.device)
        dist.all_reduce(flags)
        if flags.item():
            raise CheckpointError(f"{source} does not match the {name} branch: {problems[:20]}")
        if module is not None:
            module.load_state_dict(state, strict=True)
    with torch.no_grad():
        optimizer.reload_model_params()
