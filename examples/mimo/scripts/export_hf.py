"""Export a checkpoint of this trainer as a Hugging Face folder, in one process.

    python -m examples.mimo.scripts.export_hf --load RUN [--iteration N] --out DIR [--tokenizer TOK]

Any layout that wrote the checkpoint (TP, PP, EP, DP, hetero or colocated) exports the same way:
dist-checkpointing stores each tensor under its global key, so it is read whole here, without the
training world, and mapped to transformers' names by the provider's recipes (the import's,
inverted). The folder holds safetensors shards with their index and config.json (and the
tokenizer files of --tokenizer); ``transformers.AutoModel.from_pretrained(DIR)`` loads it offline.
It is built in DIR.tmp and renamed into place; an existing non-empty DIR is never overwritten.
Nothing in the checkpoint is executed: checksums first, then metadata unpickled by allow-list.
Memory: the HF tensors are assembled on the host (about the model's size).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import List, Optional

import torch

# The stored keys: a branch of the MimoModel (DDP's "module." inside), then the branch's own key.
_BRANCH = re.compile(r"^(language_model|modality_submodules\.(\w+))\.(?:module\.)?(.+)$")


def parse(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="A run directory or one of its iter_N folders.")
    p.add_argument("--iteration", type=int, default=None, help="Default: the latest.")
    p.add_argument("--out", required=True, help="The folder to create.")
    p.add_argument("--tokenizer", default=None, help="A folder whose tokenizer files to copy.")
    p.add_argument("--dtype", choices=("bf16", "fp32", "checkpoint"), default="checkpoint",
                   help="The exported weights' dtype (default: as trained).")
    return p.parse_args(argv)


def checkpoint_dir(load: str, iteration: Optional[int]) -> str:
    from examples.mimo.training.hetero.ckpt_policy import find_checkpoint, iteration_dir, is_complete

    if iteration is not None:
        path = iteration_dir(load, iteration)
        if not is_complete(path):
            raise ValueError(f"--iteration {iteration}: {path} is not a complete checkpoint")
        return path
    found = find_checkpoint(load)
    if found is None:
        raise ValueError(f"--load {load} holds no checkpoint")
    return found[1]


def export(args: argparse.Namespace) -> str:
    from torch.distributed.checkpoint import FileSystemReader, load

    from examples.mimo.model_providers import MODEL_PROVIDERS
    from examples.mimo.model_providers.hf_checkpoint import Assembler, Writer
    from examples.mimo.training.hetero import compat
    from examples.mimo.training.hetero.checkpointing import read_common
    from examples.mimo.training.hetero.ckpt_policy import verify_metadata_files

    path = checkpoint_dir(args.load, args.iteration)
    compat.refuse_pickled_checkpoint_objects()
    verify_metadata_files(path)
    config = read_common(path)["config"]
    provider = MODEL_PROVIDERS[config["model_provider"]]
    branches, hf_config = provider.hf_export(config["model"], llm_only=config["grid"]["llm_only"])
    writer = Writer(args.out)  # refuses a non-empty --out before anything is read
    stored = FileSystemReader(path).read_metadata().state_dict_metadata
    wanted = {}  # stored key -> (branch, its key there)
    for key in sorted(stored):
        m = _BRANCH.match(key)
        if m is None or "_extra_state" in key:
            continue
        branch = "language" if m.group(1) == "language_model" else m.group(2)
        if m.group(3) not in branches.get(branch, {}):
            raise ValueError(f"{path}: {key} has no Hugging Face name (model provider "
                             f"{config['model_provider']})")
        wanted[key] = (branch, m.group(3))
    missing = sorted(k for name, recipes in branches.items()
                     for k in set(recipes) - {ours for b, ours in wanted.values() if b == name})
    if missing:
        raise ValueError(f"{path} lacks {missing[:8]}")
    # One read of every model tensor (torch's planner reads the metadata once, not per key);
    # the HF tensors are assembled from them, so both are on the host at the end anyway.
    tensors = {key: torch.empty(stored[key].size, dtype=stored[key].properties.dtype)
               for key in wanted}
    load(tensors, storage_reader=FileSystemReader(path), no_dist=True)
    parts = Assembler()
    for key, (branch, ours) in wanted.items():
        tensor = tensors.pop(key)
        if args.dtype != "checkpoint":
            tensor = tensor.to(torch.bfloat16 if args.dtype == "bf16" else torch.float32)
        branches[branch][ours].write(tensor, parts)
    for name in sorted(parts.blocks):
        writer.add(name, parts.tensor(name))
    writer.close(_full_config(hf_config), copy_from=args.tokenizer)
    return path


def _full_config(config: dict) -> dict:
    """config.json as transformers writes it for these fields (its defaults filled in)."""
    from transformers import AutoConfig

    fields = dict(config)
    architectures = fields.pop("architectures")
    made = AutoConfig.for_model(fields.pop("model_type"), **fields)
    made.architectures = architectures
    return made.to_dict()


def main(argv=None) -> int:
    from examples.mimo.training.hetero.errors import HeteroError

    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        path = export(args)
    except (ValueError, OSError, HeteroError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {path} to {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
