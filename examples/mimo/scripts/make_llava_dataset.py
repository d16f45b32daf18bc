"""Write a small LLaVA-format dataset of generated shapes for the ``hf`` data provider.

    python examples/mimo/scripts/make_llava_dataset.py OUT [--samples N] [--blank-images]
        [--captions jsonl|parquet]

OUT/llava.json: a JSON list of {"id", "image", "conversations"}, the image a path relative to
OUT (images/NNNNNN.png), the conversation a description and questions about it whose answers
follow from the image alone (make_sample_energon_dataset.py's scenes); --text-fraction of them
are text-only chats without an image. --blank-images draws every image plain gray with the same
texts, the control for an experiment on whether the model uses the images. --captions also
writes the caption-pair form: captions.jsonl (image paths) or captions.parquet (images embedded
as a datasets Image column). OUT/tokenizer: a BPE tokenizer trained on the text, with the same
chat template and ``<image>`` id as the energon sample's.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
from typing import List

from make_sample_energon_dataset import caption, draw, question, scene, text_line, train_tokenizer

DESCRIBE = "describe the image."


def blank(size: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buf, format="PNG")
    return buf.getvalue()


def chat(s: dict, rng: random.Random) -> List[dict]:
    """A description, then one or two questions, in LLaVA's turn format."""
    asked = dict.fromkeys(question(s, rng) for _ in range(rng.randint(1, 2)))  # no repeats
    pairs = [(DESCRIBE, caption(s)), *asked]
    rng.shuffle(pairs)
    turns = []
    for i, (q, a) in enumerate(pairs):
        turns += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q},
                  {"from": "gpt", "value": a}]
    return turns


def text_chat(rng: random.Random) -> List[dict]:
    line = text_line(rng)
    head, tail = line.split(" is ", 1)
    return [{"from": "human", "value": f"what is {head}?"}, {"from": "gpt", "value": tail}]


def build(out: str, *, samples: int, seed: int, image_size: int, vocab_size: int,
          blank_images: bool, text_fraction: float, captions: str) -> None:
    if os.path.exists(out) and os.listdir(out):
        raise SystemExit(f"error: {out} exists and is not empty; give a new folder")
    os.makedirs(os.path.join(out, "images"))
    rng = random.Random(seed)
    records, pairs = [], []
    for i in range(samples):
        if rng.random() < text_fraction:
            records.append({"id": f"txt{i:06d}", "conversations": text_chat(rng)})
            continue
        s = scene(rng)
        name = f"images/{i:06d}.png"
        png = blank(image_size) if blank_images else draw(s, image_size)
        with open(os.path.join(out, name), "wb") as f:
            f.write(png)
        records.append({"id": f"img{i:06d}", "image": name, "conversations": chat(s, rng)})
        pairs.append({"image": name, "caption": caption(s), "png": png})
    with open(os.path.join(out, "llava.json"), "w") as f:
        json.dump(records, f, indent=1)
    if captions == "jsonl":
        with open(os.path.join(out, "captions.jsonl"), "w") as f:
            f.writelines(json.dumps({"image": p["image"], "caption": p["caption"]}) + "\n"
                         for p in pairs)
    elif captions == "parquet":
        from datasets import Dataset, Image, disable_progress_bars

        disable_progress_bars()
        table = Dataset.from_dict({"image": [{"bytes": p["png"], "path": None} for p in pairs],
                                   "caption": [p["caption"] for p in pairs]})
        table.cast_column("image", Image()).to_parquet(os.path.join(out, "captions.parquet"))
    corpus = [t["value"].replace("<image>", "") for r in records for t in r["conversations"]]
    train_tokenizer(os.path.join(out, "tokenizer"), corpus + [DESCRIBE], vocab_size)


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--image-size", type=int, default=32, help="Image side in pixels.")
    p.add_argument("--vocab-size", type=int, default=256,
                   help="Tokenizer vocabulary, <image> included (the models' --vocab-size).")
    p.add_argument("--blank-images", action="store_true",
                   help="Every image plain gray (the texts unchanged): the no-vision control.")
    p.add_argument("--text-fraction", type=float, default=0.1,
                   help="Share of text-only conversations.")
    p.add_argument("--captions", choices=("none", "jsonl", "parquet"), default="none",
                   help="Also write the caption pairs of the image samples in this form.")
    a = p.parse_args(argv)
    if a.samples < 1 or not 0 <= a.text_fraction <= 1:
        print("error: --samples must be >= 1 and --text-fraction in [0, 1]", file=sys.stderr)
        return 2
    build(a.out, samples=a.samples, seed=a.seed, image_size=a.image_size,
          vocab_size=a.vocab_size, blank_images=a.blank_images, text_fraction=a.text_fraction,
          captions=a.captions)
    print(f"wrote {a.out}: llava.json, images/, tokenizer"
          + (f", captions.{a.captions}" if a.captions != "none" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
