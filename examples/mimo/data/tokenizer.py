"""A tokenizer from local files only, through megatron-core's tokenizer abstraction."""

from __future__ import annotations

import os
from typing import List, Tuple

IMAGE_TOKEN = "<image>"
TOKENIZER_TYPES = ("HuggingFaceTokenizer",)


def check_tokenizer_path(path: str) -> None:
    """Cheap, before any process group: a folder that a Hugging Face tokenizer loads from."""
    if not os.path.isdir(path):
        raise ValueError(f"--tokenizer-model {path}: no such folder (a local Hugging Face "
                         f"tokenizer folder; nothing is downloaded)")
    if not any(os.path.isfile(os.path.join(path, f)) for f in
               ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")):
        raise ValueError(f"--tokenizer-model {path}: no tokenizer.json / tokenizer_config.json / "
                         f"vocab.json / tokenizer.model in it")


class Tokenizer:
    """The few operations the task encoder needs, with the ids the model must agree on."""

    def __init__(self, path: str):
        check_tokenizer_path(path)
        # Never the hub: a path that is not a tokenizer must fail here, not start a download.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        from megatron.core.tokenizers.text.libraries.huggingface_tokenizer import HuggingFaceTokenizer

        try:
            self._tok = HuggingFaceTokenizer(path)
        except (ValueError, OSError) as err:
            raise ValueError(f"--tokenizer-model {path}: cannot load it: "
                             f"{str(err).splitlines()[0][:300]}") from None
        self.image_token = IMAGE_TOKEN
        vocab = self._tok.tokenizer.get_vocab()
        if IMAGE_TOKEN not in vocab:
            raise ValueError(f"--tokenizer-model {path}: has no {IMAGE_TOKEN} token")
        self.image_token_id = vocab[IMAGE_TOKEN]
        self.vocab_size = self._tok.vocab_size
        self.eos_id = self._tok.eos_id
        self.pad_id = self._tok.pad_id if self._tok.pad_id is not None else self.eos_id
        if self.eos_id is None:
            raise ValueError(f"--tokenizer-model {path}: has no end-of-sequence token")
        if not self._tok.chat_template:
            raise ValueError(f"--tokenizer-model {path}: has no chat template (VQA and captioning "
                             f"prompts are built with it)")

    def text_to_ids(self, text: str) -> List[int]:
        return self._tok.tokenizer.encode(text, add_special_tokens=False)

    def chat_prompt(self, user: str) -> List[int]:
        """The user's turn and the assistant's opening, as the chat template writes them."""
        return self._template([{"role": "user", "content": user}], generation_prompt=True)

    def _template(self, messages: List[dict], generation_prompt: bool = False) -> List[int]:
        out = self._tok.tokenizer.apply_chat_template(messages, tokenize=True,
                                                      add_generation_prompt=generation_prompt)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def chat_ids(self, messages: List[dict]) -> Tuple[List[int], List[bool]]:
        """A conversation ([{role, content}]) as the chat template writes it, and which of its
        tokens are the assistant's. An assistant turn spans from where the template's generation
        prompt before it ends to where the conversation up to it ends, so whatever the template
        writes around a reply (its end of turn included) is found without parsing the template.
        A template that does not write a conversation as a continuation of its prefixes (e.g. one
        that drops earlier replies' reasoning) is a ValueError."""
        full = self._template(messages)
        target = [False] * len(full)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if i == 0:
                raise ValueError("the conversation starts with an assistant turn")
            head = self._template(messages[:i], generation_prompt=True)
            upto = self._template(messages[:i + 1])
            if full[:len(head)] != head or full[:len(upto)] != upto or len(head) > len(upto):
                raise ValueError("the chat template does not write this conversation as a "
                                 "continuation of its prefixes; assistant turns cannot be found")
            target[len(head):len(upto)] = [True] * (len(upto) - len(head))
        return full, target

    def check_model(self, *, vocab_size: int, image_token_id: int) -> None:
        if self.image_token_id != image_token_id:
            raise ValueError(f"image token id: the tokenizer's {IMAGE_TOKEN} is {self.image_token_id}, "
                             f"the model provider's is {image_token_id}; they must agree")
        if self.vocab_size > vocab_size:
            raise ValueError(f"the tokenizer has {self.vocab_size} tokens, more than the model's "
                             f"vocabulary of {vocab_size}")
