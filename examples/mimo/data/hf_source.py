"""Local Hugging Face data for the ``hf`` provider: its files, schema and splits, and one row as
an encoded sample.

Read with the ``datasets`` library, offline: a ``save_to_disk`` folder (a Dataset or a
DatasetDict), or parquet / JSON / JSONL files (one file, or a folder of them; the library
converts them once into Arrow files in its cache). Rows are read by index from the memory-mapped
Arrow data, so a pass can visit them in any order. The schema comes from the column names.
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

CONVERSATIONS, CAPTIONS, TEXT = "LLaVA conversations", "caption pairs", "text"
CHAT_COLUMNS = ("conversations", "messages")
IMAGE_COLUMNS = ("image", "images")
CAPTION_COLUMNS = ("caption", "text")
FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}
VAL_SPLITS = ("validation", "test")  # a DatasetDict's own validation split, first found


@dataclass(frozen=True)
class Schema:
    kind: str  # CONVERSATIONS, CAPTIONS or TEXT
    text: str  # the column of chats, captions or text
    image: Optional[str]  # the image column (an Image feature or paths), if any


def _datasets():
    # Offline before the library is imported (it reads the variables then), and after, for a
    # process that imported it earlier.
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    datasets.config.HF_HUB_OFFLINE = True
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _data_files(path: str) -> Tuple[str, List[str]]:
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if os.path.splitext(f)[1] in FORMATS)
    kinds = {FORMATS.get(os.path.splitext(f)[1]) for f in files}
    if not files or None in kinds:
        raise ValueError(f"--data-path {path}: neither a save_to_disk folder (dataset_info.json or "
                         f"dataset_dict.json) nor .parquet/.json/.jsonl files")
    if len(kinds) > 1:
        raise ValueError(f"--data-path {path}: mixes parquet and JSON files; give one kind")
    return kinds.pop(), files


@functools.lru_cache(maxsize=4)
def open_dataset(path: str, cache_dir: Optional[str] = None) -> Dict[str, object]:
    """{split name: datasets.Dataset}; data that has no splits of its own is "train"."""
    if not os.path.exists(path):
        raise ValueError(f"--data-path {path}: no such file or folder")
    saved = os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f))
                                        for f in ("dataset_info.json", "dataset_dict.json"))
    kind, files = (None, None) if saved else _data_files(path)
    ds = _datasets()
    try:
        loaded = (ds.load_from_disk(path) if saved else
                  ds.load_dataset(kind, data_files=files, cache_dir=cache_dir))
    except Exception as err:  # the library raises many kinds; one line, naming the flag
        raise ValueError(f"--data-path {path}: the datasets library cannot read it: "
                         f"{_one_line(err)}") from None
    return dict(loaded) if isinstance(loaded, ds.DatasetDict) else {"train": loaded}


def _one_line(err: BaseException) -> str:
    """The error and, when it wraps another (the library's "An error occurred while generating
    the dataset"), the innermost cause, which says what is wrong with the file."""
    root = err
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    lines = [f"{type(e).__name__}: {str(e).strip()}".splitlines()[0][:200]
             for e in dict.fromkeys((err, root))]
    return " <- ".join(lines)


def detect_schema(columns: Sequence[str], path: str) -> Schema:
    def first(names):
        return next((c for c in names if c in columns), None)

    chat, image, caption = first(CHAT_COLUMNS), first(IMAGE_COLUMNS), first(CAPTION_COLUMNS)
    if chat:
        return Schema(CONVERSATIONS, chat, image)
    if image and caption:
        return Schema(CAPTIONS, caption, image)
    if image or caption == "caption":
        missing = "'caption' or 'text'" if image else "'image'"
        raise ValueError(f"--data-path {path}: caption pairs need a column {missing}; its columns "
                         f"are {list(columns)}")
    if caption == "text":
        return Schema(TEXT, "text", None)
    raise ValueError(f"--data-path {path}: no known schema in its columns {list(columns)}: "
                     f"'conversations' (LLaVA chats, with 'image'), 'image' with 'caption' or "
                     f"'text' (caption pairs), or 'text' (text only)")


def parse_split(value: str) -> Tuple[float, ...]:
    """--split: Megatron's weights of train, validation [, test], e.g. "98,2" or "969,30,1"."""
    try:
        weights = tuple(float(w) for w in value.replace("/", ",").split(","))
    except ValueError:
        weights = ()
    if not 1 <= len(weights) <= 3 or min(weights) < 0 or weights[0] <= 0:
        raise ValueError(f"--split {value}: give 1 to 3 non-negative weights of train, "
                         f"validation, test (e.g. 98,2), train above 0")
    return weights


def split_sizes(n: int, weights: Tuple[float, ...]) -> Tuple[int, int]:
    """(train, validation) samples of n: boundaries at the rounded cumulative shares."""
    bounds = [round(n * sum(weights[:i + 1]) / sum(weights)) for i in range(2)]
    return bounds[0], bounds[1] - bounds[0]


def splits(path: str, cache_dir: Optional[str], weights: Tuple[float, ...],
           seed: int) -> Tuple[Schema, Dict[str, Tuple[object, np.ndarray]]]:
    """The schema and {"train"|"val": (dataset, its rows)}: a DatasetDict's own train and
    validation (or test) splits, else the data cut by --split weights, rows drawn by ``seed``."""
    found = open_dataset(path, cache_dir)
    own_val = next((name for name in VAL_SPLITS if name in found), None)
    if "train" not in found and len(found) != 1:
        raise ValueError(f"--data-path {path}: its splits are {sorted(found)}; none is 'train'")
    train = found["train"] if "train" in found else next(iter(found.values()))
    schema = detect_schema(train.column_names, path)
    if own_val is not None and "train" in found:
        val = found[own_val]
        if detect_schema(val.column_names, path) != schema:
            raise ValueError(f"--data-path {path}: its {own_val} split's columns "
                             f"{val.column_names} differ from train's {train.column_names}")
        return schema, {"train": (train, np.arange(len(train))), "val": (val, np.arange(len(val)))}
    n_train, n_val = split_sizes(len(train), weights)
    order = np.random.default_rng(seed).permutation(len(train))
    return schema, {"train": (train, np.sort(order[:n_train])),
                    "val": (train, np.sort(order[n_train:n_train + n_val]))}


def decode_image(value, folder: str) -> torch.Tensor:
    """An Image feature's bytes or path, or a path string -> [3, H, W] float in [0, 1] (what
    energon's torchrgb decode gives the task encoder)."""
    from PIL import Image

    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    else:
        data, path = None, value
    if data is None:
        if not path:
            raise ValueError("the image is empty (no bytes, no path)")
        with open(path if os.path.isabs(path) else os.path.join(folder, path), "rb") as f:
            data = f.read()
    with Image.open(io.BytesIO(data)) as img:
        rgb = np.array(img.convert("RGB"))
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 255


def encode_row(row: dict, schema: Schema, encoder, *, key: str, restore_key: tuple,
               image_folder: str):
    """One row -> the task encoder's EncodedSample (raises what decoding or encoding raises)."""
    from megatron.energon import CaptioningSample, TextSample

    values = row.get(schema.image) if schema.image and encoder.with_images else None
    values = [v for v in (values if isinstance(values, list) else [values]) if v is not None]
    images = [decode_image(v, image_folder) for v in values]
    meta = {"__key__": key, "__restore_key__": restore_key, "__subflavors__": None,
            "__sources__": None}
    if schema.kind == TEXT:
        return encoder.encode_sample(TextSample(**meta, text=row[schema.text]))
    if schema.kind == CAPTIONS:
        if encoder.with_images and len(images) != 1:
            raise ValueError(f"a caption pair has {len(images)} images, not one")
        return encoder.encode_sample(CaptioningSample(**meta, image=images[0] if images else None,
                                                      caption=row[schema.text]))
    messages = []
    for turn in row[schema.text] or ():
        role = turn.get("from") or turn.get("role")
        if role not in ROLES:
            raise ValueError(f"a turn's role {role!r} is none of {sorted(ROLES)}")
        content = turn.get("value") or turn.get("content") or ""
        messages.append({"role": ROLES[role], "content": content})
    if not messages:
        raise ValueError("an empty conversation")
    return encoder.encode_conversation(key=key, restore_key=restore_key, messages=messages,
                                       images=images)
