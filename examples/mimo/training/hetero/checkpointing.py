"""Distributed checkpoints of a hetero run, in Megatron's layout, without parallel_state.

A checkpoint holds, under fixed keys: "model" (both MimoModel branches; their keys never collide),
"optimizer" (the MimoOptimizer state per trainable branch, DP-reshardable), one ShardedObject per
rank for each per-rank state ("rng"), and as common state the configuration, the model's
must-match fields and each common state object ("train_state", "scheduler", "data"). Adding a
piece of run state is one entry in ``Checkpointer.__init__``.

A save goes to "iter_N.tmp"; every rank checksums the files it wrote (checksums.json), and rank 0
renames the directory only after every rank finished, then replaces the tracker atomically. A
failed save removes its "iter_N.tmp" and leaves the previous checkpoint and tracker intact. A load
verifies the checksums first (the files split over the ranks) and names a damaged file. No
checkpoint byte is unpickled with code execution: torch's .metadata through an allow-list, every
other pickled object with torch.load(weights_only=True) (compat.refuse_pickled_checkpoint_objects).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint.api import CheckpointException

from examples.mimo.interfaces import ENCODER_MODULE, DataStateMismatch, HFPart
from examples.mimo.model_providers.hf_checkpoint import (Reader, branch_shards,
                                                        coverage_problems, load_into)
from examples.mimo.training.hetero import compat, record, savelock
from examples.mimo.training.hetero.ckpt_policy import (
    TRACKER,
    changed_settings,
    check_paths,
    checksum_files,
    complete_iterations,
    damaged_files,
    files_written_by,
    find_checkpoint,
    is_complete,
    iteration_dir,
    read_manifest,
    remove_checkpoint,
    resume_problems,
    retention_victims,
    same_layout,
    verify_metadata_files,
    write_manifest,
    write_tracker,
)
from examples.mimo.training.hetero.errors import CheckpointError
from examples.mimo.training.hetero.runtime import Runtime, branch
from examples.mimo.training.hetero.state import RNGState
from examples.mimo.training.hetero.topology import LANGUAGE


def describe(err: BaseException, writer_errors: List[str] = ()) -> str:
    """One line for a save/load failure, also from inside torch's checkpoint wrapper;
    ``writer_errors`` (compat.checkpoint_writer_errors) carry the cause the writer dropped."""
    # The writer's later "error: <class ...>" lines repeat the class alone.
    causes = [m for m in writer_errors if "error: <class '" not in m]
    if causes:
        return "; ".join(dict.fromkeys(
            "no space left on device" if "No space left on device" in m else m for m in causes))
    failures = getattr(err, "failures", None) or {}
    causes = [f[0] if isinstance(f, tuple) else f for f in failures.values()] or [err]
    lines = []
    for cause in causes:
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            lines.append("no space left on device")
        elif isinstance(cause, OSError) and cause.strerror:
            lines.append(cause.strerror.lower() + (f": {cause.filename}" if cause.filename else ""))
        else:
            lines.append(str(cause) or type(cause).__name__)
    return "; ".join(dict.fromkeys(lines))


def _agree(message: Optional[str]) -> Optional[str]:
    """Every rank's failure message (or None) -> one line on every rank: the distinct messages
    in rank order, a full disk first (other ranks' writers may fail on it less clearly)."""
    gathered: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, message)
    found = list(dict.fromkeys(m for m in gathered if m is not None))
    found.sort(key=lambda m: "no space left on device" not in m)
    return "; ".join(found) if found else None


def read(template: dict, path: str, what: str, **kwargs):
    """dist_checkpointing.load with its errors turned into one CheckpointError naming the path."""
    try:
        return dist_checkpointing.load(template, path, **kwargs)
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        raise CheckpointError(f"cannot load {path} {what}: {describe(err)}") from err


def read_common(path: str) -> dict:
    # Parsed here first: a damaged or foreign .metadata is then one line, not torch's two
    # tracebacks (it retries with per-rank metadata files that never exist).
    compat.read_checkpoint_metadata(os.path.join(path, ".metadata"))
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except (Exception, CheckpointException) as err:
        raise CheckpointError(f"cannot read the common state of {path}: {describe(err)}") from err
    return record.read(common, path)


def preflight(cfg) -> List[str]:
    """Before any process group: --load/--save against the file system, and a resume against
    the resume policy. Raises ValueError (one line); returns log lines (what the resume changes)."""
    check_paths(cfg.ckpt)
    if cfg.ckpt.load is None:
        return []
    compat.refuse_pickled_checkpoint_objects()  # before the first byte of a checkpoint is read
    try:
        found = find_checkpoint(cfg.ckpt.load)
        if found is None:
            return []
        verify_metadata_files(found[1])
        common = read_common(found[1])
    except CheckpointError as err:
        raise ValueError(str(err)) from err
    problems = resume_problems(common, cfg)
    if problems:
        raise ValueError(f"cannot resume {found[1]}: " + "; ".join(problems))
    changes = changed_settings(common["config"], cfg)
    return [f"resuming {found[1]} with changes: " + ", ".join(changes)] if changes else []


class Checkpointer:
    def __init__(self, rt: Runtime, *, optimizer, scheduler, train_state, data):
        self.rt = rt
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.data = data
        # Identical on every rank: saved once, in the common state.
        self.common = {"train_state": train_state, "scheduler": scheduler}
        # One object per rank position: restored only on the layout that wrote it.
        self.per_rank = {"rng": RNGState(rt.device)}
        self.resumed_from: Optional[int] = None  # never removed by --keep-latest-checkpoints
        self.last_saved: Optional[int] = None
        (self.per_rank if data.per_rank else self.common)["data"] = data

    # ---- state ----------------------------------------------------------------------------

    def _sharded(self, *, with_optim: bool, per_rank: Sequence[str], is_loading: bool) -> dict:
        model_sd = self.rt.model.sharded_state_dict()
        state = {"model": model_sd}
        if with_optim:
            # Reshardable across DP. ("fully_reshardable" cannot be loaded back with torch Adam in
            # 0.19.2: its loader copies into every tensor of the Adam state, "step" included.)
            per_branch = self.optimizer.sharded_state_dict(
                model_sd, is_loading=is_loading,
                metadata={"distrib_optim_sharding_type": "dp_reshardable"})
            # Branches this rank does not run come back as {}; leaving them out keeps the common
            # state identical on every rank.
            state["optimizer"] = {name: sd for name, sd in per_branch.items() if sd}
        if per_rank:
            name = self.rt.topology.module_name
            pgc = self.rt.topology.module_pgc(name)
            for key in per_rank:
                state[key] = ShardedObject(f"{key}_state.{name}", self.per_rank[key].state_dict(),
                                           (pgc.pp.size(), pgc.tp.size(), pgc.dp.size()),
                                           (pgc.pp.rank(), pgc.tp.rank(), pgc.dp.rank()),
                                           replica_id=0)
        return state

    def _common_state(self) -> dict:
        return {**record.make(self.rt.cfg), **{key: obj.state_dict() for key, obj in self.common.items()}}

    # ---- save -----------------------------------------------------------------------------

    def save(self, iteration: int) -> str:
        ck = self.rt.cfg.ckpt
        rank = dist.get_rank()
        start = time.perf_counter()
        final = iteration_dir(ck.save, iteration)
        tmp = final + ".tmp"
        failure = None
        lock = savelock.held()
        if rank == 0:
            try:
                if lock is not None:
                    lock.check()
                shutil.rmtree(tmp, ignore_errors=True)  # what a crashed save of it left
                os.makedirs(tmp)
            except OSError as err:
                failure = describe(err)
            except CheckpointError as err:
                failure = str(err)
        failure = _agree(failure)
        hashing = 0.0
        entries: Dict[str, dict] = {}
        if failure is None:
            with compat.checkpoint_writer_errors() as writer_errors:
                try:
                    state = self._sharded(with_optim=not ck.no_save_optim, per_rank=list(self.per_rank),
                                          is_loading=False)
                    state.update(self._common_state())
                    dist_checkpointing.save(state, tmp, validate_access_integrity=True)
                    t0 = time.perf_counter()
                    entries = checksum_files(tmp, files_written_by(tmp, rank))
                    hashing = time.perf_counter() - t0
                except (Exception, CheckpointException) as err:
                    failure = describe(err, writer_errors)
                    # torch's zip writer may report a full disk as "unexpected pos": say what is
                    # seen (measured before anything is cleaned up).
                    free = shutil.disk_usage(ck.save).free
                    if "no space left on device" not in failure and free < 16 * 2 ** 20:
                        failure = f"no space left on device ({free} bytes free); {failure}"
            failure = _agree(failure)
        gathered: List[tuple] = [({}, 0.0)] * dist.get_world_size()
        if failure is None:
            dist.all_gather_object(gathered, (entries, hashing))
            if rank == 0:
                try:
                    write_manifest(tmp, {k: v for part, _ in gathered for k, v in part.items()})
                    if lock is not None:
                        lock.check()
                    self._publish(tmp, final, iteration)
                except OSError as err:
                    failure = describe(err)
                except CheckpointError as err:
                    failure = str(err)
            failure = _agree(failure)
        if failure is not None:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"cannot save iteration {iteration} to {tmp}: {failure}; the "
                                  f"previous checkpoint in {ck.save} is untouched")
        if rank == 0:
            size = sum(os.path.getsize(os.path.join(final, f)) for f in os.listdir(final))
            print(f"saved {final} ({size / 2**20:.1f} MiB) in {time.perf_counter() - start:.2f} s "
                  f"(checksums: {max(t for _, t in gathered):.3f} s on the slowest rank)",
                  flush=True)
            if ck.keep_latest_checkpoints:
                self._retain(iteration)
        self.last_saved = iteration
        return final

    @staticmethod
    def _publish(tmp: str, final: str, iteration: int) -> None:
        old = final + ".old"
        if os.path.exists(final):  # the same iteration saved again (--allow-existing-save)
            os.replace(final, old)
        os.replace(tmp, final)
        write_tracker(os.path.dirname(final), iteration)
        shutil.rmtree(old, ignore_errors=True)

    def _retain(self, iteration: int) -> None:
        """--keep-latest-checkpoints, after a save published ``iteration`` (rank 0). The previous
        save of this job is the newest one known good: the iterations since passed the
        divergence check (or, without it, it is the last one before this)."""
        ck = self.rt.cfg.ckpt
        protected = {i for i in (self.resumed_from, self.last_saved) if i is not None}
        for path in retention_victims(ck.save, ck.keep_latest_checkpoints, protected):
            try:
                remove_checkpoint(path)
                done = "removed"
            except OSError as err:  # a full or read-only file system: the run goes on
                done = f"could not remove ({err.strerror or err})"
            print(f"{done} {path} (--keep-latest-checkpoints {ck.keep_latest_checkpoints})",
                  flush=True)

    def withdraw(self, iteration: int) -> str:
        """The run diverged after this job saved ``iteration``, whose weights produced the spike:
        its directory moves aside (kept for a look, never loaded) and the tracker goes back to
        the newest earlier checkpoint. Every rank returns the same sentence; rank 0 acts."""
        save = self.rt.cfg.ckpt.save
        path = iteration_dir(save, iteration)
        aside = os.path.join(save, "diverged-" + os.path.basename(path))
        earlier = [i for i in complete_iterations(save) if i < iteration]
        if dist.get_rank() == 0:
            os.replace(path, aside)
            write_tracker(save, earlier[-1] if earlier else None)
        latest = f"latest is now iteration {earlier[-1]}" if earlier else "no checkpoint is left"
        return f"; its weights were saved as iteration {iteration}: moved to {aside}, {latest}"

    # ---- load -----------------------------------------------------------------------------

    def _verify(self, path: str) -> None:
        """Every file against checksums.json, the files split over the ranks."""
        failure = None
        try:
            manifest = read_manifest(path)
            names = sorted(manifest)[dist.get_rank()::dist.get_world_size()]
            bad = damaged_files(path, manifest, names)
            if bad:
                failure = "; ".join(bad)
        except CheckpointError as err:
            failure = str(err)
        failure = _agree(failure)
        if failure is not None:
            raise CheckpointError(f"{path} is damaged: {failure}")

    def load(self) -> bool:
        """Restore from --load; False when it holds no checkpoint yet (a fresh start)."""
        cfg = self.rt.cfg
        ck = cfg.ckpt
        found = find_checkpoint(ck.load)
        if found is None:
            if dist.get_rank() == 0:
                print(f"no checkpoint in {ck.load}: starting from iteration 0", flush=True)
            return False
        iteration, path = found
        if ck.save is not None and os.path.realpath(os.path.dirname(path)) == \
                os.path.realpath(ck.save):
            self.resumed_from = iteration
        start = time.perf_counter()
        self._verify(path)
        verified = time.perf_counter() - start
        common = read_common(path)
        layout = same_layout(common["config"], cfg)
        with_optim = not (ck.no_load_optim or ck.finetune)
        # Per-rank state (RNG, a per-rank data loader) only means something on the layout that
        # wrote it; a fine-tune starts both afresh.
        per_rank = [key for key in self.per_rank if layout and not ck.finetune
                    and not (key == "rng" and ck.no_load_rng)]
        adam = compat.torch_adam_checkpoint_load(self.optimizer) if with_optim \
            else contextlib.nullcontext()
        with adam:
            template = self._sharded(with_optim=with_optim, per_rank=per_rank,
                                     is_loading=True)
            state = read(template, path, "into this layout", strict=StrictHandling.ASSUME_OK_UNEXPECTED)
            self.rt.model.load_state_dict(state["model"], strict=True)
            if with_optim:
                # A rank whose branch is frozen has no optimizer state; an empty section is not
                # stored.
                optimizer_state = state.get("optimizer", {})
                compat.match_saved_param_groups(optimizer_state, lr=cfg.schedule.lr,
                                                min_lr=cfg.schedule.min_lr)
                with torch.no_grad():
                    self.optimizer.load_state_dict(optimizer_state)
        if with_optim:
            # Loaded param groups carry the checkpoint's Adam settings; this run's flags win.
            o = cfg.optim
            for group in self.optimizer.param_groups:
                group.update(betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps)
        else:
            with torch.no_grad():  # the fp32 main parameters follow the loaded weights
                self.optimizer.reload_model_params()
        for key in list(per_rank):
            try:
                self.per_rank[key].load_state_dict(state[key])
            except DataStateMismatch as err:  # other loader settings (--num-workers)
                print(f"[rank {dist.get_rank()}] {err}", flush=True)
                per_rank.remove(key)
        if self.data.per_rank and "data" not in per_rank and not ck.finetune:
            note = self.data.restart(iteration=iteration)
            if dist.get_rank() == 0:
                print(note, flush=True)
        if not ck.finetune:
            for key, obj in self.common.items():
                if key == "scheduler" and ck.no_load_scheduler:
                    continue
                if key == "scheduler" and ck.use_checkpoint_opt_param_scheduler:
                    # megatron-core's scheduler state has no WSD fields; take them from the
                    # checkpoint's configuration too.
                    self.scheduler.wsd_decay_steps = common["config"]["schedule"]["wsd_decay_samples"]
                    self.scheduler.lr_wsd_decay_style = common["config"]["schedule"]["wsd_decay_style"]
                obj.load_state_dict(common[key])
        # The schedule the resume policy chose (scheduler.max_lr/min_lr) drives every param
        # group; re-apply LR and weight decay to the (possibly reloaded) groups.
        for group in self.optimizer.param_groups:
            group.update(max_lr=self.scheduler.max_lr, min_lr=self.scheduler.min_lr)
        self.scheduler.step(increment=0)
        if dist.get_rank() == 0:
            print(f"loaded {path} (iteration {iteration}"
                  f"{'' if layout else ', resharded from another layout'}"
                  f"{', weights only' if ck.finetune else ''}) in "
                  f"{time.perf_counter() - start:.2f} s (checksums verified in {verified:.3f} s)",
                  flush=True)
        return True


def load_from_hf(rt: Runtime, *, optimizer, parts: Dict[str, HFPart]) -> None:
    """Start branches from Hugging Face folders (model_providers/hf_checkpoint.py): each rank
    reads only the rows and columns of the shards it holds. Coverage is checked over the whole
    model on every rank (the ranks' keys gathered), so every rank stops with the same line; the
    fp32 main parameters are then refreshed from the loaded weights."""
    mine = {}
    for name in parts:
        if name in rt.branches:
            mine[name] = branch_shards(unwrap_model(branch(rt.model, name)),
                                       {"dp_cp_group": rt.topology.module_pgc(name).dp_cp})
    gathered: List[Dict[str, List[str]]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {name: shards.keys for name, shards in mine.items()})
    problems = []
    readers = {}
    for folder in sorted({p.folder for p in parts.values()}):
        readers[folder] = reader = Reader(folder)
        same = [name for name, p in parts.items() if p.folder == folder]
        ours = {k for g in gathered for name in same for k in g.get(name, ())}
        recipes = {k: r for name in same for k, r in parts[name].recipes.items()}
        shapes = {n: reader.shape(n) for n in reader.names()}
        problems += [f"{folder}: {p}" for p in coverage_problems(
            recipes, ours, shapes, lambda n: any(parts[name].unused(n) for name in same))]
    if problems:
        raise CheckpointError("; ".join(problems))
    start = time.perf_counter()
    for name, shards in mine.items():
        load_into(shards, parts[name].recipes, readers[parts[name].folder])
    with torch.no_grad():
        optimizer.reload_model_params()
    if dist.get_rank() == 0:
        for note in dict.fromkeys(n for p in parts.values() for n in p.notes):
            print(note, flush=True)
        print(f"loaded {', '.join(f'{n} from {p.folder}' for n, p in parts.items())} "
              f"(Hugging Face) in {time.perf_counter() - start:.2f} s", flush=True)


def _branch_template(rt: Runtime, name: str) -> dict:
    """What this rank asks of a single-grid Megatron checkpoint of branch ``name`` (its keys
    carry no MimoModel prefix); nothing off that branch."""
    if name not in rt.branches:
        return {}
    module = unwrap_model(branch(rt.model, name))
    pgc = rt.topology.module_pgc(name)
    return module.sharded_state_dict(prefix="", metadata={"dp_cp_group": pgc.dp_cp})


def resolve_pretrained(source: str) -> tuple:
    """(directory to read, whether it is a checkpoint of this trainer): a run directory (its
    latest iteration) or iteration directory of this trainer, or a plain single-grid
    dist-checkpoint."""
    found = find_checkpoint(source) if os.path.isfile(os.path.join(source, TRACKER)) else None
    path = found[1] if found else source
    if not is_complete(path):
        raise CheckpointError(f"{source} is not a complete dist-checkpoint")
    try:
        hetero = record.is_ours(dist_checkpointing.load_common_state_dict(path))
    except (Exception, CheckpointException):
        hetero = False
    return path, hetero


def load_pretrained(rt: Runtime, *, optimizer, language_from: Optional[str],
                    vision_from: Optional[str]) -> None:
    """Start a branch from pretrained weights: a single-grid Megatron dist-checkpoint of that
    branch alone, or a checkpoint of this trainer (e.g. the previous training stage's).

    Every rank joins each load (dist_checkpointing coordinates over the world); ranks of the other
    branch ask for nothing. Keys must match exactly both ways; the distributed optimizer's fp32
    main parameters are then refreshed from the loaded weights."""
    model_sd = None
    for name, source in ((LANGUAGE, language_from), (ENCODER_MODULE, vision_from)):
        if source is None:
            continue
        path, hetero = resolve_pretrained(source)
        if hetero:
            if model_sd is None:
                model_sd = rt.model.sharded_state_dict()
            prefix = "language_model." if name == LANGUAGE else f"modality_submodules.{name}."
            template = {"model": {k: v for k, v in model_sd.items() if k.startswith(prefix)}} \
                if name in rt.branches else {"model": {}}
            owned = lambda k: k.startswith(prefix)  # noqa: E731
        else:
            template = _branch_template(rt, name)
            owned = lambda k: True  # noqa: E731
        state, missing, unexpected = read(template, path, f"into the {name} branch",
                                          strict=StrictHandling.RETURN_ALL)
        # dist_checkpointing's words: "unexpected" = the model has it, the checkpoint does not
        # (it would stay randomly initialised); "missing" = the checkpoint has it, no rank asked.
        problems = [f"not in checkpoint: {k}" for k in sorted(unexpected)
                    if not k.endswith("_extra_state")]
        problems += [f"not in model: {k}" for k in sorted(missing)
                     if owned(k) and not k.endswith("_extra_state")]
        failure = _agree(f"{source} does not match the {name} branch: {problems[:20]}"
                         if problems else None)
        if failure is not None:
            raise CheckpointError(failure)
        if name in rt.branches:
            if hetero:
                rt.model.load_state_dict(state["model"], strict=False)
            else:
                unwrap_model(branch(rt.model, name)).load_state_dict(state, strict=True)
    with torch.no_grad():
        optimizer.reload_model_params()
