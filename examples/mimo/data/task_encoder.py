"""energon samples (captioning, VQA, text) and chats -> MIMO micro-batches, with optional packing.

A sample becomes (input_ids, labels, loss_mask) of its own length: an image sample's prompt goes
through the tokenizer's chat template with one ``<image>`` that expands to the model's number of
placeholder tokens (at --dynamic-resolution, that image's own count: see ``dynamic_size``); the
loss covers only the answer (caption) tokens and the end-of-turn token, never the prompt, the
placeholders or padding. A chat of several turns (hf.py) is written by the chat template whole,
its loss on every assistant turn. Text samples train on every next token. Packing
concatenates samples into one row and records their lengths, so the model can keep attention
within each sample; a batch pads rows to --seq-length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.nn.functional as F
from megatron.energon import CaptioningSample, DefaultTaskEncoder, SkipSample, TextSample, VQASample
from megatron.energon.task_encoder.base import stateless

from examples.mimo.data.tokenizer import Tokenizer
from examples.mimo.images import patchify
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
    images: List[torch.Tensor]  # [C, H, W] each, or [patches, C p^2] (dynamic), placeholder order
    image_sizes: List[Tuple[int, int]]  # (h, w) pixels of each image as the encoder sees it
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
            image = size = None
        elif isinstance(sample, (CaptioningSample, VQASample)):
            if isinstance(sample, CaptioningSample):
                prompt, answer = CAPTION_PROMPT, sample.caption
            else:
                prompt, answer = sample.context, (sample.answers or [""])[0]
            image, size = self._image(sample.image) if self.with_images else (None, None)
            user = (self.tok.image_token + prompt) if image is not None else prompt
            head = self.tok.chat_prompt(user)
            if image is not None:
                at = head.index(self.spec.image_token_id)
                head = head[:at] + [self.spec.image_token_id] * self._tokens(size) + head[at + 1:]
            tail = self.tok.text_to_ids(answer) + [self.tok.eos_id]
            ids, target = head + tail, [False] * len(head) + [True] * len(tail)
        else:
            raise TypeError(f"sample {sample.__key__}: unsupported energon sample type "
                            f"{type(sample).__name__} (CaptioningSample, VQASample, TextSample)")
        return self._encoded(sample.__key__, sample.__restore_key__, ids, target,
                             [(image, size)] if image is not None else [])

    def encode_conversation(self, *, key: str, restore_key: tuple, messages: List[dict],
                            images: List[torch.Tensor]) -> EncodedSample:
        """A chat of several turns ([{role, content}], hf.py's LLaVA conversations): the chat
        template's ids, each ``<image>`` in a user turn expanded like a captioning sample's; the
        loss covers the assistant turns and what the template ends them with. Without images
        (--llm-only) the markers are left out of the text."""
        marker, image_id = self.tok.image_token, self.spec.image_token_id
        if not self.with_images:
            images = []
            messages = [dict(m, content=m["content"].replace(marker, "").strip()) for m in messages]
        elif images and not any(marker in m["content"] for m in messages):
            # LLaVA's convention: images without markers open the first user turn
            first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
            if first is None:
                raise ValueError("images but no user turn to put them in")
            messages = list(messages)
            messages[first] = dict(messages[first],
                                   content=marker * len(images) + "\n" + messages[first]["content"])
        ids, target = self.tok.chat_ids(messages)
        at = [i for i, t in enumerate(ids) if t == image_id]
        if len(at) != len(images):
            raise ValueError(f"{len(at)} {marker} markers for {len(images)} image(s)")
        if any(target[i] for i in at):
            raise ValueError(f"an {marker} marker in an assistant turn")
        inputs = [self._image(im) for im in images]
        for i, (_, size) in zip(reversed(at), reversed(inputs)):  # from the end: offsets hold
            n = self._tokens(size)
            ids[i:i + 1], target[i:i + 1] = [image_id] * n, [False] * n
        return self._encoded(key, restore_key, ids, target, inputs)

    def _encoded(self, key: str, restore_key: tuple, ids: List[int], target: List[bool],
                 images: List[Tuple[torch.Tensor, Tuple[int, int]]]) -> EncodedSample:
        # n + 1 tokens give n positions: the label of position i is token i + 1
        ids, target = ids[:self.seq_length + 1], target[:self.seq_length + 1]
        placeholders = sum(self._tokens(hw) for _, hw in images)
        if images and ids.count(self.spec.image_token_id) != placeholders:
            count_dropped()  # the prompt alone is longer than --seq-length
            raise SkipSample()
        ids_t = torch.tensor(ids, dtype=torch.long)
        return EncodedSample(
            __key__=key, __restore_key__=restore_key, input_ids=ids_t[:-1], labels=ids_t[1:],
            loss_mask=torch.tensor(target[1:], dtype=torch.float32),
            images=[im for im, _ in images], image_sizes=[hw for _, hw in images],
            seqlens=[len(ids) - 1], keys=[key])

    def _image(self, image: torch.Tensor):
        """[C, H, W] in [0, 1] (energon's torchrgb decode) -> (the encoder's input, (h, w)):
        resized to the provider's size, or for dynamic resolution to ``dynamic_size`` and
        patchified; normalised with the provider's mean and std."""

        spec = self.spec
        image = image.float()
        h, w = (dynamic_size(image.shape[-2:], spec) if spec.dynamic_resolution
                else spec.image_shape[1:])
        if image.shape[-2:] != (h, w):
            image = F.interpolate(image[None], size=(h, w), mode="bilinear", antialias=True,
                                  align_corners=False)[0]
        image = (image - self.mean) / self.std
        return (patchify(image, spec.patch_dim) if spec.dynamic_resolution else image), (h, w)

    def _tokens(self, size: Tuple[int, int]) -> int:
        if not self.spec.dynamic_resolution:
            return self.spec.image_tokens
        return (size[0] // self.spec.patch_dim // 2) * (size[1] // self.spec.patch_dim // 2)

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
            image_sizes=[hw for s in samples for hw in s.image_sizes],
            seqlens=[n for s in samples for n in s.seqlens], keys=[k for s in samples for k in s.keys])

    # ---- micro-batch ------------------------------------------------------------------------

    @stateless
    def batch(self, samples: List[EncodedSample]) -> dict:
        global _dropped_in_worker

        def pad(name: str, value) -> torch.Tensor:
            rows = [getattr(s, name) for s in samples]
            return torch.stack([F.pad(r, (0, self.seq_length - r.numel()), value=value) for r in rows])

        images = [im for s in samples for im in s.images]
        sizes = [hw for s in samples for hw in s.image_sizes]
        dropped, _dropped_in_worker = _dropped_in_worker, 0
        dynamic = self.spec.dynamic_resolution
        return {
            "__restore_key__": (),
            "input_ids": pad("input_ids", self.tok.pad_id),
            "labels": pad("labels", self.tok.pad_id),
            "loss_mask": pad("loss_mask", 0.0),
            # dynamic: every image's patches back to back, [patches, C p^2], with their sizes
            "images": (torch.cat if dynamic else torch.stack)(images) if images else None,
            "imgs_sizes": torch.tensor(sizes, dtype=torch.long) if dynamic and sizes else None,
            "seqlens": [s.seqlens for s in samples],
            "keys": [s.keys for s in samples],
            "dropped": dropped,
        }


def dynamic_size(hw, spec: DataSpec) -> Tuple[int, int]:
    """An image's encoder size at dynamic resolution: its aspect ratio, scaled down (never up)
    to at most the provider's fixed-resolution area and ``max_image_side`` per side, each side a
    multiple of 2 x patch_dim (at least one token)."""
    h, w = int(hw[0]), int(hw[1])
    unit = 2 * spec.patch_dim
    scale = min(1.0, math.sqrt(spec.image_shape[1] * spec.image_shape[2] / (h * w)),
                spec.max_image_side / max(h, w))
    return (max(unit, int(h * scale) // unit * unit), max(unit, int(w * scale) // unit * unit))


def position_ids(seqlens: List[List[int]], seq_length: int) -> torch.Tensor:
    """Positions restart at 0 in every packed sample; padding continues the last one."""
    rows = []
    for lens in seqlens:
        row = torch.cat([torch.arange(n) for n in lens]) if lens else torch.zeros(0, dtype=torch.long)
        tail = torch.arange(row.numel(), seq_length) - (row.numel() - (lens[-1] if lens else 0))
        rows.append(torch.cat([row, tail]))
    return torch.stack(rows)


def packed_sequence_kwargs(seqlens: List[List[int]], seq_length: int) -> dict:
    """MimoModel ``packing_kwargs`` for a packed micro-batch of b rows flattened into one THD
    sequence of b * s tokens: a segment per packed sample, each row's padding in its last one.

    TE attention and Mamba (``seq_idx``, from ``total_tokens``) then keep every sample to itself;
    ``tokens_per_sample`` = s lets megatron's MoE layers and our local attention see the rows
    again (the sequence aux loss per row, a [b, s, s] mask rather than a [bs, bs] one)."""
    bounds = [0]
    for row, lens in enumerate(seqlens):
        start = row * seq_length
        for n in lens[:-1]:
            start += n
            bounds.append(start)
        bounds.append((row + 1) * seq_length)
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seqlens_q": cu, "cu_seqlens_kv": cu.clone(), "max_seqlen_q": longest,
            "max_seqlen_kv": longest, "total_tokens": len(seqlens) * seq_length,
            "tokens_per_sample": seq_length}
