"""Lane routing: which global sample indices each rank consumes, and collation per role.

Megatron orders a global batch micro-batch-major: micro-batch j of step t covers the m * d_l
samples [t*G + j*m*d_l, t*G + (j+1)*m*d_l), and LLM DP rank l (a "lane") takes the l-th slice of
m. An encoder DP rank takes the e-th slice of m * d_l / d_e of the same range: several whole lanes
when d_e < d_l (fan-out), a share of one lane when d_e > d_l (fan-in). The bridge splits and joins
activations in DP-rank order, so both sides line up sample for sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional

import torch

ENCODER, LLM, COLOCATED = "encoder", "llm", "colocated"  # roles; COLOCATED runs both modules


@dataclass(frozen=True)
class RankDataLayout:
    role: str  # ENCODER or LLM
    offset: int  # first sample of this rank within a micro-batch's m * d_l samples
    size: int  # samples per micro-batch on this rank
    microbatch_samples: int  # m * d_l
    num_microbatches: int
    global_batch_size: int
    fan_in: bool  # encoder DP > LLM DP: this encoder rank feeds part of one lane


def rank_layout(*, role: str, dp_rank: int, micro_batch_size: int, llm_dp: int, encoder_dp: int,
                num_microbatches: int) -> RankDataLayout:
    lanes = micro_batch_size * llm_dp
    size = micro_batch_size if role == LLM else lanes // encoder_dp
    return RankDataLayout(role=role, offset=dp_rank * size, size=size, microbatch_samples=lanes,
                          num_microbatches=num_microbatches,
                          global_batch_size=lanes * num_microbatches,
                          fan_in=role == ENCODER and encoder_dp > llm_dp)


def sample_indices(layout: RankDataLayout, step: int, microbatch: int) -> range:
    start = step * layout.global_batch_size + microbatch * layout.microbatch_samples + layout.offset
    return range(start, start + layout.size)


def stack_samples(samples: List[Dict[str, Optional[torch.Tensor]]]) -> dict:
    """Samples ({input_ids, labels, loss_mask, image|None}) -> one micro-batch in the common
    batch form that ``model_inputs`` takes (images of the samples that have one, in order)."""
    images = [s["image"] for s in samples if s["image"] is not None]
    return {key: torch.stack([s[key] for s in samples]) for key in ("input_ids", "labels", "loss_mask")} \
        | {"images": torch.stack(images) if images else None}


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> GPU without stalling the host: a copy from pageable memory makes the CPU wait for
    it (a sync per tensor per micro-batch in the profile), one from pinned memory is queued."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def model_inputs(batch: dict, *, role: str, encoder_module: str, encoder_name: str, fan_in: bool,
                 device: torch.device, dtype: torch.dtype) -> dict:
    """A micro-batch {input_ids, labels, loss_mask, images, [position_ids, packing_kwargs]} ->
    MimoModel.forward kwargs for this rank's role.

    A packed micro-batch (``packing_kwargs``, see task_encoder.packed_sequence_kwargs) goes to the
    LLM as one THD row [1, b * s], the layout megatron-core's packed-sequence kernels take."""
    input_ids = to_device(batch["input_ids"], device)
    if role == COLOCATED:  # one rank, both modules: the LLM's inputs and the lane's images
        return (model_inputs(batch, role=LLM, encoder_module=encoder_module,
                             encoder_name=encoder_name, fan_in=False, device=device, dtype=dtype)
                | {"modality_inputs": model_inputs(
                    batch, role=ENCODER, encoder_module=encoder_module, encoder_name=encoder_name,
                    fan_in=False, device=device, dtype=dtype)["modality_inputs"]})
    if role == LLM:
        b, seq = input_ids.shape
        positions = batch.get("position_ids")
        inputs = {
            "input_ids": input_ids,
            "position_ids": (torch.arange(seq, device=device).expand(b, seq).contiguous()
                             if positions is None else to_device(positions, device)),
            "labels": to_device(batch["labels"], device),
            "loss_mask": to_device(batch["loss_mask"], device),
        }
        packing = batch.get("packing_kwargs")
        if packing is None:
            return inputs
        return {k: v.reshape(1, -1) for k, v in inputs.items()} | {"packing_kwargs": {
            k: to_device(v, device) if torch.is_tensor(v) else v for k, v in packing.items()}}
    modality_inputs = None
    if batch["images"] is not None:
        images = to_device(batch["images"], device).to(dtype)
        sizes = batch.get("imgs_sizes")
        encoder_inputs = ({"images": images} if sizes is None else  # dynamic resolution: packed
                          {"packed_patches": images[None], "imgs_sizes": sizes.tolist()})
        modality_inputs = {encoder_module: {encoder_name: encoder_inputs}}
    # With fan-in each encoder rank feeds exactly one LLM rank, so the per-sample split that
    # MimoModel derives from input_ids is not needed; megatron-core 0.19.2 rejects that split
    # for uneven per-sample image counts under fan-in, which text-only samples produce.
    return {"input_ids": None if fan_in else input_ids, "modality_inputs": modality_inputs}


class LaneIterator:
    """Yields this rank's micro-batches in schedule order; its state is the sample count."""

    per_rank = False  # the state is a sample count, the same on every rank and layout

    def __init__(self, layout: RankDataLayout, make_sample: Callable[[int], dict],
                 collate_fn: Callable[[list], dict]):
        self.layout = layout
        self._make_sample = make_sample
        self._collate = collate_fn
        self._step = 0
        self._microbatch = 0

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        indices = sample_indices(self.layout, self._step, self._microbatch)
        self._microbatch += 1
        if self._microbatch == self.layout.num_microbatches:
            self._step, self._microbatch = self._step + 1, 0
        return self._collate([self._make_sample(i) for i in indices])

    def state_dict(self) -> dict:
        return {"consumed_samples": self._step * self.layout.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        consumed = state["consumed_samples"]
        if consumed % self.layout.global_batch_size:
            raise ValueError(f"consumed samples {consumed} is not a whole number of global "
                             f"batches of {self.layout.global_batch_size}")
        self._step, self._microbatch = consumed // self.layout.global_batch_size, 0


class ColocatedIterator:
    """A colocated rank whose encoder and LLM DP differ reads two streams in step: its LLM lane
    (text, labels) and its encoder DP slice (images); megatron-core's colocated bridge then hands
    the encoder's output to the LLM's layout. Its state is the LLM stream's (both are sample
    counts of the same schedule)."""

    def __init__(self, llm, encoder):
        self.llm, self.encoder = llm, encoder
        self.per_rank = llm.per_rank

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self.llm) | {"modality_inputs": next(self.encoder)["modality_inputs"]}

    def state_dict(self) -> dict:
        return self.llm.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.llm.load_state_dict(state)
        self.encoder.load_state_dict(state)
