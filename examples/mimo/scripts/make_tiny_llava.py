"""Write a tiny random Hugging Face ``llava`` folder: the stand-in for a released LLaVA checkpoint
on a machine without the Hub (the LLaVA recipe, run_llava_recipe.sh, starts from it).

    python examples/mimo/scripts/make_tiny_llava.py OUT [--family llama-clip|qwen3-siglip]
        [--tokenizer DIR] [--seed N]

transformers builds ``LlavaForConditionalGeneration`` itself and saves it with save_pretrained
(safetensors and config.json), at the llava provider's tiny-cpu shapes: a 2-layer language model
of width 64 (4 heads in 2 K/V groups) and a 3-layer vision tower of width 32 on 32x32 images of
8x8 patches. Families: ``llama-clip`` (Llama + CLIP, LLaVA's default features: CLIP's class
token dropped) and ``qwen3-siglip`` (Qwen3 + SigLIP, all the tower's tokens: ``full``).

The vocabulary and the image token come from the tokenizer: ``vocab_size`` is its length and
``image_token_index`` its ``<image>`` id (the hf data provider refuses a model whose image token
differs from the tokenizer's, or whose vocabulary is smaller), and its files are saved into OUT
as a release ships them. Without --tokenizer: 256 and 255, which make_llava_dataset.py's
tokenizer (its default --vocab-size) has.

Weights: every matrix N(0, 1/fan-in), norms 1 + N(0, 0.1^2), biases N(0, 0.02^2), drawn from
--seed (transformers' own initialisation, std 0.02 everywhere, gives near-uniform logits
whatever the weights, so a wrong mapping of a tensor would go unnoticed).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Tuple

IMAGE_TOKEN = "<image>"
# the llava provider's tiny-cpu preset (model_providers/llava.py), in transformers' names
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-5,
            tie_word_embeddings=False)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=32, patch_size=8, layer_norm_eps=1e-5)
# family: (text model_type, vision model_type, llava config fields)
FAMILIES = {
    "llama-clip": ("llama", "clip_vision_model", {"vision_feature_select_strategy": "default"}),
    "qwen3-siglip": ("qwen3", "siglip_vision_model", {"vision_feature_select_strategy": "full"}),
}
DEFAULT_VOCAB = 256


def tokenizer_ids(path: str) -> Tuple[int, int]:
    """(vocabulary size, <image> id) of a local tokenizer folder."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    image = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if image is None or image == tok.unk_token_id:
        raise ValueError(f"--tokenizer {path} has no {IMAGE_TOKEN} token")
    return len(tok), image


def init_weights(model, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.dim() >= 2:
                p.copy_(noise / (p[0].numel() ** 0.5))  # fan-in: one output's inputs
            elif name.endswith("bias"):
                p.copy_(0.02 * noise)
            else:  # a norm's scale (CLIP's class embedding too: unit-scale entries)
                p.copy_(1 + 0.1 * noise)


def build(out: str, *, family: str = "llama-clip", tokenizer: Optional[str] = None,
          seed: int = 0) -> str:
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.utils import logging

    logging.disable_progress_bar()
    if os.path.exists(out) and os.listdir(out):
        raise SystemExit(f"error: {out} exists and is not empty; give a new folder")
    vocab, image = tokenizer_ids(tokenizer) if tokenizer else (DEFAULT_VOCAB, DEFAULT_VOCAB - 1)
    text_type, vision_type, top = FAMILIES[family]
    config = LlavaConfig(text_config={"model_type": text_type, **TEXT, "vocab_size": vocab},
                         vision_config={"model_type": vision_type, **VISION},
                         image_token_index=image, tie_word_embeddings=False, **top)
    model = LlavaForConditionalGeneration._from_config(config, dtype=torch.float32)
    init_weights(model, seed)
    model.save_pretrained(out)
    if tokenizer:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
    return out


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--family", choices=sorted(FAMILIES), default="llama-clip")
    p.add_argument("--tokenizer", default=None,
                   help="A local tokenizer folder (with <image>): the model's vocabulary and "
                        "image token, and copied into OUT (default: 256 tokens, <image> 255).")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        build(a.out, family=a.family, tokenizer=a.tokenizer, seed=a.seed)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}: a tiny random llava ({a.family})"
          + (f", with the tokenizer of {a.tokenizer}" if a.tokenizer else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
