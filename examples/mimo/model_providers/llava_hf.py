"""The LLaVA provider and Hugging Face transformers' models of the same family: ``llava``
(LlavaForConditionalGeneration: a vision tower, the projector, a language model), the language
models ``llama``, ``qwen2`` and ``qwen3``, and the vision towers ``clip``/``clip_vision_model``
and ``siglip``/``siglip_vision_model``.

As nemotron_hf.py: ``sources`` says which folder gives which part, ``architecture`` reads the
shapes off their config.json (refusing, in one line, what the provider cannot represent), the
recipes map each tensor of ours to HF tensors (hf_checkpoint.py reads and writes by them), and
``export_layout`` is what scripts/export_hf.py writes.

Names: a folder's parts are found by the tensors they end in (``embed_tokens.weight``,
``embeddings.patch_embedding.weight``, ``multi_modal_projector.linear_1.weight``), so the layout
transformers 5 saves (``language_model.model.``, ``vision_tower.``) and the Hub's older one
(``vision_tower.vision_model.``, ``model.language_model.``) both import. Layouts that differ:
megatron-core's fused QKV interleaves q, k and v per query group (the ViT: per head); its fused
SwiGLU FC1 is [gate; up]; CLIP's class embedding [c] is megatron-core's [1, 1, c].
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch

from examples.mimo.model_providers.hf_checkpoint import (Experts, Reader, Rows, is_hf_folder,
                                                         read_config)

LLAVA = "llava"
TEXT_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM"}
VISION_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
VISION_FOLDERS = {"clip": "clip", "siglip": "siglip", **VISION_TYPES}  # a folder's model_type
VISION_ACTS = ("quick_gelu", "gelu", "gelu_pytorch_tanh")
PROJECTOR_ACTS = ("gelu", "gelu_pytorch_tanh", "quick_gelu", "silu", "relu")
ROPE_SCALINGS = ("none", "linear", "llama3")
# megatron-core's llama3 RoPE scaling has these fixed (RotaryEmbedding._apply_scaling)
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
# tensors a folder may hold that no model of transformers' reads (older saves' buffers)
BUFFERS = ("rotary_emb.inv_freq", "embeddings.position_ids")


@dataclass(frozen=True)
class Sources:
    language: Optional[str] = None
    vision: Optional[str] = None  # the tower, and with --load-from-hf the projector too
    projector: bool = False
    configs: Tuple[Tuple[str, dict], ...] = ()  # (folder, config.json)

    @property
    def any(self) -> bool:
        return self.language is not None or self.vision is not None

    def config(self, folder: str) -> dict:
        return dict(self.configs)[folder]


def sources(*, whole: Optional[str], language: Optional[str], vision: Optional[str]) -> Sources:
    """--load-from-hf (a llava folder) or --load-language-from / --load-vision-from where they are
    HF folders; ValueError (one line) naming the flag on a model type this provider cannot read."""
    if whole is not None:
        if language is not None or vision is not None:
            raise ValueError("--load-from-hf loads both branches; drop --load-language-from and "
                             "--load-vision-from")
        config = read_config(whole, "--load-from-hf")
        _expect(config, (LLAVA,), "--load-from-hf", whole)
        return Sources(language=whole, vision=whole, projector=True, configs=((whole, config),))
    found, out = [], {}
    for flag, path, kinds in (("--load-language-from", language, (LLAVA, *TEXT_TYPES)),
                              ("--load-vision-from", vision, (LLAVA, *VISION_FOLDERS))):
        if is_hf_folder(path):
            config = read_config(path, flag)
            _expect(config, kinds, flag, path)
            out[flag] = path
            found.append((path, config))
    return Sources(language=out.get("--load-language-from"), vision=out.get("--load-vision-from"),
                   configs=tuple(found))


def _expect(config: dict, kinds, flag: str, path: str) -> None:
    found = config.get("model_type")
    if found not in kinds:
        raise ValueError(f"{flag} {path}: config.json has model_type {found!r}, not one of "
                         f"{list(kinds)}")


def text_config(src: Sources) -> dict:
    config = src.config(src.language)
    return config["text_config"] if config.get("model_type") == LLAVA else config


def vision_config(src: Sources) -> dict:
    config = src.config(src.vision)
    return config if config.get("model_type") in VISION_TYPES else config["vision_config"]


def architecture(src: Sources) -> Tuple[Dict[str, object], Dict[str, object]]:
    """(LlavaArchitecture fields, other LlavaConfig fields) that the folders' config.json give."""
    arch, extra = {}, {}
    if src.language is not None:
        arch.update(_text(text_config(src), f"{src.language}/config.json",
                          src.config(src.language)))
    if src.vision is not None:
        arch.update(_vision(vision_config(src), f"{src.vision}/config.json"))
    llava = [f for f in (src.vision, src.language)
             if f and src.config(f).get("model_type") == LLAVA]
    if src.vision in llava:  # which hidden state feeds the projector, and the projector's kind
        whole, where = src.config(src.vision), f"{src.vision}/config.json"
        layer = whole.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise ValueError(f"{where}: vision_feature_layer {layer!r}: only one layer's output "
                             f"(an int) is supported, not several concatenated")
        arch.update(vision_feature_layer=layer,
                    vision_feature_select_strategy=_choice(
                        where, whole, "vision_feature_select_strategy", "default",
                        ("default", "full")),
                    projector_hidden_act=_choice(where, whole, "projector_hidden_act", "gelu",
                                                 PROJECTOR_ACTS),
                    projector_bias=bool(whole.get("multimodal_projector_bias", True)))
    if llava:
        whole = src.config(llava[0])
        extra["image_token_id"] = whole.get("image_token_index", whole.get("image_token_id"))
    return arch, extra


def _text(t: dict, where: str, folder_config: dict) -> dict:
    kind = t.get("model_type")
    if kind not in TEXT_TYPES:
        raise ValueError(f"{where}: the language model's model_type {kind!r} is not one of "
                         f"{list(TEXT_TYPES)}")
    _refuse(where, t, hidden_act="silu", mlp_bias=False, use_sliding_window=False,
            pretraining_tp=1, partial_rotary_factor=1.0)
    if kind != "qwen2":  # qwen2's q/k/v always have biases; attention_bias would add o_proj's too
        _refuse(where, t, attention_bias=False)
    heads = t["num_attention_heads"]
    # a llava folder keeps tie_word_embeddings at its top level (transformers copies it there)
    tied = bool(folder_config.get("tie_word_embeddings") or t.get("tie_word_embeddings", False))
    theta, scaling, factor = rope(t, where)
    return dict(hidden_size=t["hidden_size"], ffn_hidden_size=t["intermediate_size"],
                num_layers=t["num_hidden_layers"], num_attention_heads=heads,
                num_query_groups=t.get("num_key_value_heads") or heads,
                kv_channels=t.get("head_dim") or t["hidden_size"] // heads,
                vocab_size=t["vocab_size"], max_position_embeddings=t["max_position_embeddings"],
                norm_epsilon=float(t.get("rms_norm_eps", 1e-6)), rotary_base=theta,
                rope_scaling=scaling, rope_scaling_factor=factor,
                add_qkv_bias=kind == "qwen2", qk_layernorm=kind == "qwen3",
                untie_embeddings_and_output_weights=not tied)


def rope(t: dict, where: str) -> Tuple[float, str, float]:
    """(theta, scaling kind, factor) from transformers 5's rope_parameters or the older
    rope_theta/rope_scaling keys; ValueError for a scaling megatron-core's GPTModel lacks."""
    params = t.get("rope_parameters")
    if params is None:
        params = {**(t.get("rope_scaling") or {}), "rope_theta": t.get("rope_theta", 10000.0)}
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", t.get("rope_theta", 10000.0)))
    if kind == "default":
        return theta, "none", 1.0
    if kind == "llama3":
        for key, value in LLAMA3_FIXED.items():
            if float(params.get(key, value)) != value:
                raise ValueError(f"{where}: llama3 RoPE scaling with {key} {params[key]} is not "
                                 f"supported (megatron-core fixes it at {value})")
    if kind in ("linear", "llama3"):
        return theta, kind, float(params["factor"])
    raise ValueError(f"{where}: RoPE scaling {kind!r} is not supported (megatron-core's GPTModel "
                     f"scales RoPE only as 'linear' or 'llama3')")


def _vision(v: dict, where: str) -> dict:
    kind = VISION_TYPES.get(v.get("model_type"))
    if kind is None:
        raise ValueError(f"{where}: the vision tower's model_type {v.get('model_type')!r} is not "
                         f"one of {list(VISION_TYPES)}")
    _refuse(where, v, num_channels=3)
    size = v["image_size"]
    if not isinstance(size, int):
        raise ValueError(f"{where}: image_size {size!r}: only square images (an int) are supported")
    return dict(vision_model_type=kind, vision_hidden_size=v["hidden_size"],
                vision_ffn_hidden_size=v["intermediate_size"],
                vision_num_layers=v["num_hidden_layers"],
                vision_num_attention_heads=v["num_attention_heads"], img_h=size, img_w=size,
                patch_dim=v["patch_size"],
                vision_norm_epsilon=float(v.get("layer_norm_eps",
                                                1e-5 if kind == "clip" else 1e-6)),
                vision_hidden_act=_choice(where, v, "hidden_act",
                                          "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh",
                                          VISION_ACTS))


def _choice(where: str, config: dict, key: str, default: str, known) -> str:
    value = config.get(key, default)
    if value not in known:
        raise ValueError(f"{where}: {key} {value!r} is not supported (only {list(known)})")
    return value


def _refuse(where: str, config: dict, **supported) -> None:
    for key, want in supported.items():
        if config.get(key) is not None and config[key] != want:
            raise ValueError(f"{where}: {key} {config[key]!r} is not supported by this provider "
                             f"(only {want!r})")


# ---- recipes -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reshaped:
    """A tensor of ours that is a whole HF tensor of another shape (CLIP's class embedding [c],
    megatron-core's class token [1, 1, c])."""

    parts: Tuple[Tuple[str, int, int], ...]  # one (name, 0, rows), for the coverage check
    hf_shape: Tuple[int, ...]
    shape: Tuple[int, ...]

    def read(self, reader, index) -> torch.Tensor:
        whole = reader.read(self.parts[0][0], (slice(None),)).reshape(self.shape)
        return whole[tuple(index)]

    def write(self, tensor: torch.Tensor, out) -> None:
        out.put(self.parts[0][0], 0, tensor.reshape(self.hf_shape))


@dataclass(frozen=True)
class WithIdentityNorm:
    """Export only: a recipe that also writes an identity LayerNorm (weight 1, bias 0) under
    ``norm`` (the tower's post-layernorm: not part of our model, read by no LLaVA)."""

    recipe: Rows
    norm: str
    size: int

    @property
    def parts(self):
        return self.recipe.parts

    def read(self, reader, index) -> torch.Tensor:
        return self.recipe.read(reader, index)

    def write(self, tensor: torch.Tensor, out) -> None:
        self.recipe.write(tensor, out)
        out.put(f"{self.norm}weight", 0, torch.ones(self.size, dtype=tensor.dtype))
        out.put(f"{self.norm}bias", 0, torch.zeros(self.size, dtype=tensor.dtype))


class Layers(Experts):
    """A tensor of ours with a leading layer axis: a TransformerBlock's layers share one
    dist-checkpointing key per parameter (each pipeline stage holds its own range of the axis)."""


def _one(name: str, rows: int) -> Rows:
    return Rows(((name, 0, rows),))


def _stacked(prefix: str, per_layer: List[Dict[str, Rows]]) -> Dict[str, Layers]:
    return {f"{prefix}{key}": Layers(tuple(layer[key] for layer in per_layer))
            for key in per_layer[0]}


def prefix(names: List[str], suffix: str, what: str, folder: str) -> str:
    """The prefix before ``suffix`` of the one tensor ending in it (how a folder names a part)."""
    found = sorted(n[:-len(suffix)] for n in names if n.endswith(suffix))
    if len(found) != 1:
        raise ValueError(f"{folder}: {'no' if not found else 'several'} {what} found (tensors "
                         f"ending in {suffix}: {found[:4]})")
    return found[0]


def language_recipes(a, *, model: str, lm_head: Optional[str]) -> Dict[str, object]:
    """Our language branch's keys -> HF tensors; ``model``: the prefix of embed_tokens and layers
    (``language_model.model.``, ``model.``), ``lm_head``: the output layer's name (None: tied).
    GPTModel's keys are TE's on either backend (the local spec maps its norms' names)."""
    h, nh, ng, hd, f = a.hidden_size, a.num_attention_heads, a.num_query_groups, a.kv_channels, \
        a.ffn_hidden_size
    out = {"embedding.word_embeddings.weight": _one(f"{model}embed_tokens.weight", a.vocab_size),
           "decoder.final_layernorm.weight": _one(f"{model}norm.weight", h)}
    if lm_head is not None:
        out["output_layer.weight"] = _one(lm_head, a.vocab_size)
    per = nh // ng

    def layer(i: int) -> Dict[str, Rows]:
        hf, attn = f"{model}layers.{i}.", f"{model}layers.{i}.self_attn."
        rows = {"self_attention.linear_qkv.layer_norm_weight": _one(f"{hf}input_layernorm.weight",
                                                                    h),
                "self_attention.linear_proj.weight": _one(f"{attn}o_proj.weight", h),
                "mlp.linear_fc1.layer_norm_weight": _one(f"{hf}post_attention_layernorm.weight", h),
                # SwiGLU: megatron-core's fc1 is [gate; up], each split over TP on its own
                "mlp.linear_fc1.weight": Rows(((f"{hf}mlp.gate_proj.weight", 0, f),
                                               (f"{hf}mlp.up_proj.weight", 0, f))),
                "mlp.linear_fc2.weight": _one(f"{hf}mlp.down_proj.weight", h)}
        for what in ("weight", "bias") if a.add_qkv_bias else ("weight",):
            rows[f"self_attention.linear_qkv.{what}"] = Rows(tuple(
                part for g in range(ng) for part in (
                    (f"{attn}q_proj.{what}", g * per * hd, per * hd),
                    (f"{attn}k_proj.{what}", g * hd, hd), (f"{attn}v_proj.{what}", g * hd, hd))))
        if a.qk_layernorm:
            rows["self_attention.q_layernorm.weight"] = _one(f"{attn}q_norm.weight", hd)
            rows["self_attention.k_layernorm.weight"] = _one(f"{attn}k_norm.weight", hd)
        return rows

    out.update(_stacked("decoder.layers.", [layer(i) for i in range(a.num_layers)]))
    return out


def vision_recipes(a, *, tower: str, projector: Optional[str], transformer_impl: str,
                   vit: str, identity_post_norm: bool = False) -> Dict[str, object]:
    """Our vision branch's keys (the tower's layers that feed the projector, and the projector
    when ``projector`` names its prefix) -> HF tensors; ``tower``: the prefix of ``embeddings.``;
    ``identity_post_norm``: export writes the tower's post-layernorm as an identity."""
    te = transformer_impl == "transformer_engine"
    c, heads = a.vision_hidden_size, a.vision_num_attention_heads
    hd = c // heads
    clip = a.vision_model_type == "clip"
    seq = (a.img_h // a.patch_dim) * (a.img_w // a.patch_dim) + (1 if clip else 0)
    ours, emb = f"encoders.{vit}.vit.", f"{tower}embeddings."
    out = {f"{ours}conv1.weight": _one(f"{emb}patch_embedding.weight", c),
           f"{ours}position_embeddings.weight": _one(f"{emb}position_embedding.weight", seq)}
    if clip:
        out[f"{ours}class_token"] = Reshaped(((f"{emb}class_embedding", 0, c),), (c,), (1, 1, c))
        out[f"{ours}ln_pre.weight"] = _one(f"{tower}pre_layrnorm.weight", c)
        out[f"{ours}ln_pre.bias"] = _one(f"{tower}pre_layrnorm.bias", c)
    else:
        out[f"{ours}conv1.bias"] = _one(f"{emb}patch_embedding.bias", c)
    if identity_post_norm:
        out[f"{ours}conv1.weight"] = WithIdentityNorm(out[f"{ours}conv1.weight"],
                                                      f"{tower}post_layernorm.", c)

    def layer(i: int) -> Dict[str, Rows]:
        hf = f"{tower}encoder.layers.{i}."
        norm1 = "self_attention.linear_qkv.layer_norm_" if te else "input_layernorm."
        norm2 = "mlp.linear_fc1.layer_norm_" if te else "pre_mlp_layernorm."
        rows = {}
        for what in ("weight", "bias"):
            rows[f"{norm1}{what}"] = _one(f"{hf}layer_norm1.{what}", c)
            rows[f"{norm2}{what}"] = _one(f"{hf}layer_norm2.{what}", c)
            # per head: [q_h, k_h, v_h] (megatron-core's query groups, one head each)
            rows[f"self_attention.linear_qkv.{what}"] = Rows(tuple(
                (f"{hf}self_attn.{p}_proj.{what}", head * hd, hd)
                for head in range(heads) for p in "qkv"))
            rows[f"self_attention.linear_proj.{what}"] = _one(f"{hf}self_attn.out_proj.{what}", c)
            rows[f"mlp.linear_fc1.{what}"] = _one(f"{hf}mlp.fc1.{what}", a.vision_ffn_hidden_size)
            rows[f"mlp.linear_fc2.{what}"] = _one(f"{hf}mlp.fc2.{what}", c)
        return rows

    out.update(_stacked(f"{ours}decoder.layers.", [layer(i) for i in range(vision_layers(a))]))
    if projector is not None:
        for fc, hf in (("linear_fc1", "linear_1"), ("linear_fc2", "linear_2")):
            key = f"input_projections.0.encoder.{fc}."
            out[f"{key}weight"] = _one(f"{projector}{hf}.weight", a.hidden_size)
            if a.projector_bias:
                out[f"{key}bias"] = _one(f"{projector}{hf}.bias", a.hidden_size)
    return out


def vision_layers(a) -> int:
    """The tower's layers up to the one whose output feeds the projector: transformers' hidden
    states are the embeddings (0) and each layer's output, indexed from the end when < 0."""
    layer = a.vision_feature_layer
    return a.vision_num_layers + 1 + layer if layer < 0 else layer


@dataclass(frozen=True)
class Names:
    """Where a folder keeps each part (prefixes found by ``names``)."""

    model: Optional[str] = None  # the language model's embed_tokens/layers/norm
    lm_head: Optional[str] = None
    tower: Optional[str] = None
    projector: Optional[str] = None


def names(src: Sources, folder: str, *, tied: bool) -> Names:
    found = Reader(folder).names()
    out = {}
    if folder == src.language:
        out["model"] = prefix(found, "embed_tokens.weight", "language model", folder)
        if not tied:
            heads = [n for n in ("lm_head.weight", "language_model.lm_head.weight") if n in found]
            if len(heads) != 1:
                raise ValueError(f"{folder}: untied embeddings need one lm_head.weight (found "
                                 f"{heads})")
            out["lm_head"] = heads[0]
    if folder == src.vision:
        out["tower"] = prefix(found, "embeddings.patch_embedding.weight", "vision tower", folder)
        if src.projector:
            out["projector"] = prefix(found, "multi_modal_projector.linear_1.weight", "projector",
                                      folder) + "multi_modal_projector."
    return Names(**out)


def unused(src: Sources, folder: str, n: Names, a) -> Callable[[str], bool]:
    """Tensors of ``folder`` deliberately not imported: the tower's layers after the one feeding
    the projector, its post-layernorm and SigLIP's pooling head (LLaVA reads hidden states before
    them), a CLIP/SigLIP model's text half, the parts of a llava folder not asked for, and old
    saves' buffers."""
    kind = src.config(folder).get("model_type")
    tied_heads = ("lm_head.weight", "language_model.lm_head.weight") \
        if folder == src.language and not a.untie_embeddings_and_output_weights else ()
    used = [p for p in (n.model, n.tower, n.projector) if p is not None] + \
        ([n.lm_head] if n.lm_head else [])
    skip: List[str] = []
    if n.tower is not None:
        skip += [f"{n.tower}post_layernorm.", f"{n.tower}head."]
        skip += [f"{n.tower}encoder.layers.{i}."
                 for i in range(vision_layers(a), a.vision_num_layers)]
    prefixes = tuple(skip)

    def left_out(name: str) -> bool:
        if name.startswith(prefixes) or name.endswith(BUFFERS) or name in tied_heads:
            return True
        # a whole VLM or CLIP/SigLIP model: what lies outside the parts imported from it
        return kind in (LLAVA, "clip", "siglip") and not any(name.startswith(p) for p in used)

    return left_out


# ---- export --------------------------------------------------------------------------------------

def text_type(a) -> str:
    if a.add_qkv_bias and a.qk_layernorm:
        raise ValueError("a language model with --add-qkv-bias and --qk-layernorm has no "
                         "Hugging Face counterpart among llama, qwen2 and qwen3")
    return "qwen2" if a.add_qkv_bias else "qwen3" if a.qk_layernorm else "llama"


def export_layout(a, *, transformer_impl: str, llm_only: bool, image_token_id: int,
                  image_tokens: int, vit: str) -> Tuple[Dict[str, Dict[str, object]], dict]:
    """({branch: recipes}, config.json) of the folder export writes: transformers' ``llava``
    (the names its save_pretrained writes), or with ``llm_only`` the language model alone. The
    tower is written with the layers that feed the projector only (vision_feature_layer -1: the
    same features) and an identity post-layernorm (LLaVA never reads it; we hold none);
    SigLIP's pooling head is switched off."""
    kind = text_type(a)
    if not llm_only and a.img_h != a.img_w:
        raise ValueError(f"--img-h {a.img_h} and --img-w {a.img_w}: transformers' vision towers "
                         f"take square images only")
    tied = not a.untie_embeddings_and_output_weights
    rope_parameters = {"rope_type": "default" if a.rope_scaling == "none" else a.rope_scaling,
                       "rope_theta": a.rotary_base}
    if a.rope_scaling != "none":
        rope_parameters["factor"] = a.rope_scaling_factor
    if a.rope_scaling == "llama3":
        rope_parameters.update(LLAMA3_FIXED)
    text = dict(model_type=kind, architectures=[TEXT_TYPES[kind]], vocab_size=a.vocab_size,
                hidden_size=a.hidden_size, intermediate_size=a.ffn_hidden_size,
                num_hidden_layers=a.num_layers, num_attention_heads=a.num_attention_heads,
                num_key_value_heads=a.num_query_groups, head_dim=a.kv_channels,
                max_position_embeddings=a.max_position_embeddings, rms_norm_eps=a.norm_epsilon,
                hidden_act="silu", rope_parameters=rope_parameters, tie_word_embeddings=tied)
    if llm_only:
        return {"language": language_recipes(a, model="model.",
                                              lm_head=None if tied else "lm_head.weight")}, text
    clip = a.vision_model_type == "clip"
    vision = dict(model_type="clip_vision_model" if clip else "siglip_vision_model",
                  hidden_size=a.vision_hidden_size, intermediate_size=a.vision_ffn_hidden_size,
                  num_hidden_layers=vision_layers(a),
                  num_attention_heads=a.vision_num_attention_heads, image_size=a.img_h,
                  patch_size=a.patch_dim, layer_norm_eps=a.vision_norm_epsilon,
                  hidden_act=a.vision_hidden_act)
    if not clip:
        vision["vision_use_head"] = False
    config = dict(model_type=LLAVA, architectures=["LlavaForConditionalGeneration"],
                  text_config={k: v for k, v in text.items() if k != "architectures"},
                  vision_config=vision, image_token_index=image_token_id,
                  image_seq_length=image_tokens, projector_hidden_act=a.projector_hidden_act,
                  vision_feature_layer=-1,
                  vision_feature_select_strategy=a.vision_feature_select_strategy,
                  multimodal_projector_bias=a.projector_bias, tie_word_embeddings=tied)
    exported = replace(a, vision_feature_layer=-1, vision_num_layers=vision_layers(a))
    return {"language": language_recipes(a, model="language_model.model.",
                                         lm_head=None if tied else "language_model.lm_head.weight"),
            "images": vision_recipes(exported, tower="vision_tower.",
                                     projector="multi_modal_projector.",
                                     transformer_impl=transformer_impl, vit=vit,
                                     identity_post_norm=True)}, config

