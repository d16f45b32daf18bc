"""Data provider ``energon``: a prepared megatron-energon dataset or blend (metadataset YAML),
tokenized with a local tokenizer, routed to lanes (routing.py), resumable per rank.

Each LLM rank reads its own lane; an encoder rank reads the lanes it feeds through one loader
and runs them as one forward (merged by schema, merge.py). Both sides read the same lanes'
samples in the same order, so every image meets its placeholders.

Resume policy: the loader state is per rank and restored when the checkpoint was written by the
same layout (grid, --num-workers, batch sizes). On another layout energon cannot map it; the
run then starts a new pass over the data whose shuffling is seeded by --seed and the resumed
iteration, and says so.
"""

from __future__ import annotations

import argparse
import functools
import os
from dataclasses import dataclass
from typing import Callable, List, Optional

from examples.mimo.data.merge import LANE_BATCH, merge
from examples.mimo.data.routing import LaneStreams, lane_set
from examples.mimo.data.tokenizer import TOKENIZER_TYPES
from examples.mimo.flags import FREE, add_group, arg, derived, option, read
from examples.mimo.interfaces import DataSpec, RankData

NAME = "energon"
ERROR_POLICIES = ("skip", "fail")


@dataclass(frozen=True)
class EnergonDataConfig:
    # Paths are made absolute (the loader's workers may run elsewhere); a moved dataset is the
    # same data, so neither is a reason to refuse a resume.
    data_path: str = derived(FREE, arg(
        "--data-path", required=True,
        help="A prepared energon dataset folder or a metadataset YAML (a blend)."))
    tokenizer_model: str = derived(FREE, arg(
        "--tokenizer-model", required=True,
        help="Local Hugging Face tokenizer folder (never downloaded)."))
    tokenizer_type: str = option("--tokenizer-type", FREE, choices=TOKENIZER_TYPES,
                                 default="HuggingFaceTokenizer")
    num_workers: int = option(
        "--num-workers", FREE, type=int, default=2,
        help="Loader worker processes per LLM lane (0: load in the training process).")
    packing_buffer_size: Optional[int] = option(
        "--packing-buffer-size", FREE, type=int, default=None,
        help="Pack several samples per sequence, choosing from this many.")
    shuffle_buffer_size: int = option(
        "--shuffle-buffer-size", FREE, type=int, default=0,
        help="Samples shuffled in a buffer per loader worker (0: none; the order then comes from "
             "energon's per-pass shuffle of shard slices of --max-samples-per-sequence). energon "
             "fills the buffer across the end of a pass, so each pass then reads about this many "
             "samples per worker of the next one twice and misses as many (docs/data.md: "
             "Epochs).")
    max_samples_per_sequence: Optional[int] = option(
        "--max-samples-per-sequence", FREE, type=int, default=100,
        help="Samples read in a row from one shard before switching (energon).")
    data_error_policy: str = option(
        "--data-error-policy", FREE, choices=ERROR_POLICIES, default="skip",
        help="A sample that fails to decode: skip it (counted in the log) or fail.")
    lane_routing: bool = option(
        "--no-lane-routing", FREE, dest="lane_routing", action="store_false",
        help="One loader per lane on encoder ranks (for comparison; same samples).")


def add_args(parser: argparse.ArgumentParser) -> None:
    add_group(parser, "energon data provider", EnergonDataConfig)


def config_from_args(args: argparse.Namespace) -> EnergonDataConfig:
    cfg = EnergonDataConfig(**read(EnergonDataConfig, args),
                            data_path=os.path.abspath(args.data_path),
                            tokenizer_model=os.path.abspath(args.tokenizer_model))
    if cfg.num_workers < 0:
        raise ValueError(f"--num-workers {cfg.num_workers} must be >= 0")
    if cfg.packing_buffer_size is not None and cfg.packing_buffer_size < 2:
        raise ValueError(f"--packing-buffer-size {cfg.packing_buffer_size} must be >= 2")
    if cfg.shuffle_buffer_size < 0:
        raise ValueError(f"--shuffle-buffer-size {cfg.shuffle_buffer_size} must be >= 0")
    return cfg


def check_dataset(path: str) -> None:
    """The path, its energon metadata and, for a blend, every dataset it names."""
    if not os.path.exists(path):
        raise ValueError(f"--data-path {path}: no such file or folder")
    if os.path.isdir(path) and not os.path.isdir(os.path.join(path, ".nv-meta")):
        raise ValueError(f"--data-path {path}: not a prepared energon dataset (no .nv-meta; run "
                         f"`energon prepare {path}`)")
    if os.path.isfile(path):
        import yaml

        with open(path) as f:
            meta = yaml.safe_load(f)
        for split in (meta or {}).get("splits", {}).values():
            for entry in (split or {}).get("blend", []):
                sub = os.path.join(os.path.dirname(path), str(entry.get("path", "")))
                if not os.path.isdir(os.path.join(sub, ".nv-meta")) and not os.path.isfile(sub):
                    raise ValueError(f"--data-path {path}: blend entry {entry.get('path')!r} is not "
                                     f"a prepared energon dataset ({sub})")
    from megatron.energon import WorkerConfig, load_dataset

    try:
        # the train split too: an empty one (too few shards for the split ratios) is found here,
        # not in every rank's loader
        load_dataset(path).get_datasets(training=True, split_part="train",
                                        worker_config=WorkerConfig(rank=0, world_size=1,
                                                                   num_workers=0))
    except Exception as err:  # energon raises many kinds; one line, naming the flag
        raise ValueError(f"--data-path {path}: energon cannot read it: "
                         f"{str(err).splitlines()[0][:300]}") from None


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    from examples.mimo.data.tokenizer import Tokenizer

    return Tokenizer(path)


def packs_sequences(cfg: EnergonDataConfig) -> bool:
    return cfg.packing_buffer_size is not None


def validate(cfg: EnergonDataConfig, spec: DataSpec, seq_length: int, *, equal_images: str,
             llm_only: bool) -> None:
    check_dataset(cfg.data_path)
    load_tokenizer(cfg.tokenizer_model).check_model(vocab_size=spec.vocab_size,
                                                    image_token_id=spec.image_token_id)
    if equal_images:
        # A blend varies image counts per sample, so no layout that needs them equal can take it.
        raise ValueError(f"--data-provider energon cannot feed {equal_images}: it needs the same "
                         f"image count on every encoder rank (use --encoder-dp <= --llm-dp, and "
                         f"equal DP sizes with --colocated)")


def notes(cfg: EnergonDataConfig, *, llm_dp: int) -> List[str]:
    """Start-up lines for the log (rank 0): what a shuffle buffer does to a pass, in numbers."""
    if not cfg.shuffle_buffer_size:
        return []
    loaders = llm_dp * max(cfg.num_workers, 1)
    return [f"data: --shuffle-buffer-size {cfg.shuffle_buffer_size} over {loaders} loader "
            f"worker(s) ({llm_dp} lane(s) x {max(cfg.num_workers, 1)}): each pass over the split "
            f"reads up to {cfg.shuffle_buffer_size * loaders} samples of the next pass and misses "
            f"as many (energon shuffles across the repeat); --shuffle-buffer-size 0 reads every "
            f"sample once per pass"]


class _ErrorHandler:
    """energon's per-worker error handler: skip (count, one line) or fail."""

    def __init__(self, policy: str):
        self.policy = policy

    def __call__(self, exc: Exception, sample, sources=None) -> None:
        from examples.mimo.data.task_encoder import count_dropped

        if not sources:  # a raw webdataset sample carries its own
            parts = getattr(sample, "data", None) or ()
            sources = [src for p in parts if isinstance(p, dict) for src in p.get("__sources__", ())]
        where = "; ".join(f"{os.path.join(str(s.dataset_path), s.shard_name)}: {', '.join(s.file_names)}"
                          for s in sources[:2]) or "unknown source"
        what = f"{type(exc).__name__}{': ' + str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if self.policy == "fail":
            raise RuntimeError(f"data: a sample failed ({what}) in {where} "
                               f"(--data-error-policy fail)") from exc
        count_dropped()
        print(f"data: skipping a sample that failed ({what}) in {where}", flush=True)


class LaneBatches:
    """This rank's lanes' batches, merged, as model inputs; subclasses make the loaders (the
    energon provider's here, the hf provider's in hf.py)."""

    def __init__(self, cfg: EnergonDataConfig, *, spec: DataSpec, rank: RankData,
                 to_model: Callable[[dict], dict]):
        self.cfg, self.spec, self.rank, self.to_model = cfg, spec, rank, to_model
        self.lanes = lane_set(is_llm=rank.is_llm, dp_rank=rank.dp_rank, llm_dp=rank.llm_dp,
                              encoder_dp=rank.encoder_dp, workers=cfg.num_workers)
        self.streams = self._streams(seed_offset=rank.seed)

    def _encoder(self):
        from examples.mimo.data.task_encoder import MimoTaskEncoder

        return MimoTaskEncoder(tokenizer=load_tokenizer(self.cfg.tokenizer_model), spec=self.spec,
                               seq_length=self.rank.seq_length, with_images=self.rank.with_images)

    def __iter__(self):
        return self

    def next_batch(self) -> dict:
        """This rank's next micro-batch before ``to_model``: its lanes merged in lane order."""
        parts = [self.streams.next(lane) for lane in range(self.lanes.first,
                                                           self.lanes.first + self.lanes.count)]
        return merge(parts, LANE_BATCH) if len(parts) > 1 else parts[0]

    def __next__(self) -> dict:
        from examples.mimo.data.task_encoder import packed_sequence_kwargs, position_ids

        batch = self.next_batch()
        if self.rank.is_llm:
            seq = self.rank.seq_length
            batch["position_ids"] = position_ids(batch["seqlens"], seq)
            # Every micro-batch of a packing run takes the THD layout, also one whose rows hold a
            # sample each, so activation shapes and kernels do not change from step to step.
            if self.cfg.packing_buffer_size is not None:
                batch["packing_kwargs"] = packed_sequence_kwargs(batch["seqlens"], seq)
        return self.to_model(batch)

    @property
    def dropped(self) -> int:
        return self.streams.dropped


class EnergonIterator(LaneBatches):
    """The train split: endless (energon repeats it), shuffled, resumable per rank."""

    per_rank = True

    def _streams(self, *, seed_offset: int) -> LaneStreams:
        from megatron.energon import get_savable_loader, get_train_dataset

        encoder, handler = self._encoder(), _ErrorHandler(self.cfg.data_error_policy)

        def make_loader(worker_config):
            worker_config.seed_offset = seed_offset
            worker_config.global_error_handler = handler
            dataset = get_train_dataset(
                self.cfg.data_path, worker_config=worker_config,
                batch_size=self.rank.micro_batch_size, task_encoder=encoder,
                packing_buffer_size=self.cfg.packing_buffer_size,
                shuffle_buffer_size=self.cfg.shuffle_buffer_size or None,
                max_samples_per_sequence=self.cfg.max_samples_per_sequence)
            return get_savable_loader(dataset)

        return LaneStreams(self.lanes, make_loader, routed=self.cfg.lane_routing)

    def state_dict(self) -> dict:
        return self.streams.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.streams.load_state_dict(state)

    def restart(self, *, iteration: int) -> str:
        self.streams = self._streams(seed_offset=self.rank.seed + iteration)
        return (f"data: the checkpoint's energon loader state was written by another layout and "
                f"cannot be restored here; starting a new pass over {self.cfg.data_path} "
                f"shuffled with seed {self.rank.seed} + iteration {iteration}")


class EnergonValIterator(LaneBatches):
    """The val split: unshuffled passes, one after another, routed like training (encoder and
    LLM ranks read the same lanes). Like Megatron's validation iterator, each evaluation goes on
    where the last one stopped; not checkpointed."""

    def _streams(self, *, seed_offset: int) -> LaneStreams:
        from megatron.energon import get_loader, get_val_dataset

        encoder, handler = self._encoder(), _ErrorHandler(self.cfg.data_error_policy)

        def make_loader(worker_config):
            worker_config.global_error_handler = handler
            # drop_last: every micro-batch has micro-batch-size rows, as in training
            dataset = get_val_dataset(
                self.cfg.data_path, worker_config=worker_config,
                batch_size=self.rank.micro_batch_size, batch_drop_last=True, task_encoder=encoder,
                packing_buffer_size=self.cfg.packing_buffer_size)
            return get_loader(dataset)

        return LaneStreams(self.lanes, make_loader, routed=self.cfg.lane_routing, finite=True)


def build_iterator(cfg: EnergonDataConfig, *, spec: DataSpec, rank: RankData,
                   to_model: Callable[[dict], dict], split: str = "train") -> LaneBatches:
    kind = {"train": EnergonIterator, "val": EnergonValIterator}[split]
    return kind(cfg, spec=spec, rank=rank, to_model=to_model)
