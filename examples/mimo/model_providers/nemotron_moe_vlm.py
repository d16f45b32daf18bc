"""Nemotron MoE VLM: RADIO ViT + pixel shuffle + projector, and a hybrid Mamba/attention/MoE LLM.

Architectures are data (``PRESETS``); every size field is also a flag that overrides the preset,
so a shape can be kept (layer pattern, heads) while its width or expert count shrinks to fit a
small machine. LLM widths follow the public Nemotron 3 Nano configuration (hidden 2688, 32 heads
of 128, Mamba-2 64x64 heads with 8 groups and state 128, 128 routed experts of 1856 with top-6
sigmoid routing and a 3712 shared expert, squared ReLU, RMSNorm, no position embedding, untied
embeddings, vocabulary 131072); the vision side follows megatron-core's "radio" ViT-H/16 shape.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, fields, replace
from typing import Dict, Optional, Tuple

import torch

from examples.mimo.flags import FREE, MATCH, add_group, arg, derived, label, option, read
from examples.mimo.interfaces import (ENCODER_MODULE, LANGUAGE_MODULE, DataSpec, HFPart,
                                     KernelChoices, ModelFacts, StepFlops, StepWork)
from examples.mimo.model_providers import common, nemotron_hf, specs
from examples.mimo.model_providers.hf_checkpoint import Reader
from examples.mimo.model_providers import flops as F

NAME = "nemotron_moe_vlm"
VIT_ENCODER = "radio"
LAYER_SYMBOLS = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
PROJECTION_TYPES = ("mlp", "affine")
# RADIO's pixel statistics (OpenAI CLIP's), which its image processor normalises with
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TRAINING_STAGES = ("full", "projector-only")


def _size(name: str, kind=int):
    """A shape field: its flag overrides the preset's value (the flag's None: keep it)."""
    return option(name, MATCH, type=kind, default=None, value=MISSING)


@dataclass(frozen=True)
class Architecture:
    hybrid_layer_pattern: str = _size("--hybrid-layer-pattern", kind=str)
    hidden_size: int = _size("--hidden-size")
    num_attention_heads: int = _size("--num-attention-heads")
    num_query_groups: int = _size("--num-query-groups")
    kv_channels: int = _size("--kv-channels")
    # dense MLP layers ("-")
    ffn_hidden_size: int = _size("--ffn-hidden-size")
    num_experts: int = _size("--num-experts")
    moe_ffn_hidden_size: int = _size("--moe-ffn-hidden-size")
    moe_shared_expert_intermediate_size: int = _size("--moe-shared-expert-intermediate-size")
    moe_router_topk: int = _size("--moe-router-topk")
    mamba_num_heads: int = _size("--mamba-num-heads")
    mamba_head_dim: int = _size("--mamba-head-dim")
    mamba_state_dim: int = _size("--mamba-state-dim")
    mamba_num_groups: int = _size("--mamba-num-groups")
    vocab_size: int = _size("--vocab-size")
    vision_num_layers: int = _size("--vision-num-layers")
    vision_hidden_size: int = _size("--vision-hidden-size")
    vision_ffn_hidden_size: int = _size("--vision-ffn-hidden-size")
    vision_num_attention_heads: int = _size("--vision-num-attention-heads")
    img_h: int = _size("--img-h")
    img_w: int = _size("--img-w")
    patch_dim: int = _size("--patch-dim")
    class_token_len: int = _size("--class-token-len")
    # RADIO's position-embedding table covers max_img_size^2 pixels
    max_img_size: int = _size("--max-img-size")
    vision_projection_ffn_hidden_size: int = _size("--vision-projection-ffn-hidden-size")
    # the top-k routing weights' scale (transformers' routed_scaling_factor)
    moe_router_topk_scaling_factor: float = _size("--moe-router-topk-scaling-factor", kind=float)


_TINY = Architecture(
    hybrid_layer_pattern="ME*E", hidden_size=64, num_attention_heads=4, num_query_groups=2,
    kv_channels=16, ffn_hidden_size=128, num_experts=4, moe_ffn_hidden_size=64,
    moe_shared_expert_intermediate_size=128, moe_router_topk=2, mamba_num_heads=8,
    mamba_head_dim=16, mamba_state_dim=16, mamba_num_groups=2, vocab_size=256,
    vision_num_layers=2, vision_hidden_size=32, vision_ffn_hidden_size=64,
    vision_num_attention_heads=4, img_h=32, img_w=32, patch_dim=8, class_token_len=2,
    max_img_size=64, vision_projection_ffn_hidden_size=128, moe_router_topk_scaling_factor=2.5)

_NEMOTRON = dict(
    hidden_size=2688, num_attention_heads=32, kv_channels=128, ffn_hidden_size=1856,
    num_experts=128, moe_ffn_hidden_size=1856, moe_shared_expert_intermediate_size=3712,
    moe_router_topk=6, mamba_num_heads=64, mamba_head_dim=64, mamba_state_dim=128,
    mamba_num_groups=8, vocab_size=131072, vision_num_layers=32, vision_hidden_size=1280,
    vision_ffn_hidden_size=5120, vision_num_attention_heads=16, img_h=512, img_w=512,
    patch_dim=16, class_token_len=10, max_img_size=2048, vision_projection_ffn_hidden_size=20480,
    moe_router_topk_scaling_factor=2.5)

PRESETS: Dict[str, Architecture] = {
    "tiny": _TINY,
    # Mamba needs mamba-ssm's GPU Triton kernels; this variant runs anywhere, CPU included.
    "tiny-cpu": replace(_TINY, hybrid_layer_pattern="*E*E"),
    # 10 MoE layers, each after a Mamba or (2 of them) an attention mixer.
    "nemotron-20l": Architecture(hybrid_layer_pattern="MEME*EMEMEME*EMEMEME", num_query_groups=2,
                                 **_NEMOTRON),
    # 27 MoE layers, each after a Mamba or (6 of them) an attention mixer.
    "nemotron-54l": Architecture(
        hybrid_layer_pattern="MEMEME*EMEMEME*EMEMEME*EMEMEME*EMEMEME*EMEMEME*EMEMEME",
        num_query_groups=8, **_NEMOTRON),
}


@dataclass(frozen=True)
class NemotronVLMConfig:
    arch: Architecture  # --model-preset with the size flags' overrides
    transformer_impl: str = derived(MATCH, arg(
        "--transformer-impl", choices=specs.TRANSFORMER_IMPLS, default=None,
        help="Default: transformer_engine when importable, else local."))
    image_token_id: int = derived(FREE, arg(
        "--image-token-id", type=int, default=None,
        help="Placeholder token id of image positions (default: vocabulary size - 1)."))
    freeze_lm: bool = derived(FREE, arg("--freeze-lm", action="store_true",
                                        help="Freeze the language model."))
    freeze_vit: bool = derived(FREE, arg("--freeze-vit", action="store_true",
                                         help="Freeze the vision encoder."))
    preset: str = option("--model-preset", FREE, choices=sorted(PRESETS), default="tiny-cpu",
                         help="Architecture; the size flags below override single fields of it.")
    vision_projection_type: str = option("--vision-projection-type", MATCH,
                                         choices=PROJECTION_TYPES, default="mlp")
    moe_aux_loss_coeff: float = option("--moe-aux-loss-coeff", FREE, type=float, default=1e-4,
                                       help="Weight of the sequence-level load-balancing loss.")
    moe_router_bias_update_rate: float = option(
        "--moe-router-bias-update-rate", FREE, type=float, default=1e-3,
        help="Aux-loss-free balancing: each step moves every expert's routing bias by this much "
             "towards an even load (transformers' e_score_correction_bias); 0 keeps it.")
    dynamic_resolution: bool = option("--dynamic-resolution", FREE, action="store_true",
                                      help="RADIO takes packed patches of images of any size "
                                           "(imgs_sizes).")
    training_stage: str = option("--training-stage", FREE, choices=TRAINING_STAGES,
                                 default="full",
                                 help="projector-only freezes the ViT and the language model.")
    freeze_projection: bool = option("--freeze-projection", FREE, action="store_true",
                                     help="Freeze the vision projector.")
    # Capacity: each expert takes at most capacity_factor x its even share of a micro-batch's
    # routed tokens. Padded to that capacity, the experts' shapes are fixed and the dispatcher no
    # longer waits for per-expert counts on the host (one sync per MoE layer and micro-batch);
    # tokens over capacity are dropped (--moe-token-drop-policy), which changes the model.
    moe_expert_capacity_factor: Optional[float] = option(
        "--moe-expert-capacity-factor", FREE, type=float, default=None,
        help="Drop tokens beyond this multiple of each expert's even share (default: dropless).")
    moe_pad_expert_input_to_capacity: bool = option(
        "--moe-pad-expert-input-to-capacity", FREE, action="store_true",
        help="Pad every expert to its capacity: fixed shapes, no host sync per MoE layer (needs "
             "--moe-expert-capacity-factor).")
    moe_token_drop_policy: str = option(
        "--moe-token-drop-policy", FREE, choices=("probs", "position"), default="probs",
        help="Which tokens an expert over capacity drops: lowest routing probabilities, or last "
             "in the sequence.")
    # What the vision side is, as transformers' nemotron_h_omni computes it: RADIO without a final
    # norm, RMSNorm in front of the projector (schema 3's checkpoints: "ln_post", a final LayerNorm
    # and no projector norm; they cannot be resumed by this code).
    vision_layout: str = derived(MATCH, default="omni")

    @property
    def image_tokens(self) -> int:
        a = self.arch
        return (a.img_h // a.patch_dim // 2) * (a.img_w // a.patch_dim // 2)


def add_args(parser: argparse.ArgumentParser) -> None:
    add_group(parser, "Nemotron MoE VLM provider", NemotronVLMConfig)
    add_group(parser, "Nemotron MoE VLM sizes (default: the preset's)", Architecture)


def config_from_args(args: argparse.Namespace) -> NemotronVLMConfig:
    # The shapes of HF folders given to the checkpoint flags win over the preset; a size flag that
    # says otherwise is an error, not an override. (The trainer's checkpoint flags: a tool's
    # parser of the provider's flags alone has none.)
    src = nemotron_hf.sources(whole=getattr(args, "load_from_hf", None),
                              language=getattr(args, "load_language_from", None),
                              vision=getattr(args, "load_vision_from", None))
    hf_arch, hf_extra = nemotron_hf.architecture(src) if src.any else ({}, {})
    overrides = {k: v for k, v in read(Architecture, args).items() if v is not None}
    for f in fields(Architecture):
        if f.name in overrides and f.name in hf_arch and overrides[f.name] != hf_arch[f.name]:
            raise ValueError(f"{label(f)} {overrides[f.name]} contradicts the Hugging Face "
                             f"config.json ({hf_arch[f.name]})")
    if args.image_token_id is not None and hf_extra.get("image_token_id", args.image_token_id) \
            != args.image_token_id:
        raise ValueError(f"--image-token-id {args.image_token_id} contradicts the Hugging Face "
                         f"config.json ({hf_extra['image_token_id']})")
    arch = replace(PRESETS[args.model_preset], **{**hf_arch, **overrides})
    validate_architecture(arch)
    impl = args.transformer_impl or ("transformer_engine" if specs.te_available() else "local")
    specs.check_transformer_impl(impl)
    image_token_id = args.image_token_id if args.image_token_id is not None else \
        hf_extra.get("image_token_id", arch.vocab_size - 1)
    if not 0 <= image_token_id < arch.vocab_size:
        raise ValueError(f"--image-token-id {image_token_id} must be in [0, --vocab-size "
                         f"{arch.vocab_size})")
    if args.moe_router_bias_update_rate < 0:
        raise ValueError(f"--moe-router-bias-update-rate {args.moe_router_bias_update_rate} must "
                         f"be >= 0")
    if args.moe_aux_loss_coeff < 0:
        raise ValueError(f"--moe-aux-loss-coeff {args.moe_aux_loss_coeff} must be >= 0")
    if args.moe_expert_capacity_factor is not None and args.moe_expert_capacity_factor <= 0:
        raise ValueError(f"--moe-expert-capacity-factor {args.moe_expert_capacity_factor} must be > 0")
    if args.moe_pad_expert_input_to_capacity and args.moe_expert_capacity_factor is None:
        raise ValueError("--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")
    if args.training_stage == "projector-only" and args.freeze_projection:
        raise ValueError("--training-stage projector-only trains only the projector; "
                         "--freeze-projection would leave nothing to train")
    projector_only = args.training_stage == "projector-only"
    return NemotronVLMConfig(**read(NemotronVLMConfig, args), arch=arch, transformer_impl=impl,
                             image_token_id=image_token_id,
                             freeze_lm=args.freeze_lm or projector_only,
                             freeze_vit=args.freeze_vit or projector_only)


def hf_parts(cfg: NemotronVLMConfig, *, load_from_hf: Optional[str], language_from: Optional[str],
             vision_from: Optional[str]) -> Dict[str, HFPart]:
    src = nemotron_hf.sources(whole=load_from_hf, language=language_from, vision=vision_from)
    parts = {}
    if src.language is not None:
        parts[LANGUAGE_MODULE] = HFPart(
            src.language, nemotron_hf.language_recipes(cfg.arch, prefix=src.language_prefix,
                                                       transformer_impl=cfg.transformer_impl),
            nemotron_hf.unused(src, src.language))
    if src.vision is not None:
        problems = nemotron_hf.layer_scale_problems(Reader(src.vision))
        if problems:
            raise ValueError(problems[0])
        parts[ENCODER_MODULE] = HFPart(
            src.vision, nemotron_hf.vision_recipes(cfg.arch, prefix=src.vision_prefix,
                                                   transformer_impl=cfg.transformer_impl,
                                                   projector=src.projector, vit=VIT_ENCODER),
            nemotron_hf.unused(src, src.vision),
            notes=tuple(n for n in [nemotron_hf.audio_note(src)] if n))
    return parts


def hf_export(record: dict, *, llm_only: bool) -> Tuple[Dict[str, dict], dict]:
    """({branch: recipes}, config.json) for a checkpoint's stored model config (its run record)."""
    arch = Architecture(**record["arch"])
    return nemotron_hf.export_layout(arch, transformer_impl=record["transformer_impl"],
                                     llm_only=llm_only, image_token_id=record["image_token_id"])


def validate_architecture(a: Architecture) -> None:
    for f in fields(Architecture):
        value = getattr(a, f.name)
        if f.name != "hybrid_layer_pattern" and (value <= 0 if isinstance(value, float)
                                                 else value < 1):
            raise ValueError(f"{label(f)} {value} must be {'> 0' if isinstance(value, float) else '>= 1'}")
    unknown = sorted(set(a.hybrid_layer_pattern) - set(LAYER_SYMBOLS))
    if not a.hybrid_layer_pattern or unknown:
        raise ValueError(f"--hybrid-layer-pattern {a.hybrid_layer_pattern!r}: layers are one of "
                         f"{LAYER_SYMBOLS} (found {unknown or 'no layers'})")
    common.check_divides("--num-query-groups", a.num_query_groups, "--num-attention-heads",
                         a.num_attention_heads)
    common.check_divides("--mamba-num-groups", a.mamba_num_groups, "--mamba-num-heads",
                         a.mamba_num_heads)
    if a.moe_router_topk > a.num_experts:
        raise ValueError(f"--moe-router-topk {a.moe_router_topk} must be <= --num-experts "
                         f"{a.num_experts}")
    common.check_divides("--vision-num-attention-heads", a.vision_num_attention_heads,
                         "--vision-hidden-size", a.vision_hidden_size)
    # Pixel shuffle merges 2x2 patches, so each side must hold an even number of patches.
    for flag, side in (("--img-h", a.img_h), ("--img-w", a.img_w)):
        if side % (2 * a.patch_dim):
            raise ValueError(f"{flag} {side} must be a multiple of 2 x --patch-dim {a.patch_dim}")
        if side > a.max_img_size:
            raise ValueError(f"{flag} {side} must be <= --max-img-size {a.max_img_size}")
    if a.max_img_size % a.patch_dim:
        raise ValueError(f"--max-img-size {a.max_img_size} must be a multiple of --patch-dim "
                         f"{a.patch_dim}")


def facts(cfg: NemotronVLMConfig) -> ModelFacts:
    a = cfg.arch
    te = cfg.transformer_impl == "transformer_engine"
    moe_layers = a.hybrid_layer_pattern.count("E")
    vit, projection = vision_params(a, cfg.vision_projection_type)
    return ModelFacts(llm_num_layers=len(a.hybrid_layer_pattern),
                      llm_num_heads=a.num_attention_heads, llm_num_query_groups=a.num_query_groups,
                      encoder_num_heads=a.vision_num_attention_heads,
                      num_experts=a.num_experts if moe_layers else 0, llm_moe_layers=moe_layers,
                      moe_aux_losses=("seq_load_balancing_loss",) if moe_layers else (),
                      moe_activation="squared_relu" if moe_layers else "",
                      moe_capacity_factor=cfg.moe_expert_capacity_factor if moe_layers else None,
                      moe_pad_to_capacity=bool(moe_layers) and cfg.moe_pad_expert_input_to_capacity,
                      uses_mamba="M" in a.hybrid_layer_pattern,
                      encoder_params=vit + projection, llm_params=language_params(a),
                      llm_expert_params=moe_layers * a.num_experts * 2 * a.hidden_size
                      * a.moe_ffn_hidden_size,
                      llm_hidden_size=a.hidden_size, encoder_hidden_size=a.vision_hidden_size,
                      encoder_num_layers=a.vision_num_layers,
                      encoder_tokens_per_image=(a.img_h // a.patch_dim) * (a.img_w // a.patch_dim)
                      + a.class_token_len, transformer_impl=cfg.transformer_impl,
                      sequence_parallel=True,
                      llm_trainable_params=0 if cfg.freeze_lm else None,
                      encoder_trainable_params=(0 if cfg.freeze_vit else vit)
                      + (0 if cfg.freeze_projection else projection),
                      llm_vocab_size=a.vocab_size,
                      llm_activation_bytes_per_token=language_activation_bytes(a),
                      llm_expert_activation_bytes_per_token=moe_layers * expert_activation_bytes(a),
                      encoder_activation_bytes_per_image=vision_activation_bytes(
                          a, vit_trains=not cfg.freeze_vit, fused=te),
                      llm_attention_score_heads=0 if te else a.hybrid_layer_pattern.count("*")
                      * a.num_attention_heads)


def language_params(a: Architecture) -> int:
    h, v = a.hidden_size, a.vocab_size
    d_inner = a.mamba_num_heads * a.mamba_head_dim
    bc = 2 * a.mamba_num_groups * a.mamba_state_dim
    per_layer = {
        # norm, in_proj (z, x, B, C, dt), depthwise conv (weight k=4, bias), dt_bias, A_log, D,
        # gated RMSNorm, out_proj
        "M": h + h * (2 * d_inner + bc + a.mamba_num_heads) + (d_inner + bc) * 5
        + 3 * a.mamba_num_heads + d_inner + d_inner * h,
        # norm, fused QKV with grouped K/V, output projection; no biases
        "*": h + h * (a.num_attention_heads + 2 * a.num_query_groups) * a.kv_channels
        + a.num_attention_heads * a.kv_channels * h,
        # norm, router, routed experts (non-gated squared ReLU), shared expert
        "E": h + a.num_experts * h + a.num_experts * 2 * h * a.moe_ffn_hidden_size
        + 2 * h * a.moe_shared_expert_intermediate_size,
        # norm, fc1, fc2 (non-gated, no biases)
        "-": h + 2 * h * a.ffn_hidden_size,
    }
    # untied embedding and output layer, final norm
    return 2 * v * h + h + sum(per_layer[s] for s in a.hybrid_layer_pattern)


def language_activation_bytes(a: Architecture) -> float:
    """Bytes per token the layers keep for backward at 16-bit (memory.py): inputs of the fused
    norms and their outputs, each linear layer's input, what the fused kernels save (attention's
    output and fp32 log-sum-exp, the SSM scan's inputs); routed experts see each token top-k
    times, and the router reads an fp32 copy of its input."""
    h, d_inner = a.hidden_size, a.mamba_num_heads * a.mamba_head_dim
    xbc = d_inner + 2 * a.mamba_num_groups * a.mamba_state_dim
    in_proj = d_inner + xbc + a.mamba_num_heads
    per_layer = {
        # norm in/out, in_proj out, conv in/out, the scan's output, the gated norm's, out_proj's in
        "M": 2 * (2 * h + in_proj + 2 * xbc + 3 * d_inner),
        # norm in/out, QKV out, attention out (= the projection's input), log-sum-exp
        "*": 2 * (2 * h + (a.num_attention_heads + 2 * a.num_query_groups) * a.kv_channels
                  + a.num_attention_heads * a.kv_channels) + 4 * a.num_attention_heads,
        # norm in/out, fp32 router input and scores, permuted tokens, FC1 out, activation out and
        # the unpermuted output per routed copy, the shared expert's FC1 and activation outputs
        "E": 2 * 2 * h + 4 * h + 3 * 4 * a.num_experts + expert_activation_bytes(a)
        + 2 * 2 * a.moe_shared_expert_intermediate_size,
        "-": 2 * (2 * h + 2 * a.ffn_hidden_size),
    }
    # the embedding's output and the final norm's
    return 2 * 2 * h + sum(per_layer[s] for s in a.hybrid_layer_pattern)


def expert_activation_bytes(a: Architecture) -> float:
    """Per token and MoE layer: each of its top-k routed copies, FC1's output, the activation's
    output and the copy's output (padding to capacity scales this, memory.py)."""
    return 2 * a.moe_router_topk * (2 * a.hidden_size + 2 * a.moe_ffn_hidden_size)


def vision_activation_bytes(a: Architecture, *, vit_trains: bool, fused: bool) -> float:
    """Bytes per image kept for backward at 16-bit: the ViT's (only when it trains: a frozen ViT
    under a trainable projector keeps nothing) and the projector's, on its 2x2-shuffled tokens.
    ``fused``: TE's attention, which keeps no [n, n] scores."""
    c, f = a.vision_hidden_size, a.vision_ffn_hidden_size
    n = (a.img_h // a.patch_dim) * (a.img_w // a.patch_dim) + a.class_token_len
    # per ViT token: norm in/out twice, QKV out, attention out, FC1 out, GELU out; a row of scores
    scores = 0 if fused else 2 * a.vision_num_attention_heads * n
    vit = n * a.vision_num_layers * (2 * (6 * c + 2 * f) + 4 * a.vision_num_attention_heads + scores)
    # per shuffled token: RMSNorm in/out, FC1 out, activation out, the output
    projector = (n // 4) * 2 * (2 * 4 * c + 2 * a.vision_projection_ffn_hidden_size + a.hidden_size)
    return (vit if vit_trains else 0) + projector


def vision_params(a: Architecture, projection_type: str) -> Tuple[int, int]:
    """(RADIO ViT, projector) parameter counts."""
    c, f, p = a.vision_hidden_size, a.vision_ffn_hidden_size, a.patch_dim
    # two LayerNorms, QKV and projection with biases, MLP with biases
    layer = 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + 2 * c + (c * f + f) + (f * c + c)
    # class tokens, position-embedding table, patch embedding (no bias), layers
    vit = (a.class_token_len * c + (a.max_img_size // p) ** 2 * c + 3 * p * p * c
           + a.vision_num_layers * layer)
    # the input RMSNorm, then the linear layers (no biases)
    if projection_type == "mlp":
        projection = 4 * c + 4 * c * a.vision_projection_ffn_hidden_size \
            + a.vision_projection_ffn_hidden_size * a.hidden_size
    else:
        projection = 4 * c + 4 * c * a.hidden_size
    return vit, projection


def flops(cfg: NemotronVLMConfig, work: StepWork) -> StepFlops:
    """At --dynamic-resolution each image is counted at the fixed --img-h x --img-w, the largest
    area an image is scaled to (task_encoder.dynamic_size), so the encoder's count is an upper bound."""
    a = cfg.arch
    c, p, heads = a.vision_hidden_size, a.patch_dim, a.vision_num_attention_heads
    patches = (a.img_h // p) * (a.img_w // p)
    n = patches + a.class_token_len
    vit_trains = not cfg.freeze_vit
    vit_layer = F.attention(1, n, hidden=c, heads=heads, groups=heads, head_dim=c // heads) \
        + F.mlp(n, c, a.vision_ffn_hidden_size)
    tokens = patches // 4  # pixel shuffle: 2x2 patches per token, 4c wide
    projector = (F.mlp(tokens, 4 * c, a.vision_projection_ffn_hidden_size, a.hidden_size)
                 if cfg.vision_projection_type == "mlp" else F.linear(tokens, 4 * c, a.hidden_size))
    encoder = work.images * (
        # megatron's linear computes its input gradient whenever a gradient passes, images or not
        F.train(F.linear(patches, 3 * p * p, c), weights=vit_trains, inputs=vit_trains)
        + F.train(a.vision_num_layers * vit_layer, weights=vit_trains, inputs=vit_trains)
        + F.train(projector, weights=not cfg.freeze_projection,
                  inputs=vit_trains or not cfg.freeze_projection))
    h, s, seqs = a.hidden_size, work.seq_length, work.sequences
    t = seqs * s
    per_layer = {
        "M": F.mamba(seqs, s, h, heads=a.mamba_num_heads, head_dim=a.mamba_head_dim,
                     state=a.mamba_state_dim, groups=a.mamba_num_groups),
        "*": F.attention(seqs, s, hidden=h, heads=a.num_attention_heads,
                         groups=a.num_query_groups, head_dim=a.kv_channels),
        "E": F.moe(t, h, experts=a.num_experts, topk=a.moe_router_topk, ffn=a.moe_ffn_hidden_size,
                   shared_ffn=a.moe_shared_expert_intermediate_size),
        "-": F.mlp(t, h, a.ffn_hidden_size),
    }
    forward = sum((per_layer[x] for x in a.hybrid_layer_pattern), F.Work()) \
        + F.linear(t, h, a.vocab_size)
    encoder_trains = work.images > 0 and (vit_trains or not cfg.freeze_projection)
    llm = F.train(forward, weights=not cfg.freeze_lm, inputs=not cfg.freeze_lm or encoder_trains)
    return StepFlops(encoder=encoder, llm=llm)


def data_spec(cfg: NemotronVLMConfig) -> DataSpec:
    a = cfg.arch
    return DataSpec(vocab_size=a.vocab_size, image_token_id=cfg.image_token_id,
                    image_tokens=cfg.image_tokens, image_shape=(3, a.img_h, a.img_w),
                    dynamic_resolution=cfg.dynamic_resolution, patch_dim=a.patch_dim,
                    max_image_side=a.max_img_size, pixel_mean=CLIP_MEAN, pixel_std=CLIP_STD)


def _kernel_fields(kernels: Optional[KernelChoices], **branch) -> dict:
    # None (tests and tools that build one branch): megatron-core's defaults, which are also
    # those of the trainer's default kernel options
    return {} if kernels is None else kernels.transformer_fields(**branch)


def language_config(cfg: NemotronVLMConfig, *, tp: int, pp: int, ep: int, expt_tp: int,
                    dtype: torch.dtype, kernels: Optional[KernelChoices] = None,
                    sequence_parallel: bool = False):
    from megatron.core.activations import squared_relu

    a = cfg.arch
    te = cfg.transformer_impl == "transformer_engine"
    return common.transformer_config(
        tp=tp, pp=pp, dtype=dtype, kernel_fields=_kernel_fields(kernels, fp8=True, graphs=True),
        num_layers=len(a.hybrid_layer_pattern),
        hidden_size=a.hidden_size, num_attention_heads=a.num_attention_heads,
        num_query_groups=a.num_query_groups, kv_channels=a.kv_channels,
        ffn_hidden_size=a.ffn_hidden_size, normalization="RMSNorm", add_bias_linear=False,
        activation_func=squared_relu, gated_linear_unit=False, init_method_std=0.0173,
        mamba_num_heads=a.mamba_num_heads, mamba_head_dim=a.mamba_head_dim,
        mamba_state_dim=a.mamba_state_dim, mamba_num_groups=a.mamba_num_groups,
        # Mamba's fused path (conv, scan, gate and norm in one autograd function that recomputes
        # in backward) needs causal-conv1d's CUDA extension; without it the unfused path runs.
        use_mamba_mem_eff_path=(specs.causal_conv1d_available() if kernels is None
                                else kernels.use_mamba_mem_eff_path),
        num_moe_experts=a.num_experts, moe_ffn_hidden_size=a.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=a.moe_shared_expert_intermediate_size,
        moe_router_topk=a.moe_router_topk, moe_router_score_function="sigmoid",
        moe_router_topk_scaling_factor=a.moe_router_topk_scaling_factor,
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=cfg.moe_router_bias_update_rate,
        moe_router_dtype="fp32", moe_router_load_balancing_type="seq_aux_loss",
        # TE's spec builds the experts as one grouped GEMM (TEGroupedMLP); local ones loop.
        moe_aux_loss_coeff=cfg.moe_aux_loss_coeff, moe_grouped_gemm=te,
        moe_expert_capacity_factor=cfg.moe_expert_capacity_factor,
        moe_pad_expert_input_to_capacity=cfg.moe_pad_expert_input_to_capacity,
        moe_token_drop_policy=cfg.moe_token_drop_policy,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=expt_tp,
        sequence_parallel=sequence_parallel)


def language_spec(cfg: NemotronVLMConfig, *, pg_collection, tp: int, pp: int, ep: int,
                  expt_tp: int, dtype: torch.dtype, seq_length: int,
                  kernels: Optional[KernelChoices] = None, sequence_parallel: bool = False):
    from megatron.core.models.hybrid.hybrid_model import HybridModel
    from megatron.core.transformer.spec_utils import ModuleSpec

    pp_rank = pg_collection.pp.rank() if pg_collection is not None else 0
    return ModuleSpec(module=HybridModel, params=dict(
        config=language_config(cfg, tp=tp, pp=pp, ep=ep, expt_tp=expt_tp, dtype=dtype,
                               kernels=kernels, sequence_parallel=sequence_parallel),
        hybrid_stack_spec=specs.hybrid_stack_spec(cfg.transformer_impl,
                                                  num_experts=cfg.arch.num_experts),
        vocab_size=cfg.arch.vocab_size, max_sequence_length=seq_length,
        hybrid_layer_pattern=cfg.arch.hybrid_layer_pattern, pre_process=pp_rank == 0,
        post_process=pp_rank == pp - 1, share_embeddings_and_output_weights=False,
        position_embedding_type="none", pg_collection=pg_collection,
        # MimoModel splits the combined text and image embeddings over the sequence itself
        scatter_embedding_sequence_parallel=False))


def encoder_spec(cfg: NemotronVLMConfig, *, pg_collection, tp: int, dtype: torch.dtype,
                 kernels: Optional[KernelChoices] = None):
    from megatron.core.activations import squared_relu
    from megatron.core.models.mimo.submodules.vision import VisionModalitySubmodules
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from examples.mimo.model_providers.radio_encoder import RadioEncoder, normed_projector

    a = cfg.arch
    vit_config = common.transformer_config(
        tp=tp, pp=1, dtype=dtype, kernel_fields=_kernel_fields(kernels, fp8=False),
        num_layers=a.vision_num_layers,
        hidden_size=a.vision_hidden_size, ffn_hidden_size=a.vision_ffn_hidden_size,
        num_attention_heads=a.vision_num_attention_heads, add_bias_linear=True, add_qkv_bias=True,
        activation_func=torch.nn.functional.gelu, gated_linear_unit=False,
        normalization="LayerNorm", layernorm_epsilon=1e-6, bias_activation_fusion=False,
        bias_dropout_fusion=False, attention_softmax_in_fp32=True)
    projector_config = common.transformer_config(
        tp=tp, pp=1, dtype=dtype, kernel_fields=None if kernels is None else kernels.init_fields(),
        num_layers=1, hidden_size=a.hidden_size,
        ffn_hidden_size=a.vision_projection_ffn_hidden_size, num_attention_heads=tp,  # no attention; must divide by TP
        add_bias_linear=False, activation_func=squared_relu, gated_linear_unit=False)
    column, row = specs.projector_linears(cfg.transformer_impl)
    radio = ModuleSpec(module=RadioEncoder, params=dict(
        config=vit_config, layer_spec=specs.vit_layer_spec(cfg.transformer_impl),
        img_h=a.img_h, img_w=a.img_w,
        patch_dim=a.patch_dim, class_token_len=a.class_token_len, max_img_size=a.max_img_size,
        dynamic_resolution=cfg.dynamic_resolution, pg_collection=pg_collection))
    projector = ModuleSpec(module=normed_projector(), params=dict(
        config=projector_config,
        submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row),
        projector_type=cfg.vision_projection_type, input_size=4 * a.vision_hidden_size,
        tp_group=pg_collection.tp if pg_collection is not None else None))
    return ModuleSpec(module=VisionModalitySubmodules, params={"pg_collection": pg_collection},
                      submodules={"encoders": {VIT_ENCODER: radio}, "input_projections": [projector]})


def module_config(module) -> object:
    return common.module_config(module, VIT_ENCODER)


def build(cfg: NemotronVLMConfig, *, topology, dtype: torch.dtype, seq_length: int,
          device: torch.device, kernels: KernelChoices):
    """Build this rank's part of the non-colocated MimoModel (unwrapped, on the current device)."""
    # Checked on every rank, so all of them stop with the same error.
    if "M" in cfg.arch.hybrid_layer_pattern:
        if device.type != "cuda":
            raise ValueError(f"--model-preset {cfg.preset}: Mamba layers (M in "
                             f"{cfg.arch.hybrid_layer_pattern!r}) run mamba-ssm Triton kernels, "
                             f"which need CUDA; use an attention/MoE pattern such as tiny-cpu's")
        if not specs.mamba_available():
            raise ValueError("Mamba layers need mamba-ssm (its Triton kernels); install it with "
                             "examples/mimo/scripts/setup_env.sh or the wheelhouse")
    grid = topology.grid_config
    model = common.assemble(
        topology=topology, image_token_id=cfg.image_token_id,
        language_spec=lambda pgc: language_spec(
            cfg, pg_collection=pgc, tp=grid.llm_tp, pp=grid.llm_pp, ep=grid.llm_ep,
            expt_tp=grid.llm_expt_tp, dtype=dtype, seq_length=seq_length, kernels=kernels,
            sequence_parallel=grid.sequence_parallel),
        encoder_spec=lambda pgc: encoder_spec(cfg, pg_collection=pgc, tp=grid.encoder_tp,
                                              dtype=dtype, kernels=kernels))
    common.freeze(model, lm=cfg.freeze_lm, vit=cfg.freeze_vit, projection=cfg.freeze_projection)
    return model
