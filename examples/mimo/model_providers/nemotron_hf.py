"""The Nemotron VLM and Hugging Face transformers' models of the same family: ``nemotron_h`` (the
hybrid Mamba/attention/MoE LLM), ``radio`` (the RADIO ViT) and ``nemotron_h_omni`` (both, with
the projector; its audio branch is not imported, and said so).

Two things live here: the architecture a folder's config.json describes (``architecture``), and
the recipes that map each tensor of ours to the HF tensors it is made of (``recipes``), which
hf_checkpoint.py uses both ways. Names are those transformers' ``save_pretrained`` writes (the
released checkpoints' own: ``backbone.``, per-expert tensors, RADIO's fused ``attn.qkv``).

Layouts that differ: megatron-core's fused QKV interleaves q, k and v per query group (HF keeps
them apart, RADIO keeps all q, then all k, then all v); megatron-core splits Mamba's in_proj and
conv1d into their z/x/B/C/dt parts; each expert is one slice of a stacked tensor. The rest are
the same tensors under other names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from examples.mimo.model_providers.hf_checkpoint import Experts, Rows, is_hf_folder, read_config

LAYER_KINDS = {"linear_attention": "M", "full_attention": "*", "moe": "E", "mlp": "-"}
OMNI, LLM, VIT = "nemotron_h_omni", "nemotron_h", "radio"


@dataclass(frozen=True)
class Sources:
    """The folders each part is imported from and the prefix of its names there."""

    language: Optional[str] = None
    vision: Optional[str] = None  # the ViT, and with an omni folder the projector too
    language_prefix: str = ""
    vision_prefix: str = ""
    projector: bool = False  # the folder holds the projector (omni)
    configs: Tuple[Tuple[str, dict], ...] = ()  # (folder, config.json) read

    @property
    def any(self) -> bool:
        return self.language is not None or self.vision is not None


def sources(*, whole: Optional[str], language: Optional[str], vision: Optional[str]) -> Sources:
    """``whole``: --load-from-hf (an omni folder); ``language``/``vision``: --load-*-from when
    they are HF folders. ValueError (one line) on a wrong model type."""
    if whole is not None:
        if language is not None or vision is not None:
            raise ValueError("--load-from-hf loads both branches; drop --load-language-from and "
                             "--load-vision-from")
        config = read_config(whole, "--load-from-hf")
        _expect(config, OMNI, "--load-from-hf", whole)
        return Sources(language=whole, vision=whole, language_prefix="language_model.",
                       vision_prefix="vision_model.", projector=True,
                       configs=((whole, config),))
    found = []
    out = {}
    for flag, path, kind in (("--load-language-from", language, LLM),
                             ("--load-vision-from", vision, VIT)):
        if not is_hf_folder(path):
            continue
        config = read_config(path, flag)
        if config.get("model_type") == OMNI:  # one branch out of a whole VLM
            out[flag] = (path, "language_model." if kind == LLM else "vision_model.")
        else:
            _expect(config, kind, flag, path)
            out[flag] = (path, "")
        found.append((path, config))
    lang = out.get("--load-language-from", (None, ""))
    vis = out.get("--load-vision-from", (None, ""))
    return Sources(language=lang[0], vision=vis[0], language_prefix=lang[1],
                   vision_prefix=vis[1], configs=tuple(found))


def _expect(config: dict, kind: str, flag: str, path: str) -> None:
    found = config.get("model_type")
    if found != kind:
        raise ValueError(f"{flag} {path}: config.json has model_type {found!r}, not {kind!r}")


def _config(src: Sources, path: str) -> dict:
    return dict(src.configs)[path]


def language_config(src: Sources) -> dict:
    config = _config(src, src.language)
    return config["text_config"] if config.get("model_type") == OMNI else config


def vision_config(src: Sources) -> dict:
    config = _config(src, src.vision)
    return config["vision_config"] if config.get("model_type") == OMNI else config


def architecture(src: Sources) -> Tuple[Dict[str, object], Dict[str, object]]:
    """(Architecture fields, other NemotronVLMConfig fields) the folders' config.json give.
    ValueError naming the field for what this provider cannot represent."""
    arch, extra = {}, {}
    if src.language is not None:
        t = language_config(src)
        where = f"{src.language}/config.json"
        kinds = t.get("layers_block_type")
        if kinds is None and "hybrid_override_pattern" in t:
            pattern = t["hybrid_override_pattern"]
        else:
            unknown = sorted(set(kinds or ()) - set(LAYER_KINDS))
            if not kinds or unknown:
                raise ValueError(f"{where}: layers_block_type {kinds!r} (known: {sorted(LAYER_KINDS)})")
            pattern = "".join(LAYER_KINDS[k] for k in kinds)
        _refuse(where, t, moe_latent_size=None, n_group=1, norm_topk_prob=True, mlp_bias=False,
                use_bias=False, use_conv_bias=True, conv_kernel=4, layer_norm_epsilon=1e-5,
                mlp_hidden_act="relu2", mamba_hidden_act="silu", num_nextn_predict_layers=0)
        arch.update(
            hybrid_layer_pattern=pattern, hidden_size=t["hidden_size"],
            num_attention_heads=t["num_attention_heads"],
            num_query_groups=t["num_key_value_heads"], kv_channels=t["head_dim"],
            ffn_hidden_size=t["intermediate_size"], num_experts=t["n_routed_experts"],
            moe_ffn_hidden_size=t["moe_intermediate_size"],
            moe_shared_expert_intermediate_size=t["moe_shared_expert_intermediate_size"],
            moe_router_topk=t["num_experts_per_tok"], mamba_num_heads=t["mamba_num_heads"],
            mamba_head_dim=t["mamba_head_dim"], mamba_state_dim=t["ssm_state_size"],
            mamba_num_groups=t["n_groups"], vocab_size=t["vocab_size"],
            moe_router_topk_scaling_factor=float(t.get("routed_scaling_factor", 1.0)))
    if src.vision is not None:
        v = vision_config(src)
        where = f"{src.vision}/config.json"
        _refuse(where, v, use_swiglu_ffn=False, qkv_bias=True, layerscale_value=1.0,
                hidden_act="gelu", layer_norm_eps=1e-6, num_channels=3)
        arch.update(
            vision_num_layers=v["num_hidden_layers"], vision_hidden_size=v["hidden_size"],
            vision_ffn_hidden_size=int(v["hidden_size"] * v.get("mlp_ratio", 4.0)),
            vision_num_attention_heads=v["num_attention_heads"], patch_dim=v["patch_size"],
            class_token_len=v.get("num_cls_tokens", 3) + v.get("num_registers", 7),
            max_img_size=v["max_img_size"])
        whole = _config(src, src.vision)
        if src.projector:
            _refuse(f"{src.vision}/config.json", whole, downsample_ratio=0.5)
            if whole.get("vision_hidden_size", v["hidden_size"]) != v["hidden_size"]:
                raise ValueError(f"{src.vision}/config.json: vision_hidden_size "
                                 f"{whole['vision_hidden_size']} != vision_config.hidden_size "
                                 f"{v['hidden_size']}")
            arch["vision_projection_ffn_hidden_size"] = whole["projector_hidden_size"]
            if whole.get("force_image_size"):
                arch["img_h"] = arch["img_w"] = whole["force_image_size"]
            if whole.get("image_token_id") is not None:
                extra["image_token_id"] = whole["image_token_id"]
    return arch, extra


def _refuse(where: str, config: dict, **supported) -> None:
    for key, want in supported.items():
        if key in config and config[key] != want:
            raise ValueError(f"{where}: {key} {config[key]!r} is not supported by this provider "
                             f"(only {want!r})")


def audio_note(src: Sources) -> Optional[str]:
    if src.projector and _config(src, src.vision).get("audio_config"):
        return (f"{src.vision}: its audio branch (sound_encoder.*, sound_projection.*) is not "
                f"imported: this model has no audio input")
    return None


# ---- recipes -------------------------------------------------------------------------------------

def language_recipes(arch, *, prefix: str, transformer_impl: str) -> Dict[str, object]:
    """Our language branch's keys -> HF tensors, for the whole model (every layer)."""
    te = transformer_impl == "transformer_engine"
    h, nh, ng, hd = arch.hidden_size, arch.num_attention_heads, arch.num_query_groups, \
        arch.kv_channels
    d_inner = arch.mamba_num_heads * arch.mamba_head_dim
    gn = arch.mamba_num_groups * arch.mamba_state_dim
    b = f"{prefix}backbone."
    out = {"embedding.word_embeddings.weight": Rows(((f"{b}embeddings.weight", 0, arch.vocab_size),)),
           "decoder.final_norm.weight": Rows(((f"{b}norm_f.weight", 0, h),)),
           "output_layer.weight": Rows(((f"{prefix}lm_head.weight", 0, arch.vocab_size),))}

    def one(name, count):
        return Rows(((name, 0, count),))

    for i, kind in enumerate(arch.hybrid_layer_pattern):
        ours, hf = f"decoder.layers.{i}.", f"{b}layers.{i}."
        mixer = f"{hf}mixer."
        norm = one(f"{hf}norm.weight", h)
        if kind == "M":
            out[f"{ours}mixer.in_proj.layer_norm_weight" if te else f"{ours}norm.weight"] = norm
            at = 0
            for part, count in (("z", d_inner), ("x", d_inner), ("B", gn), ("C", gn),
                                ("dt", arch.mamba_num_heads)):
                out[f"{ours}mixer.in_proj.weight.{part}"] = Rows(((f"{mixer}in_proj.weight", at,
                                                                   count),))
                at += count
            for what in ("weight", "bias"):
                at = 0
                for part, count in (("x", d_inner), ("B", gn), ("C", gn)):
                    out[f"{ours}mixer.conv1d.{what}.{part}"] = Rows(((f"{mixer}conv1d.{what}", at,
                                                                     count),))
                    at += count
            for name in ("dt_bias", "A_log", "D"):
                out[f"{ours}mixer.{name}"] = one(f"{mixer}{name}", arch.mamba_num_heads)
            out[f"{ours}mixer.norm.weight"] = one(f"{mixer}norm.weight", d_inner)
            out[f"{ours}mixer.out_proj.weight"] = one(f"{mixer}out_proj.weight", h)
        elif kind == "*":
            out[f"{ours}self_attention.linear_qkv.layer_norm_weight" if te
                else f"{ours}input_layernorm.weight"] = norm
            per = nh // ng
            out[f"{ours}self_attention.linear_qkv.weight"] = Rows(tuple(
                part for g in range(ng) for part in (
                    (f"{mixer}q_proj.weight", g * per * hd, per * hd),
                    (f"{mixer}k_proj.weight", g * hd, hd), (f"{mixer}v_proj.weight", g * hd, hd))))
            out[f"{ours}self_attention.linear_proj.weight"] = one(f"{mixer}o_proj.weight", h)
        elif kind == "E":
            out[f"{ours}pre_mlp_layernorm.weight"] = norm
            out[f"{ours}mlp.router.weight"] = one(f"{mixer}gate.weight", arch.num_experts)
            out[f"{ours}mlp.router.expert_bias"] = one(f"{mixer}gate.e_score_correction_bias",
                                                       arch.num_experts)
            for fc, proj, count in (("linear_fc1", "up_proj", arch.moe_ffn_hidden_size),
                                    ("linear_fc2", "down_proj", h)):
                out[f"{ours}mlp.experts.experts.{fc}.weight"] = Experts(tuple(
                    one(f"{mixer}experts.{e}.{proj}.weight", count)
                    for e in range(arch.num_experts)))
            shared = arch.moe_shared_expert_intermediate_size
            out[f"{ours}mlp.shared_experts.linear_fc1.weight"] = one(
                f"{mixer}shared_experts.up_proj.weight", shared)
            out[f"{ours}mlp.shared_experts.linear_fc2.weight"] = one(
                f"{mixer}shared_experts.down_proj.weight", h)
        else:  # "-"
            out[f"{ours}mlp.linear_fc1.layer_norm_weight" if te
                else f"{ours}pre_mlp_layernorm.weight"] = norm
            out[f"{ours}mlp.linear_fc1.weight"] = one(f"{mixer}up_proj.weight", arch.ffn_hidden_size)
            out[f"{ours}mlp.linear_fc2.weight"] = one(f"{mixer}down_proj.weight", h)
    return out


def vision_recipes(arch, *, prefix: str, transformer_impl: str, projector: bool,
                   vit: str = "radio") -> Dict[str, object]:
    """Our vision branch's keys (ViT, and the projector when the folder has it) -> HF tensors."""
    te = transformer_impl == "transformer_engine"
    c, hd = arch.vision_hidden_size, arch.vision_hidden_size // arch.vision_num_attention_heads
    g = f"{prefix}radio_model.model."
    ours = f"encoders.{vit}.vit."
    out = {f"{ours}class_token": Rows(((f"{g}patch_generator.cls_token.token", 0,
                                         arch.class_token_len),)),
           f"{ours}position_embeddings": Rows(((f"{g}patch_generator.pos_embed", 0, 1),)),
           f"{ours}embedder.weight": Rows(((f"{g}patch_generator.embedder.weight", 0, c),))}
    for i in range(arch.vision_num_layers):
        layer, hf = f"{ours}decoder.layers.{i}.", f"{g}blocks.{i}."
        norm1 = f"{layer}self_attention.linear_qkv.layer_norm_" if te else f"{layer}input_layernorm."
        norm2 = f"{layer}mlp.linear_fc1.layer_norm_" if te else f"{layer}pre_mlp_layernorm."
        for what in ("weight", "bias"):
            out[f"{norm1}{what}"] = Rows(((f"{hf}norm1.{what}", 0, c),))
            out[f"{norm2}{what}"] = Rows(((f"{hf}norm2.{what}", 0, c),))
            # RADIO stores all heads' q, then k, then v; megatron-core [q_h, k_h, v_h] per head
            out[f"{layer}self_attention.linear_qkv.{what}"] = Rows(tuple(
                (f"{hf}attn.qkv.{what}", part * c + head * hd, hd)
                for head in range(arch.vision_num_attention_heads) for part in range(3)))
            out[f"{layer}self_attention.linear_proj.{what}"] = Rows(((f"{hf}attn.proj.{what}", 0, c),))
            out[f"{layer}mlp.linear_fc1.{what}"] = Rows(((f"{hf}mlp.fc1.{what}", 0,
                                                         arch.vision_ffn_hidden_size),))
            out[f"{layer}mlp.linear_fc2.{what}"] = Rows(((f"{hf}mlp.fc2.{what}", 0, c),))
    if projector:
        out["input_projections.0.norm.weight"] = Rows((("mlp1.0.weight", 0, 4 * c),))
        out["input_projections.0.encoder.linear_fc1.weight"] = Rows((
            ("mlp1.1.weight", 0, arch.vision_projection_ffn_hidden_size),))
        out["input_projections.0.encoder.linear_fc2.weight"] = Rows((
            ("mlp1.3.weight", 0, arch.hidden_size),))
    return out


def unused(src: Sources, folder: str) -> Callable[[str], bool]:
    """Which tensors of ``folder`` are deliberately not imported: layer scales (checked to be 1 by
    ``layer_scale_problems``: transformers applies them as identities), RADIO's summary indices
    and pixel normaliser (the data pipeline normalises, as the omni processor does), the video
    embedder (no video input), the audio branch, and of an omni folder the branch not asked for."""
    skip = []
    if folder == src.vision:
        g = f"{src.vision_prefix}radio_model."
        skip += [f"{g}summary_idxs", f"{g}input_conditioner.",
                 f"{g}model.patch_generator.video_embedder."]
    if _config(src, folder).get("model_type") == OMNI:
        skip += ["sound_encoder.", "sound_projection."]
        if folder != src.language:
            skip.append("language_model.")
        if folder != src.vision:
            skip.append("vision_model.")
        if not src.projector:
            skip.append("mlp1.")
    prefixes = tuple(skip)
    return lambda name: name.startswith(prefixes) or _is_layer_scale(name)


def _is_layer_scale(name: str) -> bool:
    return ".layer_scale" in name and name.endswith(".lambda1")


def layer_scale_problems(reader) -> List[str]:
    """A RADIO layer scale other than 1 is not the identity transformers treats it as."""
    import torch

    bad = [n for n in reader.names() if _is_layer_scale(n)
           and not torch.all(reader.read(n, (slice(None),)) == 1)]
    return [f"{reader.path}: RADIO layer scales other than 1 are not supported ({bad[:4]}): "
            f"transformers applies them as identities"] if bad else []


# ---- export --------------------------------------------------------------------------------------

def export_layout(arch, *, transformer_impl: str, llm_only: bool, image_token_id: int
                  ) -> Tuple[Dict[str, Dict[str, object]], dict]:
    """({branch: recipes}, config.json) of the folder export writes: a ``nemotron_h_omni`` VLM, or
    with ``llm_only`` a ``nemotron_h`` LLM. RADIO's class tokens are written as cls tokens and
    registers (the split is not kept: transformers drops both from the features), its video
    embedder is left to transformers' initialisation (no video input here)."""
    symbols = {v: k for k, v in LAYER_KINDS.items()}
    text = dict(
        model_type=LLM, architectures=["NemotronHForCausalLM"], vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups, head_dim=arch.kv_channels,
        intermediate_size=arch.ffn_hidden_size,
        layers_block_type=[symbols[s] for s in arch.hybrid_layer_pattern],
        n_routed_experts=arch.num_experts, num_experts_per_tok=arch.moe_router_topk,
        moe_intermediate_size=arch.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=arch.moe_shared_expert_intermediate_size,
        mamba_num_heads=arch.mamba_num_heads, mamba_head_dim=arch.mamba_head_dim,
        ssm_state_size=arch.mamba_state_dim, n_groups=arch.mamba_num_groups,
        routed_scaling_factor=arch.moe_router_topk_scaling_factor, n_group=1, topk_group=1,
        norm_topk_prob=True, mlp_hidden_act="relu2", layer_norm_epsilon=1e-5,
        tie_word_embeddings=False)
    language = language_recipes(arch, prefix="" if llm_only else "language_model.",
                                transformer_impl=transformer_impl)
    if llm_only:
        return {"language": language}, text
    cls = min(2, arch.class_token_len)
    vision = dict(
        model_type=VIT, hidden_size=arch.vision_hidden_size,
        num_hidden_layers=arch.vision_num_layers,
        num_attention_heads=arch.vision_num_attention_heads,
        mlp_ratio=arch.vision_ffn_hidden_size / arch.vision_hidden_size,
        patch_size=arch.patch_dim, max_img_size=arch.max_img_size, num_cls_tokens=cls,
        num_registers=arch.class_token_len - cls, summary_idxs=list(range(cls)),
        video_temporal_patch_size=2)
    config = dict(model_type=OMNI, architectures=["NemotronH_Omni_Reasoning_V3"],
                  text_config=text, vision_config=vision, downsample_ratio=0.5,
                  projector_hidden_size=arch.vision_projection_ffn_hidden_size,
                  vision_hidden_size=arch.vision_hidden_size,
                  force_image_size=arch.img_h if arch.img_h == arch.img_w else None,
                  image_token_id=image_token_id)
    return {"language": language,
            "images": vision_recipes(arch, prefix="vision_model.", transformer_impl=transformer_impl,
                                     projector=True)}, config
