"""Job shapes of the sbatch scripts: the one place their training values live.

An ``examples/mimo/scripts/sbatch_<name>.sh`` script holds only SLURM's resources (nodes, time)
and names its shape here; ``sbatch_job.sh`` asks this module for the trainer's flags at run time,
so the grid sizes follow the allocation actually granted: the encoder gets ``encoder_nodes`` whole
nodes (or ``encoder_fraction`` of a single-node job's ranks), the LLM the rest, and DP fills each
grid. Nothing here imports torch: the job script calls it before anything starts, and the
launcher then validates the flags with the trainer's own rules.

    python -m examples.mimo.cluster.presets job SHAPE --nodes N --per-node G [--device cpu] \
        [--time-left 1:58:00 --exit-margin-mins 10] -- [extra trainer flags]
    python -m examples.mimo.cluster.presets table
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple


@dataclass(frozen=True)
class JobShape:
    description: str
    encoder_nodes: int  # whole nodes of the encoder grid (multi-node jobs)
    encoder_fraction: float  # or this share of the ranks (a job of one node)
    encoder_tp: int
    llm_tp: int
    llm_pp: int
    llm_ep: int
    micro_batch: int
    global_batch: int
    seq_length: int
    train_iters: int
    save_interval: int
    model: Tuple[str, ...]  # model and data flags
    schedule: Tuple[str, ...]  # learning-rate schedule and the rest of the recipe
    reference: bool = False  # after a finished run, train the single-grid reference and compare


_MOCK_SCHEDULE = ("--lr", "2e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "3",
                  "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "10",
                  "--lr-wsd-decay-style", "minus_sqrt", "--log-interval", "1")
# Nemotron MoE VLM at 54 layers (36.7B parameters, 34.5B of them in 128 experts) on real data:
# HETERO_DATA_PATH (an energon dataset or blend) and HETERO_TOKENIZER are read by sbatch_job.sh.
_NEMOTRON = ("--model-provider", "nemotron_moe_vlm", "--model-preset", "nemotron-54l",
             "--transformer-impl", "transformer_engine", "--bf16", "--data-provider", "energon",
             "--num-workers", "2", "--sequence-parallel")  # every shape below has LLM TP 2
_NEMOTRON_SCHEDULE = ("--lr", "3e-4", "--min-lr", "3e-5", "--lr-warmup-iters", "200",
                      "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "2000",
                      "--lr-wsd-decay-style", "minus_sqrt", "--weight-decay", "0.05",
                      "--adam-beta2", "0.95", "--log-interval", "10", "--eval-interval", "500",
                      "--eval-iters", "10", "--overlap-grad-reduce")

SHAPES: Dict[str, JobShape] = {
    # The parity tests' layout on one node (mock model and data): half the ranks encode, half
    # train the LLM, then the same steps colocated on every rank as the single-grid reference.
    "parity-small": JobShape(
        description="mock VLM, hetero vs single-grid reference", encoder_nodes=0,
        encoder_fraction=0.5, encoder_tp=1, llm_tp=1, llm_pp=1, llm_ep=1, micro_batch=2,
        global_batch=16, seq_length=64, train_iters=40, save_interval=10,
        model=("--model-provider", "mock", "--data-provider", "mock",
               "--mock-text-only-fraction", "0"),
        schedule=_MOCK_SCHEDULE, reference=True),
    "nemotron-9n": JobShape(
        description="Nemotron-54l VLM, 1 encoder node + 8 LLM nodes", encoder_nodes=1,
        encoder_fraction=0.0, encoder_tp=1, llm_tp=2, llm_pp=1, llm_ep=32, micro_batch=1,
        global_batch=256, seq_length=4096, train_iters=20000, save_interval=500,
        model=_NEMOTRON, schedule=_NEMOTRON_SCHEDULE),
    "nemotron-33n": JobShape(
        description="Nemotron-54l VLM, 1 encoder node + 32 LLM nodes", encoder_nodes=1,
        encoder_fraction=0.0, encoder_tp=1, llm_tp=2, llm_pp=1, llm_ep=64, micro_batch=1,
        global_batch=1024, seq_length=4096, train_iters=20000, save_interval=500,
        model=_NEMOTRON, schedule=_NEMOTRON_SCHEDULE),
    "nemotron-68n": JobShape(
        description="Nemotron-54l VLM, 4 encoder nodes + 64 LLM nodes", encoder_nodes=4,
        encoder_fraction=0.0, encoder_tp=1, llm_tp=2, llm_pp=2, llm_ep=64, micro_batch=1,
        global_batch=2048, seq_length=4096, train_iters=20000, save_interval=500,
        model=_NEMOTRON, schedule=_NEMOTRON_SCHEDULE),
}


def lookup(name: str) -> JobShape:
    if name not in SHAPES:
        raise ValueError(f"job shape {name!r} is not one of {sorted(SHAPES)}")
    return SHAPES[name]


def grid_flags(shape: JobShape, nodes: int, per_node: int) -> List[str]:
    """The hetero grid of ``nodes`` x ``per_node`` ranks: encoder first, LLM after it."""
    world = nodes * per_node
    if shape.encoder_nodes:
        if nodes <= shape.encoder_nodes:
            raise ValueError(f"{nodes} node(s): this shape puts the encoder on "
                             f"{shape.encoder_nodes} whole node(s) and needs more for the LLM")
        encoder = shape.encoder_nodes * per_node
    else:
        if nodes != 1:
            raise ValueError(f"{nodes} nodes: this shape splits one node between the grids "
                             f"(sbatch --nodes 1)")
        encoder = int(world * shape.encoder_fraction)
    llm = world - encoder
    for what, ranks, size in (("encoder", encoder, shape.encoder_tp),
                              ("LLM", llm, shape.llm_tp * shape.llm_pp)):
        if ranks < size or ranks % size:
            raise ValueError(f"{nodes} node(s) x {per_node} rank(s): the {what} grid's {ranks} "
                             f"rank(s) are not a multiple of its TP x PP = {size}")
    return ["--encoder-tp", str(shape.encoder_tp), "--encoder-dp", str(encoder // shape.encoder_tp),
            "--llm-tp", str(shape.llm_tp), "--llm-pp", str(shape.llm_pp),
            "--llm-dp", str(llm // (shape.llm_tp * shape.llm_pp)), "--llm-ep", str(shape.llm_ep)]


def trainer_flags(shape: JobShape, nodes: int, per_node: int) -> List[str]:
    return [*shape.model, *grid_flags(shape, nodes, per_node),
            "--micro-batch-size", str(shape.micro_batch),
            "--global-batch-size", str(shape.global_batch), "--seq-length", str(shape.seq_length),
            "--train-iters", str(shape.train_iters), "--save-interval", str(shape.save_interval),
            *shape.schedule]


def reference_flags(world: int) -> List[str]:
    """The single-grid reference on the same ranks: both modules colocated, DP over all."""
    return ["--colocated", "--encoder-tp", "1", "--encoder-dp", str(world), "--llm-tp", "1",
            "--llm-pp", "1", "--llm-dp", str(world), "--llm-ep", "1"]


def last_value(flags: Sequence[str], name: str) -> Optional[str]:
    """argparse keeps the last value of a repeated flag: so does the job script."""
    value = None
    for i, flag in enumerate(flags):
        if flag == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif flag.startswith(name + "="):
            value = flag.split("=", 1)[1]
    return value


def without(flags: Sequence[str], name: str) -> List[str]:
    """``flags`` less every ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag == name:
            skip = True
        elif not flag.startswith(name + "="):
            out.append(flag)
    return out


def minutes_left(squeue_time: str) -> Optional[float]:
    """SLURM's remaining time (``squeue -o %L``: [days-][hours:]minutes:seconds) in minutes;
    None when the job has no limit."""
    text = squeue_time.strip()
    if not text or text in ("UNLIMITED", "NOT_SET", "INVALID"):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts
    return days * 1440 + h * 60 + m + s / 60


def job(shape_name: str, *, nodes: int, per_node: int, device: str, extra: Sequence[str],
        time_left: str = "", exit_margin_mins: float = 10.0) -> Dict[str, object]:
    """What sbatch_job.sh needs: the trainer's flags, the reference's, when the run is done, and
    when it stops for SLURM's time limit."""
    shape = lookup(shape_name)
    flags = [f for f in trainer_flags(shape, nodes, per_node)
             if device == "cuda" or f != "--bf16"]  # bf16 is CUDA-only
    flags += ["--device", device, *extra]
    left = minutes_left(time_left)
    # Save and exit this long before SLURM's limit (the save must fit in the margin); a job
    # shorter than twice the margin stops at half its time.
    duration = None if left is None else round(max(left - exit_margin_mins, left / 2), 2)
    iters = last_value(flags, "--train-iters")
    return {"flags": flags + (["--exit-duration-in-mins", str(duration)] if duration else []),
            # no checkpoints: the reference is short, and a requeue reruns it from the start
            "reference": (without(flags, "--save-interval") + reference_flags(nodes * per_node)
                          if shape.reference else []),
            "train_iters": int(iters) if iters else 0}


def scripts() -> Dict[str, Tuple[str, str, str]]:
    """shape -> (its sbatch script, #SBATCH --nodes, #SBATCH --time), read from the scripts."""
    import glob
    import os
    import re

    out = {}
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts")
    for path in sorted(glob.glob(os.path.join(here, "sbatch_*.sh"))):
        text = open(path).read()
        shape = re.search(r'sbatch_job\.sh" (\S+) ', text)
        if shape:
            header = dict(re.findall(r"^#SBATCH --([a-z-]+)=(\S+)$", text, re.M))
            out[shape.group(1)] = (os.path.basename(path), header.get("nodes", "?"),
                                   header.get("time", "?"))
    return out


def table() -> str:
    """docs/cluster.md's table of shapes (a test checks that it holds this text)."""
    rows = ["| script | nodes | time | what | encoder | LLM TP/PP/EP | micro / global batch | seq |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    found = scripts()
    for name, s in SHAPES.items():
        script, nodes, time = found.get(name, ("(none)", "?", "?"))
        enc = (f"{s.encoder_nodes} node(s), TP{s.encoder_tp}" if s.encoder_nodes
               else f"{s.encoder_fraction:.0%} of the ranks, TP{s.encoder_tp}")
        rows.append(f"| `{script}` | {nodes} | {time} | {s.description} | {enc} "
                    f"| {s.llm_tp}/{s.llm_pp}/{s.llm_ep} | {s.micro_batch} / {s.global_batch} "
                    f"| {s.seq_length} |")
    return "\n".join(rows)


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m examples.mimo.cluster.presets")
    sub = p.add_subparsers(dest="command", required=True)
    j = sub.add_parser("job", help="shell assignments for sbatch_job.sh")
    j.add_argument("shape")
    j.add_argument("--nodes", type=int, required=True)
    j.add_argument("--per-node", type=int, required=True)
    j.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    j.add_argument("--time-left", default="")
    j.add_argument("--exit-margin-mins", type=float, default=10.0)
    sub.add_parser("table", help="docs/cluster.md's table of shapes")
    left = sub.add_parser("minutes-left", help="squeue's %%L in minutes ('' when unlimited)")
    left.add_argument("time_left")
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args, extra = p.parse_args(argv[:split]), argv[split + 1:]
    if args.command == "table":
        print(table())
        return 0
    if args.command == "minutes-left":
        minutes = minutes_left(args.time_left)
        print("" if minutes is None else f"{minutes:.2f}")
        return 0
    try:
        out = job(args.shape, nodes=args.nodes, per_node=args.per_node, device=args.device,
                  extra=extra, time_left=args.time_left, exit_margin_mins=args.exit_margin_mins)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"flags=({' '.join(shlex.quote(f) for f in out['flags'])})")
    print(f"reference=({' '.join(shlex.quote(f) for f in out['reference'])})")
    print(f"train_iters={out['train_iters']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
