"""Build a small, real megatron-energon dataset and a tokenizer for it, from generated data.

    python examples/mimo/scripts/make_sample_energon_dataset.py OUT [--samples N] [--seed S]

OUT/captions, OUT/vqa: webdataset shards of PNG images of simple shapes, with captions and VQA
answers that follow from the image alone (colour, shape, count, position): a model predicts them
only by looking. OUT/text: a text-only corpus (counting sentences). Each is prepared with energon's
own `energon prepare` (train/val split, dataset.yaml). OUT/blend.yaml blends the three for both
splits. OUT/tokenizer: a BPE tokenizer trained on all the text with the `tokenizers` library,
saved as a Hugging Face tokenizer with a chat template; `<image>` is its last id, which is where
both model providers put their image token by default.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tarfile
from typing import Iterator, List, Tuple

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
           "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
PLACES = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75)}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_TOKEN = "<image>"
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}</s>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SAMPLES_PER_SHARD = 64


def scene(rng: random.Random) -> dict:
    return {"colour": rng.choice(list(COLOURS)), "shape": rng.choice(SHAPES),
            "count": rng.randint(1, 3), "place": rng.choice(list(PLACES))}


def draw(s: dict, size: int, aspect: float = 1.0) -> bytes:
    """A size-high image, aspect x size wide."""
    from PIL import Image, ImageDraw

    w = round(size * aspect)
    img = Image.new("RGB", (w, size), (245, 245, 245))
    d = ImageDraw.Draw(img)
    cx, cy = PLACES[s["place"]]
    r = min(w, size) // 10
    # several shapes sit in a short row (or column) around the named place
    horizontal = s["place"] in ("top", "bottom")
    for i in range(s["count"]):
        off = (i - (s["count"] - 1) / 2) * 2.4 * r
        x = cx * w + (off if horizontal else 0)
        y = cy * size + (0 if horizontal else off)
        box = [x - r, y - r, x + r, y + r]
        colour = COLOURS[s["colour"]]
        if s["shape"] == "circle":
            d.ellipse(box, fill=colour)
        elif s["shape"] == "square":
            d.rectangle(box, fill=colour)
        else:
            d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def caption(s: dict) -> str:
    noun = s["shape"] + ("s" if s["count"] > 1 else "")
    return f"{NUMBERS[s['count']]} {s['colour']} {noun} at the {s['place']}."


def question(s: dict, rng: random.Random) -> Tuple[str, str]:
    kind = rng.choice(("colour", "shape", "count", "place"))
    if kind == "colour":
        return "what colour are the shapes?", s["colour"]
    if kind == "shape":
        return "what shape do you see?", s["shape"]
    if kind == "count":
        return "how many shapes are there?", NUMBERS[s["count"]]
    return "where are the shapes?", f"at the {s['place']}"


def text_line(rng: random.Random) -> str:
    a, b = rng.randint(0, 4), rng.randint(0, 4)
    start = rng.randint(0, 5)
    counting = " ".join(NUMBERS[start:start + 4])
    return f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}. counting: {counting}."


def write_shards(folder: str, records: Iterator[dict]) -> List[str]:
    """webdataset tar shards: one member per field, named KEY.EXT."""
    os.makedirs(folder, exist_ok=True)
    names: List[str] = []
    tar = None
    for i, rec in enumerate(records):
        if i % SAMPLES_PER_SHARD == 0:
            if tar:
                tar.close()
            names.append(f"shard_{len(names):04d}.tar")
            tar = tarfile.open(os.path.join(folder, names[-1]), "w")
        for ext, data in rec.items():
            if ext == "__key__":
                continue
            raw = data if isinstance(data, bytes) else data.encode()
            info = tarfile.TarInfo(f"{rec['__key__']}.{ext}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    if tar:
        tar.close()
    return names


def prepare(folder: str, sample_type: str, field_map: dict) -> None:
    """energon's own preparation (index, split, dataset.yaml), run in this process."""
    from megatron.energon.tools.prepare import command

    command.main([folder, "--non-interactive", "--split-ratio", "0.8,0.2,0", "--num-workers", "1",
                  "--sample-type", sample_type, "--field-map", json.dumps(field_map),
                  "--force-overwrite"], standalone_mode=False)


def train_tokenizer(out: str, corpus: List[str], vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    # One id is kept for <image>, the last one.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=SPECIAL,
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    # A small corpus may not fill the vocabulary: unused tokens put <image> at vocab_size - 1.
    filler = [f"<unused_{i}>" for i in range(vocab_size - 1 - tok.get_vocab_size())]
    tok.add_special_tokens(filler + [IMAGE_TOKEN])
    assert tok.token_to_id(IMAGE_TOKEN) == vocab_size - 1
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>", unk_token="<unk>",
                                 additional_special_tokens=[IMAGE_TOKEN, "<|user|>", "<|assistant|>"])
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out)


BLEND = """\
# Blend of the three datasets for both splits (energon metadataset); paths are relative to this file.
__module__: megatron.energon
__class__: MetadatasetV2
splits:
  train:
    blend:
      - {{weight: {cap}, path: captions}}
      - {{weight: {vqa}, path: vqa}}
      - {{weight: {text}, path: text}}
  val:
    blend:
      - {{weight: {cap}, path: captions}}
      - {{weight: {vqa}, path: vqa}}
      - {{weight: {text}, path: text}}
"""


def build(out: str, *, samples: int, seed: int, image_size: int, vocab_size: int,
          weights: Tuple[float, float, float], aspects: Tuple[float, ...] = (1.0,)) -> None:
    if os.path.exists(out) and os.listdir(out):
        raise SystemExit(f"error: {out} exists and is not empty; give a new folder")
    rng = random.Random(seed)
    scenes = [scene(rng) for _ in range(2 * samples)]
    questions = [question(s, rng) for s in scenes[samples:]]
    texts = [text_line(rng) for _ in range(samples)]
    write_shards(os.path.join(out, "captions"),
                 ({"__key__": f"cap{i:06d}", "png": draw(s, image_size, aspects[i % len(aspects)]),
                   "txt": caption(s)}
                  for i, s in enumerate(scenes[:samples])))
    write_shards(os.path.join(out, "vqa"),
                 ({"__key__": f"vqa{i:06d}", "png": draw(s, image_size, aspects[i % len(aspects)]),
                   "json": json.dumps({"question": q, "answers": [a]})}
                  for i, (s, (q, a)) in enumerate(zip(scenes[samples:], questions))))
    write_shards(os.path.join(out, "text"),
                 ({"__key__": f"txt{i:06d}", "txt": t} for i, t in enumerate(texts)))
    prepare(os.path.join(out, "captions"), "CaptioningSample", {"image": "png", "caption": "txt"})
    prepare(os.path.join(out, "vqa"), "VQASample",
            {"image": "png", "context": "json[question]", "answers": "json[answers]"})
    prepare(os.path.join(out, "text"), "TextSample", {"text": "txt"})
    with open(os.path.join(out, "blend.yaml"), "w") as f:
        f.write(BLEND.format(cap=weights[0], vqa=weights[1], text=weights[2]))
    corpus = ([caption(s) for s in scenes[:samples]] + [f"{q} {a}" for q, a in questions] + texts
              + ["describe the image."])
    train_tokenizer(os.path.join(out, "tokenizer"), corpus, vocab_size)


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--samples", type=int, default=512, help="Samples per dataset.")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--image-size", type=int, default=32, help="Stored image side in pixels.")
    p.add_argument("--vocab-size", type=int, default=256,
                   help="Tokenizer vocabulary, <image> included (the models' --vocab-size).")
    p.add_argument("--weights", default="0.35,0.35,0.3",
                   help="Blend weights of captions, VQA and text.")
    p.add_argument("--aspect-ratios", default="1",
                   help="Image width/height ratios, taken in turn (e.g. 1,2,0.5 for "
                        "--dynamic-resolution); heights are --image-size.")
    a = p.parse_args(argv)
    try:
        aspects = tuple(float(x) for x in a.aspect_ratios.split(","))
    except ValueError:
        aspects = ()
    if not aspects or min(aspects) <= 0:
        print(f"error: --aspect-ratios {a.aspect_ratios} must be positive numbers", file=sys.stderr)
        return 2
    weights = tuple(float(w) for w in a.weights.split(","))
    if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
        print(f"error: --weights {a.weights} must be three non-negative numbers", file=sys.stderr)
        return 2
    build(a.out, samples=a.samples, seed=a.seed, image_size=a.image_size,
          vocab_size=a.vocab_size, weights=weights, aspects=aspects)
    print(f"wrote {a.out}: captions, vqa, text (train/val), blend.yaml, tokenizer")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
