"""Data provider ``hf``: local Hugging Face data (hf_source.py), tokenized with a local tokenizer,
routed to lanes by lanes.py's rule, packed as energon's provider packs, resumable per rank.

Rows are read by index, so the order is ours, not a loader's: pass p over a split of n samples
is a permutation of its rows drawn from (order seed, p) for training, the rows in order for
validation, and global sample index g is the (g mod n)-th sample of pass g // n. Lane l's k-th
sample is the global index that ``lanes.sample_indices`` gives its k-th slot (blocks of
--micro-batch-size, lane after lane), so the lanes share out every pass and each sample is read
once per pass. An encoder rank runs the streams of the lanes it feeds exactly as their LLM ranks
do, so every image meets its placeholders. A lane takes its samples in order, leaves out those
that fail (--data-error-policy skip), and with --packing-buffer-size fills a buffer of that many
and packs it first fit (the task encoder's packing). Without packing or failures a lane's
micro-batch holds exactly the samples the mock provider's indices name.

Resume policy: each rank saves its lanes' next positions and the rows packed but not yet used
(as global indices), restored on the same layout, batch sizes and split. Otherwise the run
starts new passes ordered by --seed + the resumed iteration, and says so.
"""

from __future__ import annotations

import argparse
import os
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, Dict, List, Optional

import numpy as np

from examples.mimo.data.energon import ERROR_POLICIES, LaneBatches, load_tokenizer
from examples.mimo.data.hf_source import CONVERSATIONS, encode_row, parse_split, splits
from examples.mimo.data.lanes import LLM, rank_layout, sample_indices
from examples.mimo.data.routing import LaneSet, lane_set
from examples.mimo.data.tokenizer import TOKENIZER_TYPES
from examples.mimo.flags import FREE, QUIET, add_group, arg, derived, option, read
from examples.mimo.interfaces import DataSpec, DataStateMismatch, RankData

NAME = "hf"
# A two-turn chat: a template whose assistant turns cannot be found fails here, not per sample.
PROBE_CHAT = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
              {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]


@dataclass(frozen=True)
class HFDataConfig:
    # Paths are made absolute; a moved dataset is the same data, so no reason to refuse a resume.
    data_path: str = derived(FREE, arg(
        "--data-path", required=True,
        help="A save_to_disk folder, or a parquet/JSON/JSONL file or folder of them (read with "
             "the datasets library, offline)."))
    tokenizer_model: str = derived(FREE, arg(
        "--tokenizer-model", required=True,
        help="Local Hugging Face tokenizer folder (never downloaded); its chat template writes "
             "the conversations."))
    tokenizer_type: str = option("--tokenizer-type", FREE, choices=TOKENIZER_TYPES,
                                 default="HuggingFaceTokenizer")
    image_folder: Optional[str] = derived(FREE, arg(
        "--image-folder", default=None,
        help="Folder that relative image paths are read from (default: --data-path's folder)."),
        default=None)
    split: str = option(
        "--split", FREE, default="98,2",
        help="Weights of train, validation [, test] for data without its own train and "
             "validation (or test) splits; which rows go where is drawn by --seed.")
    packing_buffer_size: Optional[int] = option(
        "--packing-buffer-size", FREE, type=int, default=None,
        help="Pack several samples per sequence, choosing from this many.")
    data_error_policy: str = option(
        "--data-error-policy", FREE, choices=ERROR_POLICIES, default="skip",
        help="A sample that fails to decode (a missing or corrupt image): skip it (counted in "
             "the log) or fail.")
    data_cache_path: Optional[str] = derived(QUIET, arg(
        "--data-cache-path", default=None,
        help="Where the datasets library keeps the Arrow files it converts parquet/JSON files "
             "into (default: its own cache, HF_DATASETS_CACHE)."), default=None)


def add_args(parser: argparse.ArgumentParser) -> None:
    add_group(parser, "hf data provider", HFDataConfig)


def config_from_args(args: argparse.Namespace) -> HFDataConfig:
    def absolute(path):
        return None if path is None else os.path.abspath(path)

    cfg = HFDataConfig(**read(HFDataConfig, args), data_path=absolute(args.data_path),
                       image_folder=absolute(args.image_folder),
                       tokenizer_model=absolute(args.tokenizer_model),
                       data_cache_path=absolute(args.data_cache_path))
    parse_split(cfg.split)
    if cfg.packing_buffer_size is not None and cfg.packing_buffer_size < 2:
        raise ValueError(f"--packing-buffer-size {cfg.packing_buffer_size} must be >= 2")
    return cfg


def image_folder(cfg: HFDataConfig) -> str:
    if cfg.image_folder is not None:
        return cfg.image_folder
    return cfg.data_path if os.path.isdir(cfg.data_path) else os.path.dirname(cfg.data_path)


def packs_sequences(cfg: HFDataConfig) -> bool:
    return cfg.packing_buffer_size is not None


def validate(cfg: HFDataConfig, spec: DataSpec, seq_length: int, *, equal_images: str,
             llm_only: bool) -> None:
    schema, parts = splits(cfg.data_path, cfg.data_cache_path, parse_split(cfg.split), seed=0)
    if not len(parts["train"][1]):
        raise ValueError(f"--data-path {cfg.data_path}: its train split is empty (--split "
                         f"{cfg.split} of {len(parts['train'][0])} samples)")
    tok = load_tokenizer(cfg.tokenizer_model)
    tok.check_model(vocab_size=spec.vocab_size, image_token_id=spec.image_token_id)
    if schema.kind == CONVERSATIONS:
        try:
            tok.chat_ids(PROBE_CHAT)
        except Exception as err:  # jinja raises its own kinds
            raise ValueError(f"--tokenizer-model {cfg.tokenizer_model}: its chat template cannot "
                             f"write a conversation: {str(err).splitlines()[0][:200]}") from None
    if equal_images:
        # Text-only samples, packing and skipped samples all vary a micro-batch's image count.
        raise ValueError(f"--data-provider hf cannot feed {equal_images}: it needs the same image "
                         f"count on every encoder rank (use --encoder-dp <= --llm-dp, and equal "
                         f"DP sizes with --colocated)")


def notes(cfg: HFDataConfig, *, llm_dp: int) -> List[str]:
    schema, parts = splits(cfg.data_path, cfg.data_cache_path, parse_split(cfg.split), seed=0)
    (train, train_rows), (val, val_rows) = parts["train"], parts["val"]
    how = "its own splits" if val is not train else f"--split {cfg.split}, rows drawn by --seed"
    return [f"data: {cfg.data_path}: {schema.kind}, {len(train_rows)} train and {len(val_rows)} "
            f"validation samples ({how}); each pass reads every train sample once"]


class _Split:
    """One split read by global sample index (see the module doc); failures follow the policy."""

    def __init__(self, cfg: HFDataConfig, encoder, *, split: str, seed: int,
                 order_seed: Optional[int]):
        self.cfg, self.encoder, self.order_seed = cfg, encoder, order_seed
        self.schema, parts = splits(cfg.data_path, cfg.data_cache_path, parse_split(cfg.split),
                                    seed)
        dataset, self.rows = parts[split]
        if not len(self.rows):
            raise ValueError(f"--data-path {cfg.data_path}: its {split} split has no samples "
                             f"(--split {cfg.split})")
        # rows come back as Arrow, undecoded: images are decoded here, under the error policy
        self.table = dataset.with_format("arrow")
        self.folder = image_folder(cfg)
        self.fingerprint = zlib.crc32(self.rows.astype(np.int64).tobytes())
        self._orders: Dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, g: int) -> int:
        n, p = len(self.rows), g // len(self.rows)
        if self.order_seed is None:
            return int(self.rows[g % n])
        if p not in self._orders:
            if len(self._orders) >= 4:  # lanes drift apart a little; a dropped one is redrawn
                del self._orders[min(self._orders)]
            self._orders[p] = self.rows[np.random.default_rng([self.order_seed, p]).permutation(n)]
        return int(self._orders[p][g % n])

    def encode(self, g: int):
        """Sample g encoded, or None when it is left out (too long, or failed under skip)."""
        from megatron.energon import SkipSample

        from examples.mimo.data.task_encoder import count_dropped

        row = self.row(g)
        try:
            return encode_row(self.table[row].to_pylist()[0], self.schema, self.encoder,
                              key=str(row), restore_key=(g,), image_folder=self.folder)
        except SkipSample:  # the task encoder counted it
            return None
        except Exception as exc:  # decoding raises many kinds; the policy decides
            what = type(exc).__name__ + (f": {str(exc).splitlines()[0][:200]}" if str(exc) else "")
            where = f"{self.cfg.data_path} row {row}"
            if self.cfg.data_error_policy == "fail":
                raise RuntimeError(f"data: a sample failed ({what}) in {where} "
                                   f"(--data-error-policy fail)") from exc
            count_dropped()
            print(f"data: skipping a sample that failed ({what}) in {where}", flush=True)
            return None


class _Lane:
    """One lane's micro-batches: its samples in slot order, packed when asked, m rows each."""

    def __init__(self, lane: int, split: _Split, encoder, rank: RankData, packing: Optional[int]):
        self.lane, self.split, self.encoder, self.packing = lane, split, encoder, packing
        self.layout = rank_layout(role=LLM, dp_rank=lane, micro_batch_size=rank.micro_batch_size,
                                  llm_dp=rank.llm_dp, encoder_dp=rank.llm_dp, num_microbatches=1)
        self.cursor = 0  # the lane's next slot
        self.packed: Deque[list] = deque()  # rows of samples, not yet in a micro-batch

    def _sample(self):
        m = self.layout.size
        for _ in range(len(self.split)):
            g = sample_indices(self.layout, 0, self.cursor // m)[self.cursor % m]
            self.cursor += 1
            sample = self.split.encode(g)
            if sample is not None:
                return sample
        raise RuntimeError(f"data: {len(self.split)} samples in a row of lane {self.lane} were "
                           f"left out; nothing of {self.split.cfg.data_path} can be read")

    def next_batch(self) -> dict:
        m = self.layout.size
        while len(self.packed) < m:
            if self.packing is None:
                self.packed.append([self._sample()])
            else:
                self.packed.extend(self.encoder.select_samples_to_pack(
                    [self._sample() for _ in range(self.packing)]))
        rows = [self.packed.popleft() for _ in range(m)]
        return self.encoder.batch([self.encoder.pack_selected_samples(r) if self.packing else r[0]
                                   for r in rows])

    def state_dict(self) -> dict:
        return {"cursor": self.cursor,
                "rows": [[s.__restore_key__[0] for s in row] for row in self.packed]}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = state["cursor"]
        rows = ([s for s in map(self.split.encode, row) if s is not None] for row in state["rows"])
        self.packed = deque(row for row in rows if row)


class _Lanes:
    """The lanes a rank reads, offered as routing.LaneStreams offers energon's."""

    def __init__(self, lanes: LaneSet, split: _Split, encoder, rank: RankData,
                 packing: Optional[int]):
        self.split = split
        self.lanes = [_Lane(lane, split, encoder, rank, packing)
                      for lane in range(lanes.first, lanes.first + lanes.count)]
        self.first = lanes.first
        self.dropped = 0  # samples left out, all lanes

    def next(self, lane: int) -> dict:
        batch = self.lanes[lane - self.first].next_batch()
        self.dropped += batch.pop("dropped")
        return batch


class HFIterator(LaneBatches):
    """A split's micro-batches for this rank's lanes; the train split is resumable per rank,
    validation (in order, pass after pass, going on where the last evaluation stopped) is not
    checkpointed."""

    per_rank = True

    def __init__(self, cfg: HFDataConfig, *, spec: DataSpec, rank: RankData,
                 to_model: Callable[[dict], dict], split: str):
        self.cfg, self.spec, self.rank, self.to_model = cfg, spec, rank, to_model
        self.split_name = split
        self.lanes = lane_set(is_llm=rank.is_llm, dp_rank=rank.dp_rank, llm_dp=rank.llm_dp,
                              encoder_dp=rank.encoder_dp, workers=0)
        self.streams = self._streams(order_seed=rank.seed)

    def _streams(self, *, order_seed: int) -> _Lanes:
        encoder = self._encoder()
        source = _Split(self.cfg, encoder, split=self.split_name, seed=self.rank.seed,
                        order_seed=order_seed if self.split_name == "train" else None)
        return _Lanes(self.lanes, source, encoder, self.rank, self.cfg.packing_buffer_size)

    def _signature(self) -> dict:
        r = self.rank
        return {"lanes": [self.lanes.first, self.lanes.count, self.lanes.total],
                "micro_batch_size": r.micro_batch_size, "seq_length": r.seq_length,
                "with_images": r.with_images,
                "packing_buffer_size": self.cfg.packing_buffer_size or 0,
                "split": self.streams.split.fingerprint}

    def state_dict(self) -> dict:
        return {"signature": self._signature(), "order_seed": self.streams.split.order_seed,
                "lanes": [lane.state_dict() for lane in self.streams.lanes]}

    def load_state_dict(self, state: dict) -> None:
        if "signature" not in state:
            raise DataStateMismatch("the checkpoint's data state is not the hf provider's")
        saved, now = state["signature"], self._signature()
        if saved != now:
            changed = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in now.items()
                                if saved.get(k) != v)
            raise DataStateMismatch(f"hf data state cannot restore this rank's ({changed})")
        if state["order_seed"] != self.streams.split.order_seed:  # written after a restart
            self.streams = self._streams(order_seed=state["order_seed"])
        for lane, lane_state in zip(self.streams.lanes, state["lanes"]):
            lane.load_state_dict(lane_state)

    def restart(self, *, iteration: int) -> str:
        self.streams = self._streams(order_seed=self.rank.seed + iteration)
        return (f"data: the checkpoint's hf data state was written for other lanes, batch sizes "
                f"or split and cannot be restored here; starting new passes over "
                f"{self.cfg.data_path} ordered by seed {self.rank.seed} + iteration {iteration}")


def build_iterator(cfg: HFDataConfig, *, spec: DataSpec, rank: RankData,
                   to_model: Callable[[dict], dict], split: str = "train") -> HFIterator:
    if split not in ("train", "val"):
        raise ValueError(f"hf data has splits train and val, not {split!r}")
    return HFIterator(cfg, spec=spec, rank=rank, to_model=to_model, split=split)
