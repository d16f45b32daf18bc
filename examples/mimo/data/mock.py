"""Deterministic synthetic image-text samples: sample i depends only on (--seed, i).

Text follows a per-sample arithmetic progression over the vocabulary, which a small LM learns
quickly, so falling loss is a real signal. A sample has one image (its placeholder tokens right
after the first text token) unless it falls in the text-only fraction.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch

from examples.mimo.data.lanes import ENCODER, LLM, LaneIterator, rank_layout, stack_samples
from examples.mimo.flags import FREE, add_group, option, read
from examples.mimo.interfaces import DataSpec, RankData

NAME = "mock"


@dataclass(frozen=True)
class MockDataConfig:
    text_only_fraction: float = option("--mock-text-only-fraction", FREE, type=float,
                                       default=0.25, help="Share of samples with no image.")
    # text ids drawn from 1..text_vocab; None: the whole vocabulary
    text_vocab: Optional[int] = option(
        "--mock-text-vocab", FREE, type=int, default=None,
        help="Draw text from the first N token ids (default: the model's whole vocabulary). A "
             "short smoke run of a 131k-vocabulary model cannot learn progressions over every "
             "id; over a few thousand it can.")


def add_args(parser: argparse.ArgumentParser) -> None:
    add_group(parser, "mock data provider", MockDataConfig)


def config_from_args(args: argparse.Namespace) -> MockDataConfig:
    if not 0.0 <= args.mock_text_only_fraction <= 1.0:
        raise ValueError(f"--mock-text-only-fraction {args.mock_text_only_fraction} must be in [0, 1]")
    if args.mock_text_vocab is not None and args.mock_text_vocab < 2:
        raise ValueError(f"--mock-text-vocab {args.mock_text_vocab} must be >= 2")
    return MockDataConfig(**read(MockDataConfig, args))


def validate(cfg: MockDataConfig, spec: DataSpec, seq_length: int, *, equal_images: str,
             llm_only: bool) -> None:
    if cfg.text_vocab is not None and cfg.text_vocab > spec.vocab_size - 2:
        raise ValueError(f"--mock-text-vocab {cfg.text_vocab} must be <= vocabulary size "
                         f"{spec.vocab_size} - 2 (0 is unused, one id marks images)")
    text_vocab = cfg.text_vocab or spec.vocab_size - 2
    if 1 <= spec.image_token_id <= text_vocab:
        raise ValueError(f"image token id {spec.image_token_id} lies among the mock text ids "
                         f"1..{text_vocab}; pick an id above them (or lower --mock-text-vocab)")
    if spec.dynamic_resolution:
        raise ValueError("--dynamic-resolution needs images of their own sizes: use "
                         "--data-provider energon (mock images are all one size)")
    if seq_length < spec.image_tokens + 2:
        raise ValueError(f"--seq-length {seq_length} must be >= image tokens {spec.image_tokens} + 2")
    if equal_images and cfg.text_only_fraction > 0:
        raise ValueError(f"--mock-text-only-fraction {cfg.text_only_fraction} must be 0 with "
                         f"{equal_images}: every encoder rank needs the same image count")


def packs_sequences(cfg: MockDataConfig) -> bool:
    return False


def notes(cfg: MockDataConfig, *, llm_dp: int) -> list:
    return []


def make_sample(index: int, *, cfg: MockDataConfig, spec: DataSpec, seq_length: int, seed: int,
                with_images: bool) -> dict:
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    has_image = with_images and torch.rand((), generator=g).item() >= cfg.text_only_fraction
    n_image = spec.image_tokens if has_image else 0
    # ids 1 .. vocab-2 (or 1 .. --mock-text-vocab); 0 is unused, one id marks images
    text_vocab = cfg.text_vocab or spec.vocab_size - 2
    start = int(torch.randint(text_vocab, (), generator=g))
    stride = int(torch.randint(1, 5, (), generator=g))
    text = 1 + (start + stride * torch.arange(seq_length + 1 - n_image)) % text_vocab
    full = torch.cat([text[:1], torch.full((n_image,), spec.image_token_id), text[1:]])
    labels = full[1:]
    return {
        "input_ids": full[:-1],
        "labels": labels,
        "loss_mask": (labels != spec.image_token_id).float(),
        "image": torch.randn(spec.image_shape, generator=g) if has_image else None,
    }


# The val split: samples of another seed, never among the training samples' (seed, index) pairs.
VAL_SEED_OFFSET = 7_919


def build_iterator(cfg: MockDataConfig, *, spec: DataSpec, rank: RankData,
                   to_model: Callable[[dict], dict], split: str = "train") -> LaneIterator:
    if split not in ("train", "val"):
        raise ValueError(f"mock data has splits train and val, not {split!r}")
    layout = rank_layout(role=LLM if rank.is_llm else ENCODER, dp_rank=rank.dp_rank,
                         micro_batch_size=rank.micro_batch_size, llm_dp=rank.llm_dp,
                         encoder_dp=rank.encoder_dp, num_microbatches=rank.num_microbatches)
    seed = rank.seed + (VAL_SEED_OFFSET if split == "val" else 0)
    make = partial(make_sample, cfg=cfg, spec=spec, seq_length=rank.seq_length, seed=seed,
                   with_images=rank.with_images)
    return LaneIterator(layout, make, lambda samples: to_model(stack_samples(samples)))
