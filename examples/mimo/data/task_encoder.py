"""energon samples (captioning, VQA, text) -> MIMO micro-batches, with optional packing.

A sample becomes (input_ids, labels, loss_mask) of its own length: an image sample's prompt goes
through the tokenizer's chat template with one ``<image>`` that expands to the model's number of
placeholder tokens; the loss covers only the answer (caption) tokens and the end-of-turn token,
never the prompt, the placeholders or padding. Text samples train on every next token. Packing
concatenates samples into one row and records their lengths, so the model can keep attention
within each sample; a batch pads rows to --seq-length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from megatron.energon import CaptioningSample, DefaultTaskEncoder, SkipSample, TextSample, VQASample
from megatron.energon.task_encoder.base import stateless

from examples.mimo.data.tokenizer import Tokenizer
from examples.mimo.interfaces import DataSpec

CAPTION_PROMPT = "describe the image."

# Samples a worker process dropped (decode errors, over-long prompts) since its last batch; the
# next batch carries the count to the main process, which adds it to the log.
_dropped_in_worker = 0


def count_dropped() -> None:
    global _dropped_in_worker
    _dropped_in_worker += 1


@dataclass
class EncodedSample:
    __key__: str
    __restore_key__: tuple
    input_ids: torch.Tensor  # [n] int64
    labels: torch.Tensor  # [n]
    loss_mask: torch.Tensor  # [n] float
    images: List[torch.Tensor]  # [C, H, W] each, in placeholder order
    seqlens: List[int]  # per packed sample; one entry when unpacked
    keys: List[str]  # source sample keys, in row order


class MimoTaskEncoder(DefaultTaskEncoder):
    def __init__(self, *, tokenizer: Tokenizer, spec: DataSpec, seq_length: int, with_images: bool):
        super().__init__()
        self.tok = tokenizer
        self.spec = spec
        self.seq_length = seq_length
        self.with_images = with_images
        self.mean = torch.tensor(spec.pixel_mean).view(3, 1, 1)
        self.std = torch.tensor(spec.pixel_std).view(3, 1, 1)

    # ---- one sample -------------------------------------------------------------------------

    @stateless
    def encode_sample(self, sample) -> EncodedSample:
        if isinstance(sample, TextSample):
            ids = self.tok.text_to_ids(sample.text) + [self.tok.eos_id]
            target = [True] * len(ids)
            image = None
        elif isinstance(sample, (CaptioningSample, VQASample)):
            if isinstance(sample, CaptioningSample):
                prompt, answer = CAPTION_PROMPT, sample.caption
            else:
                prompt, answer = sample.context, (sample.answers or [""])[0]
            image = self._image(sample.image) if self.with_images else None
            user = (self.tok.image_token + prompt) if image is not None else prompt
            head = self.tok.chat_prompt(user)
            if image is not None:
                at = head.index(self.spec.image_token_id)
                head = head[:at] + [self.spec.image_token_id] * self.spec.image_tokens + head[at + 1:]
            tail = self.tok.text_to_ids(answer) + [self.tok.eos_id]
            ids, target = head + tail, [False] * len(head) + [True] * len(tail)
        else:
            raise TypeError(f"sample {sample.__key__}: unsupported energon sample type "
                            f"{type(sample).__name__} (CaptioningSample, VQASample, TextSample)")
        # n + 1 tokens give n positions: the label of position i is token i + 1
        ids, target = ids[:self.seq_length + 1], target[:self.seq_length + 1]
        if image is not None and ids.count(self.spec.image_token_id) != self.spec.image_tokens:
            count_dropped()  # the prompt alone is longer than --seq-length
            raise SkipSample()
        ids_t = torch.tensor(ids, dtype=torch.long)
        return EncodedSample(
            __key__=sample.__key__, __restore_key__=sample.__restore_key__,
            input_ids=ids_t[:-1], labels=ids_t[1:],
            loss_mask=torch.tensor(target[1:], dtype=torch.float32),
            images=[image] if image is not None else [], seqlens=[len(ids) - 1], keys=[sample.__key__])

    def _image(self, image: torch.Tensor) -> torch.Tensor:
        """[C, H, W] in [0, 1] (energon's torchrgb decode) -> the provider's size, normalised."""
        _, h, w = self.spec.image_shape
        image = image.float()
        if image.shape[-2:] != (h, w):
            image = F.interpolate(image[None], size=(h, w), mode="bilinear", antialias=True,
                                  align_corners=False)[0]
        return (image - self.mean) / self.std

    # ---- packing (--packing-buffer-size) ----------------------------------------------------

    def select_samples_to_pack(self, samples: List[EncodedSample]) -> List[List[EncodedSample]]:
        """First fit in buffer order: deterministic, so a resumed run packs as the straight one."""
        bins: List[List[EncodedSample]] = []
        room: List[int] = []
        for s in samples:
            n = s.input_ids.numel()
            for i, free in enumerate(room):
                if n <= free:
                    bins[i].append(s)
                    room[i] -= n
                    break
            else:
                bins.append([s])
                room.append(self.seq_length - n)
        return bins

    @stateless
    def pack_selected_samples(self, samples: List[EncodedSample]) -> EncodedSample:
        return EncodedSample(
            __key__=",".join(s.__key__ for s in samples),
            __restore_key__=(), input_ids=torch.cat([s.input_ids for s in samples]),
            labels=torch.cat([s.labels for s in samples]),
            loss_mask=torch.cat([s.loss_mask for s in samples]),
            images=[im for s in samples for im in s.images],
            seqlens=[n for s in samples for n in s.seqlens], keys=[k for s in samples for k in s.keys])

    # ---- micro-batch ------------------------------------------------------------------------

    @stateless
    def batch(self, samples: List[EncodedSample]) -> dict:
        global _dropped_in_worker

        def pad(name: str, value) -> torch.Tensor:
            rows = [getattr(s, name) for s in samples]
            return torch.stack([F.pad(r, (0, self.seq_length - r.numel()), value=value) for r in rows])

        images = [im for s in samples for im in s.images]
        dropped, _dropped_in_worker = _dropped_in_worker, 0
        return {
            "__restore_key__": (),
            "input_ids": pad("input_ids", self.tok.pad_id),
            "labels": pad("labels", self.tok.pad_id),
            "loss_mask": pad("loss_mask", 0.0),
            "images": torch.stack(images) if images else None,
            "seqlens": [s.seqlens for s in samples],
            "keys": [s.keys for s in samples],
            "dropped": dropped,
        }


def position_ids(seqlens: List[List[int]], seq_length: int) -> torch.Tensor:
    """Positions restart at 0 in every packed sample; padding continues the last one."""
    rows = []
    for lens in seqlens:
        row = torch.cat([torch.arange(n) for n in lens]) if lens else torch.zeros(0, dtype=torch.long)
        tail = torch.arange(row.numel(), seq_length) - (row.numel() - (lens[-1] if lens else 0))
        rows.append(torch.cat([row, tail]))
    return torch.stack(rows)


def block_causal_mask(seqlens: List[List[int]], seq_length: int) -> Optional[torch.Tensor]:
    """[b, 1, s, s], True = masked: causal within each packed sample, nothing across samples.
    None when no row holds more than one sample (the layer's own causal mask is then exact)."""
    if all(len(lens) <= 1 for lens in seqlens):
        return None
    masks = []
    for lens in seqlens:
        seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)] +
                        [torch.full((seq_length - sum(lens),), len(lens))])
        masks.append((seg[:, None] != seg[None, :]) | torch.ones(seq_length, seq_length).triu(1).bool())
    return torch.stack(masks)[:, None]
