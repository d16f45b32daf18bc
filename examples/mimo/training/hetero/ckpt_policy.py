"""What a checkpoint directory holds and what a run may do with it.

Pure functions over the file system and saved configurations: they run on every rank before any
process group exists (``preflight``), so a bad --load/--save or an incompatible resume is one
line, and they are tested in-process.

    <save>/latest_checkpointed_iteration.txt      the last complete iteration
    <save>/iter_0000010/                           torch_dist shards, metadata, checksums.json
    <save>/iter_0000010.tmp/                       a save in progress (or one that failed)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
import zlib
from typing import Dict, Iterable, List, Optional, Tuple

from examples.mimo.flags import LAYOUT, MATCH, QUIET, SCHEDULE, resume_classes
from examples.mimo.training.hetero.errors import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
MANIFEST = "checksums.json"
_CHUNK = 16 * 2 ** 20


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "metadata.json")) and \
        os.path.isfile(os.path.join(path, ".metadata"))


def _entries(root: str) -> List[str]:
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


def stale_saves(root: str) -> List[str]:
    """``iter_N.tmp`` directories (saves that never completed: a crash or an error) and
    ``.trash-iter_N`` ones (deletions cut short)."""
    return [os.path.join(root, d) for d in _entries(root)
            if (d.startswith("iter_") and d.endswith(".tmp")) or d.startswith(".trash-iter_")]


def checkpoints_in(root: str) -> List[str]:
    """Names of what a save into ``root`` could replace: the tracker and complete iterations."""
    return [d for d in _entries(root)
            if d == TRACKER or (d.startswith("iter_") and not d.endswith(".tmp"))]


def _iteration_of(name: str) -> Optional[int]:
    m = re.fullmatch(r"iter_(\d{7})", name)
    return int(m.group(1)) if m else None


def _runs_below(root: str) -> List[str]:
    """Sub-directories of ``root`` that hold checkpoints of a run (a tracker or iteration)."""
    return [d for d in _entries(root) if os.path.isdir(os.path.join(root, d))
            and checkpoints_in(os.path.join(root, d))]


def find_checkpoint(root: str) -> Optional[Tuple[int, str]]:
    """(iteration, directory) of the latest complete checkpoint, or None if there is none yet.

    ``root`` is a run's directory (its tracker names the iteration) or one of its ``iter_N``
    directories (that iteration, as Megatron users pass it). A directory with neither that holds
    runs below it is refused naming them: it would otherwise start a fresh run."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.exists(tracker):
        own = _iteration_of(os.path.basename(os.path.normpath(root)))
        if own is not None and os.path.isdir(root):
            if not is_complete(root):
                raise CheckpointError(f"{root} is incomplete (no metadata.json or .metadata)")
            return own, root
        leftovers = [d for d in checkpoints_in(root) if d != TRACKER]
        if leftovers:
            raise CheckpointError(f"{tracker} is missing but {root} holds {leftovers}")
        runs = _runs_below(root)
        if runs:
            shown = ", ".join(os.path.join(root, d) for d in runs[:4])
            raise CheckpointError(f"{root} holds no checkpoint of its own but runs below it "
                                  f"({shown}{', ...' if len(runs) > 4 else ''}): point --load at "
                                  f"one of them")
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
    if not is_complete(path):
        raise CheckpointError(f"{path} is incomplete (no metadata.json or .metadata)")
    return int(text), path


def run_root(load: str) -> str:
    """The run directory of a --load: itself, or the parent of an ``iter_N`` directory."""
    norm = os.path.normpath(load)
    if _iteration_of(os.path.basename(norm)) is not None and \
            not os.path.exists(os.path.join(norm, TRACKER)):
        return os.path.dirname(norm)
    return load


def _writable_dir_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot hold checkpoints, or None. Permission bits say nothing on /proc, /sys or
    a read-only mount, so a file is created and removed where the save will create its own: in
    ``path``, or in its nearest existing parent."""
    probe = path
    if os.path.exists(path):
        if not os.path.isdir(path):
            return "it is a file, not a directory"
    else:
        probe = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            return f"{probe} is a file, not a directory"
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".hetero-probe-")
        os.close(fd)
        os.remove(name)
    except OSError as err:
        where = "it" if probe == path else probe
        return f"cannot create a file in {where} ({err.strerror or err})"
    return None


def _same_dir(a: Optional[str], b: Optional[str]) -> bool:
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


def check_paths(ck) -> None:
    """--load/--save/--load-*-from against the file system (``ck``: a CheckpointConfig).

    Auto-resume (--load = --save, missing or empty on the first job) starts fresh; a --load that
    does not exist otherwise is a typo. A --save holding checkpoints this run does not resume
    from, or the directory a --finetune loads from, is refused unless --allow-existing-save."""
    same = _same_dir(ck.load, ck.save)
    if ck.load is not None and not same and _same_dir(run_root(ck.load), ck.save):
        # An iteration directory of --save: a resume when it is the latest one.
        try:
            latest = find_checkpoint(ck.save)
        except CheckpointError:  # a broken tracker: the load of the named iteration decides
            latest = None
        if latest is not None and _same_dir(latest[1], ck.load):
            same = True
        elif not ck.allow_existing_save and not ck.finetune:
            raise ValueError(
                f"--load {ck.load} is an earlier iteration of --save {ck.save} (latest: "
                f"{latest[1] if latest else 'none'}): training on from it would replace that "
                f"run's later checkpoints; pick another --save or pass --allow-existing-save")
    if ck.load is not None:
        if os.path.exists(ck.load) and not os.path.isdir(ck.load):
            raise ValueError(f"--load {ck.load} is a file, not a checkpoint directory")
        if not os.path.exists(ck.load) and not same:
            raise ValueError(f"--load {ck.load} does not exist (only --load equal to --save may "
                             f"be missing: the first job of an auto-resuming run)")
    for flag, path in (("--load-language-from", ck.load_language_from),
                       ("--load-vision-from", ck.load_vision_from)):
        if path is not None and not os.path.isdir(path):
            raise ValueError(f"{flag} {path} is not a directory")
    if ck.save is None:
        return
    problem = _writable_dir_problem(ck.save)
    if problem:
        raise ValueError(f"--save {ck.save} cannot hold checkpoints: {problem}")
    existing = checkpoints_in(ck.save)
    if existing and not ck.allow_existing_save:
        shown = ", ".join(existing[-3:])
        if not same:
            raise ValueError(
                f"--save {ck.save} already holds checkpoints ({shown}) of a run this job does not "
                f"resume ({'--load ' + ck.load if ck.load else 'no --load'}); resume it with "
                f"--load {ck.save}, pick another --save, or pass --allow-existing-save")
        if ck.finetune:
            raise ValueError(
                f"--finetune would write its iteration-0-based checkpoints into {ck.save}, the "
                f"directory it loads from ({shown}); pick another --save or pass "
                f"--allow-existing-save")


def remove_stale_saves(root: Optional[str]) -> List[str]:
    """Removes what failed saves left; returns one log line per directory removed."""
    lines = []
    for path in stale_saves(root) if root else []:
        shutil.rmtree(path, ignore_errors=True)
        what = "deletion" if os.path.basename(path).startswith(".trash-") else "save"
        lines.append(f"removed {path}: an incomplete {what} left by an earlier job")
    return lines


# ---- resume policy ---------------------------------------------------------------------------

def _flatten(d: dict, prefix: str = "") -> Dict[str, object]:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


_ABSENT = "(not recorded)"


def _changed(saved_config: dict, cfg) -> List[Tuple[str, str, str, object, object]]:
    """(field, resume class, label, checkpoint's value, now) of each field of ``cfg`` whose value
    differs from the checkpoint's. Another provider's fields are not compared (the provider's
    own field says it changed)."""
    a, b = _flatten(saved_config), _flatten(dataclasses.asdict(cfg))
    out = []
    for name, (kind, label) in resume_classes(cfg).items():
        if name.startswith(("model.", "data.")) and \
                saved_config.get(f"{name.split('.')[0]}_provider") != \
                getattr(cfg, f"{name.split('.')[0]}_provider"):
            continue
        if a.get(name, _ABSENT) != b[name]:
            out.append((name, kind, label, a.get(name, _ABSENT), b[name]))
    return out


def resume_problems(saved: dict, cfg) -> List[str]:
    """Why a run configured as ``cfg`` (its TrainConfig) may not resume the checkpoint ``saved``
    (its common state at today's schema: "config", "train_state").

    Each field's resume class (flags.py, declared with its flag) decides. MATCH: refused when it
    differs (the model provider and shapes: the weights depend on them). LAYOUT: refused when the
    optimizer state is loaded (it reshards across DP only). SCHEDULE: Megatron's rule, a change
    needs --override-opt_param-scheduler (use the new values) or
    --use-checkpoint-opt_param-scheduler (keep the checkpoint's), unless the scheduler is not
    loaded. Everything else may change."""
    a = saved["config"]
    ck = cfg.ckpt
    changed = _changed(a, cfg)
    problems = [f"{label}: checkpoint {x!r}, now {y!r}"
                for _, kind, label, x, y in changed if kind == MATCH]
    load_optim = not (ck.finetune or ck.no_load_optim)
    if load_optim and a["ckpt"]["no_save_optim"]:
        problems.append("the checkpoint was saved with --no-save-optim and has no optimizer "
                        "state: pass --no-load-optim (a fresh optimizer) or --finetune")
    if load_optim:
        problems += [f"{label}: checkpoint {x}, now {y} (optimizer state reshards across DP "
                     f"only; load weights alone with --no-load-optim)"
                     for _, kind, label, x, y in changed if kind == LAYOUT]
    load_scheduler = not (ck.finetune or ck.no_load_scheduler)
    if load_scheduler and not (ck.override_opt_param_scheduler
                               or ck.use_checkpoint_opt_param_scheduler):
        unit = lambda k: " samples" if k.endswith("_samples") else ""  # noqa: E731
        schedule = [f"{label}: checkpoint {x!r}{unit(k)}, now {y!r}{unit(k)}"
                    for k, kind, label, x, y in changed if kind == SCHEDULE]
        if schedule:
            hint = ("pass --override-opt_param-scheduler to train on with the new schedule, "
                    "--use-checkpoint-opt_param-scheduler to keep the checkpoint's, or "
                    "--no-load-scheduler to restart it")
            g = a["batch"]["global_batch_size"]
            decay = a["schedule"]["decay_samples"]
            if (a["schedule"]["train_iters"] != cfg.schedule.train_iters
                    and decay != cfg.schedule.decay_samples):
                hint += (f"; --lr-decay-iters defaults to --train-iters: to extend the run and keep "
                         f"the checkpoint's decay pass --lr-decay-iters {decay // g} "
                         f"(--lr-decay-samples {decay})")
            problems += schedule + [hint]
    if not ck.finetune:
        consumed = saved["train_state"]["consumed_samples"]
        if consumed % cfg.batch.global_batch_size:
            problems.append(f"--global-batch-size {cfg.batch.global_batch_size} does not divide "
                            f"the checkpoint's {consumed} consumed samples")
    return problems


def changed_settings(saved_config: dict, cfg) -> List[str]:
    """What this run changes relative to the checkpoint it resumes, for the log."""
    return [f"{k}: {x!r} -> {y!r}" for k, kind, _, x, y in _changed(saved_config, cfg)
            if kind != QUIET]


def same_layout(saved_config: dict, cfg) -> bool:
    return saved_config["grid"] == dataclasses.asdict(cfg.grid)


# ---- checksums -------------------------------------------------------------------------------

def file_checksum(path: str) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def checksum_files(root: str, names: Iterable[str]) -> Dict[str, dict]:
    return {n: {"size": os.path.getsize(os.path.join(root, n)),
                "crc32": file_checksum(os.path.join(root, n))} for n in names}


def files_written_by(root: str, rank: int) -> List[str]:
    """The files rank ``rank`` wrote into a torch_dist checkpoint: its ``__<rank>_*.distcp``
    shards; rank 0 also the metadata files."""
    names = [n for n in _entries(root) if os.path.isfile(os.path.join(root, n)) and n != MANIFEST]
    own = [n for n in names if n.startswith(f"__{rank}_")]
    if rank == 0:
        own += [n for n in names if not n.startswith("__")]
    return own


def write_tracker(root: str, iteration: Optional[int]) -> None:
    """Atomically: the tracker names ``iteration`` (None: removed, no checkpoint left)."""
    tracker = os.path.join(root, TRACKER)
    if iteration is None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tracker)
        return
    with open(tracker + ".tmp", "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tracker + ".tmp", tracker)


def complete_iterations(root: str) -> List[int]:
    return sorted(i for i in map(_iteration_of, _entries(root))
                  if i is not None and is_complete(iteration_dir(root, i)))


def write_manifest(root: str, entries: Dict[str, dict]) -> None:
    with open(os.path.join(root, MANIFEST), "w") as f:
        json.dump(entries, f, indent=0, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(root: str) -> Dict[str, dict]:
    path = os.path.join(root, MANIFEST)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


def verify_metadata_files(root: str) -> None:
    """The files rank 0 wrote (torch's ``.metadata``, ``metadata.json``) against checksums.json,
    before anything in them is parsed: a damaged or replaced file is one line naming it."""
    manifest = read_manifest(root)
    bad = damaged_files(root, manifest, [n for n in sorted(manifest) if not n.startswith("__")])
    if bad:
        raise CheckpointError(f"{root} is damaged: {'; '.join(bad)}")


def damaged_files(root: str, manifest: Dict[str, dict], names: Iterable[str]) -> List[str]:
    """Those of ``names`` whose size or checksum differs from the manifest, with the reason."""
    bad = []
    for name in names:
        path = os.path.join(root, name)
        want = manifest[name]
        if not os.path.isfile(path):
            bad.append(f"{path} is missing")
        elif os.path.getsize(path) != want["size"]:
            bad.append(f"{path} has {os.path.getsize(path)} bytes, {want['size']} were written")
        elif file_checksum(path) != want["crc32"]:
            bad.append(f"{path} does not match its checksum (crc32 {want['crc32']})")
    return bad


# ---- retention -------------------------------------------------------------------------------

def retention_victims(root: str, keep: int, protected: Iterable[int]) -> List[str]:
    """Complete iteration directories of ``root`` that --keep-latest-checkpoints ``keep`` lets go:
    all but the newest ``keep``, never one in ``protected`` (the iteration this job resumed from,
    the last one known good) nor the tracker's."""
    found = find_checkpoint(root)
    keep_also = set(protected) | ({found[0]} if found else set())
    if not keep:
        return []
    return [iteration_dir(root, i) for i in complete_iterations(root)[:-keep] if i not in keep_also]


def remove_checkpoint(path: str) -> None:
    """Renamed out of the run first (atomic: a crash leaves a ``.trash-`` directory that no load
    takes for a checkpoint and that the next job clears), then deleted."""
    trash = os.path.join(os.path.dirname(path), ".trash-" + os.path.basename(path))
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
