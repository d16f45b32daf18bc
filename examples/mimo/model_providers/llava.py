"""LLaVA: a CLIP or SigLIP vision tower, LLaVA's two-layer MLP projector, and a Llama, Qwen2 or
Qwen3 language model, as transformers' LlavaForConditionalGeneration computes them.

The language model is megatron-core's GPTModel (RMSNorm, RoPE, SwiGLU, grouped-query attention,
Qwen2's QKV biases, Qwen3's QK-norm, tied or untied embeddings); the tower megatron-core's
CLIPViTModel, built with the layers whose output feeds the projector only (LLaVA's
``vision_feature_layer``, -2 by default: the last layer is never run) and without SigLIP's
post-layernorm (LLaVA reads hidden states before it); the projector megatron-core's
MultimodalProjector. Shapes come from a preset (``--model-preset``), the Hugging Face folders of
the checkpoint flags (llava_hf.py), and the size flags, which override a preset's field and must
agree with a folder's config.json.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, fields, replace
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from examples.mimo.flags import FREE, MATCH, add_group, arg, derived, label, option, read
from examples.mimo.interfaces import (ENCODER_MODULE, LANGUAGE_MODULE, DataSpec, HFPart,
                                     KernelChoices, ModelFacts, StepFlops, StepWork)
from examples.mimo.model_providers import common, layers, llava_hf, specs
from examples.mimo.model_providers import flops as Fl

NAME = "llava"
VIT_ENCODER = "vision_tower"
# the processors' pixel statistics: OpenAI CLIP's, and SigLIP's
PIXEL_STATS = {"clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
               "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def _size(name: str, kind=int, **kwargs):
    """A shape field: its flag overrides the preset's value (the flag's None: keep it)."""
    return option(name, MATCH, type=kind, default=None, value=MISSING, **kwargs)


def _switch(name: str, help: str):
    """A yes/no field a flag can only switch on (absent: the preset's or the folder's)."""
    return option(name, MATCH, action="store_true", default=None, value=MISSING, help=help)


@dataclass(frozen=True)
class LlavaArchitecture:
    hidden_size: int = _size("--hidden-size")
    ffn_hidden_size: int = _size("--ffn-hidden-size")
    num_layers: int = _size("--num-layers")
    num_attention_heads: int = _size("--num-attention-heads")
    num_query_groups: int = _size("--num-query-groups")
    kv_channels: int = _size("--kv-channels")
    vocab_size: int = _size("--vocab-size")
    max_position_embeddings: int = _size("--max-position-embeddings")
    norm_epsilon: float = _size("--norm-epsilon", float)
    rotary_base: float = _size("--rotary-base", float)
    rope_scaling: str = _size("--rope-scaling", str, choices=llava_hf.ROPE_SCALINGS)
    rope_scaling_factor: float = _size("--rope-scaling-factor", float)
    add_qkv_bias: bool = _switch("--add-qkv-bias", "Biases on Q, K and V (Qwen2).")
    qk_layernorm: bool = _switch("--qk-layernorm", "RMSNorm of each head's Q and K (Qwen3).")
    untie_embeddings_and_output_weights: bool = _switch(
        "--untie-embeddings-and-output-weights", "An output layer of its own.")
    vision_model_type: str = _size("--vision-model-type", str, choices=("clip", "siglip"))
    vision_hidden_size: int = _size("--vision-hidden-size")
    vision_ffn_hidden_size: int = _size("--vision-ffn-hidden-size")
    # the tower's layers (transformers' num_hidden_layers); those after the feature layer are
    # not built
    vision_num_layers: int = _size("--vision-num-layers")
    vision_num_attention_heads: int = _size("--vision-num-attention-heads")
    img_h: int = _size("--img-h")
    img_w: int = _size("--img-w")
    patch_dim: int = _size("--patch-dim")
    vision_norm_epsilon: float = _size("--vision-norm-epsilon", float)
    vision_hidden_act: str = _size("--vision-hidden-act", str, choices=llava_hf.VISION_ACTS)
    vision_feature_layer: int = _size(
        "--vision-feature-layer",
        help="The tower's hidden state the projector reads, as LLaVA's (0: the embeddings, k: "
             "layer k's output, < 0 from the end).")
    vision_feature_select_strategy: str = _size(
        "--vision-feature-select-strategy", str, choices=("default", "full"),
        help="default drops the first token (CLIP's class token), full keeps all.")
    projector_hidden_act: str = _size("--projector-hidden-act", str,
                                      choices=llava_hf.PROJECTOR_ACTS)
    # a llava folder's multimodal_projector_bias
    projector_bias: bool = derived(MATCH, default=True)


_TINY = LlavaArchitecture(
    hidden_size=64, ffn_hidden_size=128, num_layers=2, num_attention_heads=4, num_query_groups=2,
    kv_channels=16, vocab_size=256, max_position_embeddings=1024, norm_epsilon=1e-5,
    rotary_base=10000.0, rope_scaling="none", rope_scaling_factor=1.0, add_qkv_bias=False,
    qk_layernorm=False, untie_embeddings_and_output_weights=True, vision_model_type="clip",
    vision_hidden_size=32, vision_ffn_hidden_size=64, vision_num_layers=3,
    vision_num_attention_heads=4, img_h=32, img_w=32, patch_dim=8, vision_norm_epsilon=1e-5,
    vision_hidden_act="quick_gelu", vision_feature_layer=-2,
    vision_feature_select_strategy="default", projector_hidden_act="gelu")

PRESETS: Dict[str, LlavaArchitecture] = {
    "tiny-cpu": _TINY,
    # llava-hf/llava-1.5-7b-hf: Vicuna-7B (vocabulary padded to 32064) and CLIP ViT-L/14 at 336
    "llava-1.5-7b": replace(
        _TINY, hidden_size=4096, ffn_hidden_size=11008, num_layers=32, num_attention_heads=32,
        num_query_groups=32, kv_channels=128, vocab_size=32064, max_position_embeddings=4096,
        vision_hidden_size=1024, vision_ffn_hidden_size=4096, vision_num_layers=24,
        vision_num_attention_heads=16, img_h=336, img_w=336, patch_dim=14),
}


@dataclass(frozen=True)
class LlavaConfig:
    arch: LlavaArchitecture  # --model-preset with the folders' shapes and the size flags
    transformer_impl: str = derived(MATCH, arg(
        "--transformer-impl", choices=specs.TRANSFORMER_IMPLS, default=None,
        help="Default: transformer_engine when importable, else local."))
    image_token_id: int = derived(FREE, arg(
        "--image-token-id", type=int, default=None,
        help="Placeholder token id of image positions (default: a llava folder's "
             "image_token_index, else vocabulary size - 1)."))
    preset: str = option("--model-preset", FREE, choices=sorted(PRESETS), default="tiny-cpu",
                         help="Architecture; Hugging Face folders and the size flags below "
                              "override fields of it.")
    freeze_lm: bool = option("--freeze-lm", FREE, action="store_true",
                             help="Freeze the language model.")
    freeze_vit: bool = option("--freeze-vit", FREE, action="store_true",
                              help="Freeze the vision tower.")
    freeze_projection: bool = option("--freeze-projection", FREE, action="store_true",
                                     help="Freeze the projector.")

    @property
    def image_tokens(self) -> int:
        return image_tokens(self.arch)


def vision_seq(a: LlavaArchitecture) -> int:
    """The tower's tokens per image: its patches and CLIP's class token."""
    return (a.img_h // a.patch_dim) * (a.img_w // a.patch_dim) + (a.vision_model_type == "clip")


def image_tokens(a: LlavaArchitecture) -> int:
    # "default" drops the first token whatever it is, as transformers does (SigLIP: a patch)
    return vision_seq(a) - (a.vision_feature_select_strategy == "default")


def add_args(parser: argparse.ArgumentParser) -> None:
    add_group(parser, "LLaVA provider", LlavaConfig)
    add_group(parser, "LLaVA sizes (default: the preset's or the Hugging Face folders')",
              LlavaArchitecture)


def config_from_args(args: argparse.Namespace) -> LlavaConfig:
    # (The trainer's checkpoint flags: a tool's parser of the provider's flags alone has none.)
    src = llava_hf.sources(whole=getattr(args, "load_from_hf", None),
                           language=getattr(args, "load_language_from", None),
                           vision=getattr(args, "load_vision_from", None))
    hf_arch, hf_extra = llava_hf.architecture(src) if src.any else ({}, {})
    overrides = {k: v for k, v in read(LlavaArchitecture, args).items() if v is not None}
    for f in fields(LlavaArchitecture):
        if f.name in overrides and f.name in hf_arch and overrides[f.name] != hf_arch[f.name]:
            raise ValueError(f"{label(f)} {overrides[f.name]} contradicts the Hugging Face "
                             f"config.json ({hf_arch[f.name]})")
    hf_token = hf_extra.get("image_token_id")
    if args.image_token_id is not None and hf_token is not None and args.image_token_id != hf_token:
        raise ValueError(f"--image-token-id {args.image_token_id} contradicts the Hugging Face "
                         f"config.json ({hf_token})")
    arch = replace(PRESETS[args.model_preset], **{**hf_arch, **overrides})
    validate_architecture(arch)
    impl = args.transformer_impl or ("transformer_engine" if specs.te_available() else "local")
    specs.check_transformer_impl(impl)
    token = next(t for t in (args.image_token_id, hf_token, arch.vocab_size - 1) if t is not None)
    if not 0 <= token < arch.vocab_size:
        raise ValueError(f"--image-token-id {token} must be in [0, --vocab-size {arch.vocab_size})")
    return LlavaConfig(**read(LlavaConfig, args), arch=arch, transformer_impl=impl,
                       image_token_id=token)


def validate_architecture(a: LlavaArchitecture) -> None:
    for f in fields(LlavaArchitecture):
        value = getattr(a, f.name)
        if isinstance(value, float) and value <= 0:
            raise ValueError(f"{label(f)} {value} must be > 0")
        if type(value) is int and f.name != "vision_feature_layer" and value < 1:
            raise ValueError(f"{label(f)} {value} must be >= 1")
    common.check_divides("--num-query-groups", a.num_query_groups, "--num-attention-heads",
                         a.num_attention_heads)
    common.check_divides("--vision-num-attention-heads", a.vision_num_attention_heads,
                         "--vision-hidden-size", a.vision_hidden_size)
    # Not a multiple is allowed: the tower crops the rest (layers.clip_vit_model)
    for flag, side in (("--img-h", a.img_h), ("--img-w", a.img_w)):
        if a.patch_dim > side:
            raise ValueError(f"--patch-dim {a.patch_dim} must not exceed {flag} {side}")
    built = llava_hf.vision_layers(a)
    if not 1 <= built <= a.vision_num_layers:
        raise ValueError(f"--vision-feature-layer {a.vision_feature_layer} must pick one of the "
                         f"tower's {a.vision_num_layers} layers (1..{a.vision_num_layers}, or "
                         f"-{a.vision_num_layers}..-1 from the end)")
    if image_tokens(a) < 1:
        raise ValueError(f"--vision-feature-select-strategy default leaves no image token of "
                         f"{vision_seq(a)}")
    llava_hf.text_type(a)  # one of the language models of transformers this provider mirrors


def hf_parts(cfg: LlavaConfig, *, load_from_hf: Optional[str], language_from: Optional[str],
             vision_from: Optional[str]) -> Dict[str, HFPart]:
    src = llava_hf.sources(whole=load_from_hf, language=language_from, vision=vision_from)
    a, parts = cfg.arch, {}
    tied = not a.untie_embeddings_and_output_weights
    for branch, folder in ((LANGUAGE_MODULE, src.language), (ENCODER_MODULE, src.vision)):
        if folder is None:
            continue
        names = llava_hf.names(src, folder, tied=tied)
        if branch == LANGUAGE_MODULE:
            recipes = llava_hf.language_recipes(a, model=names.model, lm_head=names.lm_head)
        else:
            recipes = llava_hf.vision_recipes(a, tower=names.tower, projector=names.projector,
                                              transformer_impl=cfg.transformer_impl,
                                              vit=VIT_ENCODER)
        parts[branch] = HFPart(folder, recipes, llava_hf.unused(src, folder, names, a))
    return parts


def hf_export(record: dict, *, llm_only: bool) -> Tuple[Dict[str, dict], dict]:
    """({branch: recipes}, config.json) for a checkpoint's stored model config (its run record)."""
    a = LlavaArchitecture(**record["arch"])
    return llava_hf.export_layout(a, transformer_impl=record["transformer_impl"],
                                  llm_only=llm_only, image_token_id=record["image_token_id"],
                                  image_tokens=image_tokens(a), vit=VIT_ENCODER)


# ---- what validation, the planner and the logs know before anything is built --------------------

def language_params(a: LlavaArchitecture) -> int:
    h, nh, ng, hd, f = a.hidden_size, a.num_attention_heads, a.num_query_groups, a.kv_channels, \
        a.ffn_hidden_size
    qkv = (nh + 2 * ng) * hd
    # two RMSNorms, QKV (biases: Qwen2), Q/K norms (Qwen3), output projection, SwiGLU
    layer = 2 * h + h * qkv + a.add_qkv_bias * qkv + a.qk_layernorm * 2 * hd + nh * hd * h \
        + 3 * h * f
    embeddings = a.vocab_size * h * (1 + a.untie_embeddings_and_output_weights)
    return embeddings + h + a.num_layers * layer


def vision_params(a: LlavaArchitecture) -> Tuple[int, int]:
    """(tower as built, projector) parameter counts."""
    c, f, p = a.vision_hidden_size, a.vision_ffn_hidden_size, a.patch_dim
    clip = a.vision_model_type == "clip"
    # two LayerNorms, QKV and projection with biases, MLP with biases
    layer = 4 * c + 3 * c * c + 3 * c + c * c + c + 2 * c * f + f + c
    # patch embedding (SigLIP's with a bias), positions, CLIP's class token and pre-layernorm
    tower = 3 * p * p * c + (0 if clip else c) + vision_seq(a) * c + (3 * c if clip else 0) \
        + llava_hf.vision_layers(a) * layer
    h = a.hidden_size
    projector = c * h + h * h + (2 * h if a.projector_bias else 0)
    return tower, projector


def language_activation_bytes(a: LlavaArchitecture) -> float:
    """Bytes per token the layers keep for backward at 16-bit (memory.py): each norm's input and
    output, QKV's output, attention's output and fp32 log-sum-exp, SwiGLU's FC1 output and its
    product (FC2's input); the embedding's output and the final norm's."""
    h, nh, ng, hd, f = a.hidden_size, a.num_attention_heads, a.num_query_groups, a.kv_channels, \
        a.ffn_hidden_size
    layer = 2 * (2 * h + (nh + 2 * ng) * hd + nh * hd) + 4 * nh + 2 * (2 * h + 3 * f)
    return 2 * 2 * h + a.num_layers * layer


def vision_activation_bytes(a: LlavaArchitecture, *, vit_trains: bool, fused: bool) -> float:
    """Bytes per image at 16-bit: the tower's (when it trains) per token and layer (norms in and
    out, QKV, attention out, FC1 out, activation out, and without TE's ``fused`` attention a row
    of scores), the projector's per image token (its input, FC1 out, activation out, output)."""
    c, f, h = a.vision_hidden_size, a.vision_ffn_hidden_size, a.hidden_size
    scores = 0 if fused else 2 * a.vision_num_attention_heads * vision_seq(a)
    tower = vision_seq(a) * llava_hf.vision_layers(a) * (2 * (6 * c + 2 * f)
                                                          + 4 * a.vision_num_attention_heads
                                                          + scores)
    projector = image_tokens(a) * 2 * (c + 3 * h)
    return (tower if vit_trains else 0) + projector


def facts(cfg: LlavaConfig) -> ModelFacts:
    a = cfg.arch
    te = cfg.transformer_impl == "transformer_engine"
    tower, projector = vision_params(a)
    return ModelFacts(llm_num_layers=a.num_layers, llm_num_heads=a.num_attention_heads,
                      llm_num_query_groups=a.num_query_groups,
                      encoder_num_heads=a.vision_num_attention_heads, num_experts=0,
                      llm_moe_layers=0, encoder_params=tower + projector,
                      llm_params=language_params(a), llm_hidden_size=a.hidden_size,
                      encoder_hidden_size=a.vision_hidden_size,
                      encoder_num_layers=llava_hf.vision_layers(a),
                      encoder_tokens_per_image=vision_seq(a),
                      transformer_impl=cfg.transformer_impl, sequence_parallel=True,
                      llm_trainable_params=0 if cfg.freeze_lm else None,
                      encoder_trainable_params=(0 if cfg.freeze_vit else tower)
                      + (0 if cfg.freeze_projection else projector),
                      llm_vocab_size=a.vocab_size,
                      llm_activation_bytes_per_token=language_activation_bytes(a),
                      encoder_activation_bytes_per_image=vision_activation_bytes(
                          a, vit_trains=not cfg.freeze_vit, fused=te),
                      llm_attention_score_heads=0 if te else a.num_layers * a.num_attention_heads)


def flops(cfg: LlavaConfig, work: StepWork) -> StepFlops:
    a = cfg.arch
    c, p, heads = a.vision_hidden_size, a.patch_dim, a.vision_num_attention_heads
    patches, n = vision_seq(a) - (a.vision_model_type == "clip"), vision_seq(a)
    vit_trains = not cfg.freeze_vit
    vit_layer = Fl.attention(1, n, hidden=c, heads=heads, groups=heads, head_dim=c // heads) \
        + Fl.mlp(n, c, a.vision_ffn_hidden_size)
    encoder = work.images * (
        # torch's patch convolution: no gradient for the images themselves
        Fl.train(Fl.linear(patches, 3 * p * p, c), weights=vit_trains, inputs=False)
        + Fl.train(llava_hf.vision_layers(a) * vit_layer, weights=vit_trains, inputs=vit_trains)
        # megatron's linear computes its input gradient whenever a gradient passes through it
        + Fl.train(Fl.mlp(image_tokens(a), c, a.hidden_size, a.hidden_size),
                   weights=not cfg.freeze_projection,
                   inputs=vit_trains or not cfg.freeze_projection))
    h, s, seqs = a.hidden_size, work.seq_length, work.sequences
    t = seqs * s
    layer = Fl.attention(seqs, s, hidden=h, heads=a.num_attention_heads,
                         groups=a.num_query_groups, head_dim=a.kv_channels) \
        + Fl.mlp(t, h, a.ffn_hidden_size, gated=True)
    encoder_trains = work.images > 0 and (vit_trains or not cfg.freeze_projection)
    llm = Fl.train(a.num_layers * layer + Fl.linear(t, h, a.vocab_size),
                   weights=not cfg.freeze_lm, inputs=not cfg.freeze_lm or encoder_trains)
    return StepFlops(encoder=encoder, llm=llm)


def data_spec(cfg: LlavaConfig) -> DataSpec:
    a = cfg.arch
    mean, std = PIXEL_STATS[a.vision_model_type]
    return DataSpec(vocab_size=a.vocab_size, image_token_id=cfg.image_token_id,
                    image_tokens=cfg.image_tokens, image_shape=(3, a.img_h, a.img_w),
                    pixel_mean=mean, pixel_std=std)


# ---- the model -----------------------------------------------------------------------------------

def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # megatron.core.activations.quick_gelu's formula, unscripted: TorchScript's first call costs
    # seconds on CPU, which every short job would pay
    return x * torch.sigmoid(1.702 * x)


def activation(name: str):
    return {"gelu": F.gelu, "gelu_pytorch_tanh": gelu_tanh, "quick_gelu": quick_gelu,
            "silu": F.silu, "relu": F.relu}[name]


class LlavaVisionTower(torch.nn.Module):
    """megatron-core's CLIPViTModel as LLaVA reads it: [b, 3, H, W] -> [b, tokens, c], the
    hidden state after its last built layer, the first token dropped with the "default" strategy.
    SigLIP's post-layernorm, which CLIPViTModel applies at the end, is removed: transformers'
    hidden states (what LLaVA selects from) are taken before it. (layers.clip_vit_model: the
    tower's sharded state dict with the grid's TP group.)"""

    def __init__(self, *, config, layer_spec, norm, model_type: str, img_h: int, img_w: int,
                 patch_dim: int, drop_first: bool, pg_collection):
        super().__init__()
        self.config = config
        self.drop_first = drop_first
        clip = model_type == "clip"
        self.vit = layers.clip_vit_model()(config, layer_spec, ln_pre_impl=norm, ln_post_impl=norm,
                                add_class_token=clip, class_token_len=1 if clip else 0,
                                patch_dim=patch_dim, img_h=img_h, img_w=img_w,
                                model_subtype=model_type, pg_collection=pg_collection)
        self.vit.ln_post = None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        # megatron-core's own (TP-sharded layers): a plain module would be saved as replicated
        return self.vit.sharded_state_dict(f"{prefix}vit.", sharded_offsets, metadata)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.vit(images)
        return x[:, 1:] if self.drop_first else x


def _kernel_fields(kernels: Optional[KernelChoices], **branch) -> dict:
    # None (tests and tools that build one branch): megatron-core's defaults
    return {} if kernels is None else kernels.transformer_fields(**branch)


def language_config(cfg: LlavaConfig, *, tp: int, pp: int, dtype: torch.dtype,
                    kernels: Optional[KernelChoices] = None, sequence_parallel: bool = False):
    a = cfg.arch
    return common.transformer_config(
        tp=tp, pp=pp, dtype=dtype, kernel_fields=_kernel_fields(kernels, fp8=True, graphs=True),
        num_layers=a.num_layers, hidden_size=a.hidden_size, ffn_hidden_size=a.ffn_hidden_size,
        num_attention_heads=a.num_attention_heads, num_query_groups=a.num_query_groups,
        kv_channels=a.kv_channels, normalization="RMSNorm", layernorm_epsilon=a.norm_epsilon,
        add_bias_linear=False, add_qkv_bias=a.add_qkv_bias, qk_layernorm=a.qk_layernorm,
        gated_linear_unit=True, activation_func=F.silu, sequence_parallel=sequence_parallel)


def _language_layers(cfg: LlavaConfig, config, *, pp_rank: int):
    """This stage's layers and final norm. Locally: torch norms that also run sequence-parallel
    (layers.sequence_parallel_torch_norm), Q/K norms too, and attention that takes packed rows."""
    from megatron.core.models.gpt import gpt_layer_specs as gpt
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)

    if cfg.transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        layer, norm = gpt.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=cfg.arch.qk_layernorm), TENorm
    else:
        layer = gpt.get_gpt_layer_local_spec(qk_layernorm=cfg.arch.qk_layernorm,
                                             normalization="RMSNorm")
        norm = layers.sequence_parallel_torch_norm()
        layer.submodules.input_layernorm = layer.submodules.pre_mlp_layernorm = norm
        attention = layer.submodules.self_attention.submodules
        attention.core_attention = specs.packed_local_attention()
        if cfg.arch.qk_layernorm:
            attention.q_layernorm = attention.k_layernorm = norm
    count = get_num_layers_to_build(config, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * count, layer_norm=norm)


def language_spec(cfg: LlavaConfig, *, pg_collection, tp: int, pp: int, dtype: torch.dtype,
                  seq_length: int, kernels: Optional[KernelChoices] = None,
                  sequence_parallel: bool = False):
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.spec_utils import ModuleSpec

    a = cfg.arch
    tied = not a.untie_embeddings_and_output_weights
    pp_rank = pg_collection.pp.rank() if pg_collection is not None else 0
    config = language_config(cfg, tp=tp, pp=pp, dtype=dtype, kernels=kernels,
                             sequence_parallel=sequence_parallel)
    # (layers.tied_gpt_model: the last stage's copy of tied embeddings on the grid's DP group)
    return ModuleSpec(module=layers.tied_gpt_model() if tied and pp > 1 else GPTModel, params=dict(
        config=config, transformer_layer_spec=_language_layers(cfg, config, pp_rank=pp_rank),
        vocab_size=a.vocab_size, max_sequence_length=seq_length,
        pre_process=pp_rank == 0, post_process=pp_rank == pp - 1,
        share_embeddings_and_output_weights=tied,
        position_embedding_type="rope", rotary_base=a.rotary_base,
        rope_scaling=a.rope_scaling == "llama3", rope_scaling_factor=a.rope_scaling_factor,
        seq_len_interpolation_factor=a.rope_scaling_factor if a.rope_scaling == "linear" else None,
        pg_collection=pg_collection,
        # MimoModel splits the combined text and image embeddings over the sequence itself
        scatter_embedding_sequence_parallel=False))


def encoder_spec(cfg: LlavaConfig, *, pg_collection, tp: int, dtype: torch.dtype,
                 kernels: Optional[KernelChoices] = None):
    from megatron.core.models.mimo.submodules.vision import VisionModalitySubmodules
    from megatron.core.models.vision.multimodal_projector import MultimodalProjector
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    a = cfg.arch
    vit_config = common.transformer_config(
        tp=tp, pp=1, dtype=dtype, kernel_fields=_kernel_fields(kernels, fp8=False),
        num_layers=llava_hf.vision_layers(a), hidden_size=a.vision_hidden_size,
        ffn_hidden_size=a.vision_ffn_hidden_size, num_attention_heads=a.vision_num_attention_heads,
        add_bias_linear=True, add_qkv_bias=True, activation_func=activation(a.vision_hidden_act),
        gated_linear_unit=False, normalization="LayerNorm", layernorm_epsilon=a.vision_norm_epsilon,
        bias_activation_fusion=False, bias_dropout_fusion=False)
    projector_config = common.transformer_config(
        tp=tp, pp=1, dtype=dtype, kernel_fields=None if kernels is None else kernels.init_fields(),
        num_layers=1, hidden_size=a.hidden_size, ffn_hidden_size=a.hidden_size,
        num_attention_heads=tp,  # no attention; must divide by TP
        add_bias_linear=a.projector_bias, activation_func=activation(a.projector_hidden_act),
        gated_linear_unit=False, bias_activation_fusion=False)
    column, row = specs.projector_linears(cfg.transformer_impl)
    tower = ModuleSpec(module=LlavaVisionTower, params=dict(
        config=vit_config, layer_spec=specs.vit_layer_spec(cfg.transformer_impl),
        norm=specs.norm_class(cfg.transformer_impl), model_type=a.vision_model_type,
        img_h=a.img_h, img_w=a.img_w, patch_dim=a.patch_dim,
        drop_first=a.vision_feature_select_strategy == "default", pg_collection=pg_collection))
    projector = ModuleSpec(module=MultimodalProjector, params=dict(
        config=projector_config, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row),
        projector_type="mlp", input_size=a.vision_hidden_size,
        tp_group=pg_collection.tp if pg_collection is not None else None))
    return ModuleSpec(module=VisionModalitySubmodules, params={"pg_collection": pg_collection},
                      submodules={"encoders": {VIT_ENCODER: tower},
                                  "input_projections": [projector]})


def module_config(module) -> object:
    return common.module_config(module, VIT_ENCODER)


def build(cfg: LlavaConfig, *, topology, dtype: torch.dtype, seq_length: int,
          device: torch.device, kernels: KernelChoices):
    """Build this rank's part of the MimoModel (unwrapped, on the current device)."""
    grid = topology.grid_config
    model = common.assemble(
        topology=topology, image_token_id=cfg.image_token_id,
        language_spec=lambda pgc: language_spec(
            cfg, pg_collection=pgc, tp=grid.llm_tp, pp=grid.llm_pp, dtype=dtype,
            seq_length=seq_length, kernels=kernels, sequence_parallel=grid.sequence_parallel),
        encoder_spec=lambda pgc: encoder_spec(cfg, pg_collection=pgc, tp=grid.encoder_tp,
                                              dtype=dtype, kernels=kernels))
    common.freeze(model, lm=cfg.freeze_lm, vit=cfg.freeze_vit, projection=cfg.freeze_projection)
    return model
