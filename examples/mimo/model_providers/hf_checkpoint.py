"""Hugging Face model folders in and out, for any provider: what a folder is, its tensors read
by slices, a megatron-core module filled from them, and a folder written back.

A provider describes its model once, as ``Recipe``s: for each tensor of ours under its
dist-checkpointing key (global: layout-independent, as ``sharded_state_dict`` names it), the
row blocks of Hugging Face tensors it is made of, in order (a fused QKV interleaves the rows of
q, k and v per query group; a Mamba in_proj part is a row range of HF's in_proj), and for expert
weights the tensor of each expert. Import reads, on each rank, only the rows and columns of the
shards that rank holds (safetensors' lazy slices); export inverts the same recipes. Coverage is
strict both ways: every tensor of ours has a recipe, every row of every HF tensor is used
exactly once or its name is listed as deliberately unused, and a mismatch names them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SHARD_BYTES = 5 * 2 ** 30  # transformers' default max_shard_size
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
                   "generation_config.json", "preprocessor_config.json", "processor_config.json")


def is_hf_folder(path: Optional[str]) -> bool:
    """A local HF model folder: ``config.json`` beside safetensors weights (decided by content,
    so a dist-checkpoint directory is never taken for one)."""
    return bool(path) and os.path.isfile(os.path.join(path, CONFIG)) and any(
        n.endswith(".safetensors") for n in os.listdir(path))


def read_config(path: str, flag: str) -> dict:
    """The folder's config.json; ValueError naming ``flag`` when it is missing or malformed."""
    if not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is not a directory")
    file = os.path.join(path, CONFIG)
    try:
        with open(file) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{flag} {path} has no {CONFIG} (a Hugging Face model folder has "
                         f"config.json and *.safetensors; nothing is downloaded)") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{flag} {file} is not readable JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{flag} {file} is not a JSON object")
    if not any(n.endswith(".safetensors") for n in os.listdir(path)):
        raise ValueError(f"{flag} {path} has {CONFIG} but no *.safetensors weights")
    return config


class Reader:
    """The tensors of an HF folder by name, read lazily: ``read(name, rows, cols)`` touches only
    those bytes. Sharded folders are found through their index, a single file directly."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        index = os.path.join(path, INDEX)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(f"{index} is not a readable index of safetensors files "
                                 f"({type(err).__name__}: {err})") from None
        else:
            files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        self._handles = {}
        self._file_of: Dict[str, str] = {}
        for name in files:
            file = os.path.join(path, name)
            try:  # the header only: JSON, no pickle, nothing executed
                handle = safe_open(file, framework="pt")
            except Exception as err:  # safetensors' own SafetensorError, or an OSError
                raise ValueError(f"{file} is not a readable safetensors file ({err})") from None
            self._handles[name] = handle
            for key in handle.keys():
                self._file_of[key] = name

    def names(self) -> List[str]:
        return sorted(self._file_of)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def _slice(self, name: str):
        if name not in self._file_of:
            raise KeyError(f"{self.path} has no tensor {name}")
        return self._handles[self._file_of[name]].get_slice(name)

    def read(self, name: str, index: Tuple[slice, ...]) -> torch.Tensor:
        return self._slice(name)[index]


@dataclass(frozen=True)
class Rows:
    """A tensor of ours: the row blocks ``(hf name, first row, rows)`` stacked in order; every
    other dimension is the HF tensors' own."""

    parts: Tuple[Tuple[str, int, int], ...]

    def read(self, reader: Reader, index: Sequence[slice]) -> torch.Tensor:
        start, stop = index[0].start, index[0].stop
        out, at = [], 0
        for name, first, count in self.parts:
            lo, hi = max(start, at), min(stop, at + count)
            if lo < hi:
                out.append(reader.read(name, (slice(first + lo - at, first + hi - at),
                                              *index[1:])))
            at += count
        return torch.cat(out) if len(out) > 1 else out[0]

    def write(self, tensor: torch.Tensor, out: "Assembler") -> None:
        at = 0
        for name, first, count in self.parts:
            out.put(name, first, tensor[at:at + count])
            at += count


@dataclass(frozen=True)
class Experts:
    """A tensor of ours with a leading expert axis (megatron-core's experts, one recipe each)."""

    experts: Tuple[Rows, ...]

    def read(self, reader: Reader, index: Sequence[slice]) -> torch.Tensor:
        return torch.stack([self.experts[e].read(reader, index[1:])
                            for e in range(index[0].start, index[0].stop)])

    def write(self, tensor: torch.Tensor, out: "Assembler") -> None:
        for e, recipe in enumerate(self.experts):
            recipe.write(tensor[e], out)


def hf_rows(recipes: Dict[str, object]) -> Dict[str, List[Tuple[int, int, str]]]:
    """{hf name: [(first row, rows, our key)]} that the recipes read."""
    out: Dict[str, List[Tuple[int, int, str]]] = {}
    for key, recipe in recipes.items():
        for rows_ in (recipe.experts if isinstance(recipe, Experts) else (recipe,)):
            for name, first, count in rows_.parts:
                out.setdefault(name, []).append((first, count, key))
    return out


def coverage_problems(recipes: Dict[str, object], ours: Iterable[str], shapes: Dict[str, tuple],
                      unused: Callable[[str], bool]) -> List[str]:
    """Why the recipes do not map ``ours`` (the model's keys) onto the HF tensors ``shapes``
    (name: shape) one to one; ``unused(name)``: an HF tensor deliberately left out."""
    problems = []
    ours = set(ours)
    if ours - set(recipes):
        problems.append(f"no Hugging Face tensor fills {sorted(ours - set(recipes))[:8]}")
    if set(recipes) - ours:
        problems.append(f"the model has no {sorted(set(recipes) - ours)[:8]}")
    used = hf_rows({k: r for k, r in recipes.items() if k in ours})
    missing = sorted(set(used) - set(shapes))
    if missing:
        problems.append(f"the folder lacks {missing[:8]}")
    left = sorted(n for n in set(shapes) - set(used) if not unused(n))
    if left:
        problems.append(f"{len(left)} tensors of the folder would not be used: {left[:8]}")
    for name, blocks in sorted(used.items()):
        if name not in shapes:
            continue
        covered = sorted((first, first + count) for first, count, _ in blocks)
        at = 0
        for lo, hi in covered:
            if lo != at:
                break
            at = hi
        if at != shapes[name][0] or covered[-1][1] != shapes[name][0]:
            problems.append(f"{name} {list(shapes[name])}: rows read {covered}, not each once")
    return problems


class Assembler:
    """HF tensors put together from the row blocks export writes (each row exactly once)."""

    def __init__(self):
        self.blocks: Dict[str, List[Tuple[int, torch.Tensor]]] = {}

    def put(self, name: str, first: int, block: torch.Tensor) -> None:
        self.blocks.setdefault(name, []).append((first, block))

    def tensor(self, name: str) -> torch.Tensor:
        blocks = sorted(self.blocks.pop(name), key=lambda b: b[0])
        at = 0
        for first, block in blocks:
            if first != at:
                raise ValueError(f"{name}: rows {at}..{first} written {'twice' if first < at else 'never'}")
            at += block.shape[0]
        return torch.cat([b for _, b in blocks]).contiguous()


# ---- import into a megatron-core module ---------------------------------------------------------

@dataclass
class BranchShards:
    """A built branch as dist-checkpointing shards it (factories applied): the keys the coverage
    check gathers and the shards import fills, made once."""

    module: torch.nn.Module
    sharded: dict
    factories: dict
    keys: List[str]


def branch_shards(module: torch.nn.Module, metadata: dict) -> BranchShards:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess

    sharded, _, factories = load_preprocess(module.sharded_state_dict(prefix="",
                                                                      metadata=metadata))
    keys = sorted({v.key for v in nested_values(sharded) if isinstance(v, ShardedTensor)})
    return BranchShards(module, sharded, factories, keys)


def load_into(shards: BranchShards, recipes: Dict[str, object], reader: Reader) -> None:
    """Fill a branch from the folder: each of its shards reads its own rows and columns only, in
    the parameter's dtype. Raises ValueError naming keys without a recipe."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import (ShardedObject, ShardedTensor,
                                                          apply_factory_merges)

    missing = sorted(set(shards.keys) - set(recipes))
    if missing:
        raise ValueError(f"no Hugging Face tensor fills {missing[:8]}")

    def fill(value):
        if isinstance(value, ShardedObject):  # TE's _extra_state: kept as built
            return None
        if not isinstance(value, ShardedTensor):
            return value
        index = [slice(off, off + 1) for off in value.global_offset[:value.prepend_axis_num]]
        index += [slice(off, off + size) for off, size in
                  zip(value.global_offset[value.prepend_axis_num:], value.local_shape)]
        got = recipes[value.key].read(reader, index)
        got = got.reshape(value.local_shape)
        if got.shape != value.data.shape:
            raise ValueError(f"{value.key}: Hugging Face gives {list(got.shape)}, the model holds "
                             f"{list(value.data.shape)}")
        return got.to(value.data.dtype)

    dict_list_map_inplace(fill, shards.sharded)
    state = _drop_none(apply_factory_merges(shards.sharded, shards.factories))
    with torch.no_grad():
        incompatible = shards.module.load_state_dict(state, strict=False)
    bad = [k for k in incompatible.missing_keys if not k.endswith("_extra_state")]
    if bad or incompatible.unexpected_keys:
        raise ValueError(f"loading Hugging Face weights left {bad[:8]} unfilled and "
                         f"{incompatible.unexpected_keys[:8]} unplaced")


def _drop_none(tree):
    if isinstance(tree, dict):
        return {k: _drop_none(v) for k, v in tree.items() if v is not None}
    return tree


# ---- export --------------------------------------------------------------------------------------

class Writer:
    """Safetensors shards + index + config.json into a new folder, made whole in ``<out>.tmp``
    and renamed into place (a failed export leaves no folder that looks complete)."""

    def __init__(self, out: str, shard_bytes: int = SHARD_BYTES):
        if os.path.exists(out) and os.listdir(out):
            raise ValueError(f"--out {out} exists and is not empty (never overwritten)")
        self.out, self.tmp = out, out.rstrip("/") + ".tmp"
        self.shard_bytes = shard_bytes
        self.pending: Dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: List[Dict[str, torch.Tensor]] = []
        self.files: List[str] = []
        self.weight_map: Dict[str, str] = {}
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self.files:  # the first shard: a fresh DIR.tmp (an earlier failed export's goes)
            import shutil

            shutil.rmtree(self.tmp, ignore_errors=True)
            os.makedirs(self.tmp)

        name = f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, os.path.join(self.tmp, name), metadata={"format": "pt"})
        self.files.append(name)
        self.weight_map.update({k: name for k in self.pending})
        self.pending, self.pending_bytes = {}, 0

    def close(self, config: dict, copy_from: Optional[str] = None) -> None:
        import shutil

        if self.pending:
            self._flush()
        n = len(self.files)
        final = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(self.files)}
        for old, new in final.items():
            os.replace(os.path.join(self.tmp, old), os.path.join(self.tmp, new))
        with open(os.path.join(self.tmp, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": self.total},
                       "weight_map": {k: final[v] for k, v in sorted(self.weight_map.items())}},
                      f, indent=2)
        with open(os.path.join(self.tmp, CONFIG), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        for name in TOKENIZER_FILES if copy_from else ():
            if os.path.isfile(os.path.join(copy_from, name)):
                shutil.copy(os.path.join(copy_from, name), os.path.join(self.tmp, name))
        if os.path.isdir(self.out):
            os.rmdir(self.out)  # empty (checked at start)
        os.replace(self.tmp, self.out)
