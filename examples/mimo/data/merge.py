"""Merging per-lane inputs that one encoder rank runs as one forward, by schema.

Each known key has one rule; an unknown key or a value of an unexpected type is a TypeError.
Guessing a concatenation axis from shapes is what this replaces: two lanes with equal shapes
make such a guess silently pick the wrong axis.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams


def _cat_rows(name: str, parts: list) -> Optional[torch.Tensor]:
    """Tensors along dim 0; None parts (lanes without images) are left out."""
    present = [p for p in parts if p is not None]
    for p in present:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"merge: {name} must be a tensor or None, got {type(p).__name__}")
    return torch.cat(present) if present else None


def _concat_lists(name: str, parts: list) -> list:
    for p in parts:
        if not isinstance(p, (list, tuple)):
            raise TypeError(f"merge: {name} must be a list, got {type(p).__name__}")
    return [x for p in parts for x in p]


def _sum(name: str, parts: list) -> int:
    for p in parts:
        if not isinstance(p, int):
            raise TypeError(f"merge: {name} must be an int, got {type(p).__name__}")
    return sum(parts)


def _packed_seq_params(name: str, parts: list) -> Optional[PackedSeqParams]:
    """cu_seqlens of each lane shifted by the tokens of the lanes before it; max_seqlen the max."""
    present = [p for p in parts if p is not None]
    if not present:
        return None
    for p in present:
        if not isinstance(p, PackedSeqParams):
            raise TypeError(f"merge: {name} must be PackedSeqParams, got {type(p).__name__}")
    fields = {}
    for q in ("q", "kv"):
        cu, offset = [getattr(present[0], f"cu_seqlens_{q}")[:1]], 0
        for p in present:
            c = getattr(p, f"cu_seqlens_{q}")
            cu.append(c[1:] + offset)
            offset += int(c[-1])
        fields[f"cu_seqlens_{q}"] = torch.cat(cu)
        fields[f"max_seqlen_{q}"] = max(int(getattr(p, f"max_seqlen_{q}")) for p in present)
    return PackedSeqParams(qkv_format=present[0].qkv_format, **fields)


# Task-encoder micro-batches (see task_encoder.MimoTaskEncoder.batch), lane after lane.
LANE_BATCH: Dict[str, Callable[[str, list], object]] = {
    "input_ids": _cat_rows, "labels": _cat_rows, "loss_mask": _cat_rows, "images": _cat_rows,
    "imgs_sizes": _cat_rows, "seqlens": _concat_lists, "keys": _concat_lists, "__restore_key__": _concat_lists,
    "dropped": _sum,
}

# Encoder inputs: dense images [n, C, H, W] or packed patches [tokens, D] (dynamic resolution),
# with imgs_sizes [n, 2] along images and the packed-sequence parameters of the patch sequences.
ENCODER_INPUTS: Dict[str, Callable[[str, list], object]] = {
    "images": _cat_rows, "imgs_sizes": _cat_rows, "packed_seq_params": _packed_seq_params,
}


def merge(parts: List[dict], schema: Dict[str, Callable[[str, list], object]]) -> dict:
    if not parts:
        raise ValueError("merge: nothing to merge")
    keys = set(parts[0])
    for p in parts[1:]:
        if set(p) != keys:
            raise TypeError(f"merge: lanes disagree on their keys: {sorted(keys)} vs {sorted(p)}")
    unknown = sorted(keys - set(schema))
    if unknown:
        raise TypeError(f"merge: no rule for {', '.join(unknown)} (known: {', '.join(sorted(schema))})")
    return {k: schema[k](k, [p[k] for p in parts]) for k in parts[0]}
