"""Tiny random Hugging Face models made by transformers itself (nothing downloaded), saved with
save_pretrained, for the import and export tests.

transformers initialises these with std 0.02 and unit norms: logits then sit near log(vocab) for
any weights, and a wrong mapping could pass. ``spice`` redraws every tensor at the scale of its
fan-in (norms around 1, router biases that change the routing), so each weight matters.
"""

from __future__ import annotations

import torch

# The shape of the nemotron_moe_vlm provider's tiny-cpu preset (attention + MoE: runs on CPU).
TEXT = dict(model_type="nemotron_h", vocab_size=256, hidden_size=64, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, intermediate_size=128, mlp_hidden_act="relu2",
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
            moe_shared_expert_intermediate_size=128, n_group=1, topk_group=1,
            norm_topk_prob=True, routed_scaling_factor=2.5, tie_word_embeddings=False,
            layers_block_type=["full_attention", "moe", "full_attention", "moe"],
            mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16)
VISION = dict(model_type="radio", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              mlp_ratio=2.0, patch_size=8, max_img_size=64, num_cls_tokens=1, num_registers=1,
              video_temporal_patch_size=2)
OMNI = dict(force_image_size=32, projector_hidden_size=128, vision_hidden_size=32,
            image_token_id=255)


@torch.no_grad()
def spice(model: torch.nn.Module, seed: int) -> None:
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g, device=device)

    for name, p in model.named_parameters():
        if "layer_scale" in name:
            continue
        if "norm" in name and p.dim() == 1 and not name.endswith("bias"):
            p.copy_(1 + 0.2 * randn(p.shape))
        elif p.dim() == 1:
            p.copy_(0.1 * randn(p.shape))
        else:
            p.copy_(randn(p.shape) / p.shape[-1] ** 0.5)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.3 * randn(b.shape))


def omni(path, *, seed: int = 0, **text) -> str:
    from transformers.models.nemotron_h_omni import configuration_nemotron_h_omni as oc
    from transformers.models.nemotron_h_omni import modeling_nemotron_h_omni as om

    cfg = oc.NemotronH_Omni_Reasoning_V3_Config(text_config={**TEXT, **text}, vision_config=VISION,
                                                **OMNI)
    model = om.NemotronH_Omni_Reasoning_V3._from_config(cfg, attn_implementation="eager",
                                                         dtype=torch.float32)
    spice(model, seed)
    model.save_pretrained(str(path))
    return str(path)


def nemotron_h(path, *, seed: int = 0, device: str = "cpu", dtype=torch.float32,
               max_shard_size="5GB", **text) -> str:
    from transformers import NemotronHConfig, NemotronHForCausalLM

    fields = {k: v for k, v in {**TEXT, **text}.items() if k != "model_type"}
    with torch.device(device):
        model = NemotronHForCausalLM._from_config(NemotronHConfig(**fields), dtype=dtype)
    spice(model, seed)
    model.save_pretrained(str(path), max_shard_size=max_shard_size)
    return str(path)


def radio(path, *, seed: int = 0) -> str:
    from transformers.models.radio import RadioConfig, RadioModel

    fields = {k: v for k, v in VISION.items() if k not in ("model_type", "video_temporal_patch_size")}
    model = RadioModel(RadioConfig(**fields))
    spice(model, seed)
    model.save_pretrained(str(path))
    return str(path)


def load_omni(path):
    from transformers.models.nemotron_h_omni import modeling_nemotron_h_omni as om

    return om.NemotronH_Omni_Reasoning_V3.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager",
        experts_implementation="eager").eval()


@torch.no_grad()
def omni_loss(model, samples, *, patch_dim: int, image_token_id: int) -> float:
    """transformers' loss of ``samples`` (the mock data's dicts: input_ids, labels, loss_mask,
    image [3, H, W] or None), averaged over their loss tokens as the trainer averages a global
    batch. Images go in as transformers' processor hands them over: packed (c, y, x) patches."""
    import torch.nn.functional as F

    from examples.mimo.images import patchify

    total, count = 0.0, 0.0
    for s in samples:
        ids = s["input_ids"][None]
        embeds = model.language_model.get_input_embeddings()(ids)
        if s["image"] is not None:
            image = s["image"]
            grid = torch.tensor([[image.shape[1] // patch_dim, image.shape[2] // patch_dim]])
            features = torch.cat(model.get_image_features(
                pixel_values=patchify(image, patch_dim), image_grid_hw=grid).pooler_output)
            mask = (ids == image_token_id)[..., None].expand_as(embeds)
            embeds = embeds.masked_scatter(mask, features.to(embeds.dtype))
        logits = model.language_model(inputs_embeds=embeds).logits.float()[0]
        loss = F.cross_entropy(logits, s["labels"], reduction="none")
        total += float((loss * s["loss_mask"]).sum())
        count += float(s["loss_mask"].sum())
    return total / count


@torch.no_grad()
def llm_loss(model, samples) -> float:
    """transformers' loss of text-only ``samples`` with a NemotronHForCausalLM (on its device)."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    total, count = 0.0, 0.0
    for s in samples:
        logits = model(s["input_ids"][None].to(device)).logits.float()[0]
        loss = F.cross_entropy(logits, s["labels"].to(device), reduction="none")
        total += float((loss * s["loss_mask"].to(device)).sum())
        count += float(s["loss_mask"].sum())
    return total / count


# ---- LLaVA (the llava provider): a language model of 4 heads in 2 K/V groups, even layer and
# vocabulary counts (TP2, PP2), a 3-layer tower on 32x32 images of 8x8 patches ------------------

LLAVA_TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=256)
LLAVA_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                    num_attention_heads=4, image_size=32, patch_size=8)
LLAVA_IMAGE_TOKEN = 255


def llava(path, *, text: dict, vision: dict, seed: int = 0, device: str = "cpu",
          dtype=torch.float32, **top) -> str:
    """A LlavaForConditionalGeneration; ``text``/``vision``: model_type and fields over the
    shapes above; ``top``: llava config fields."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(text_config={**LLAVA_TEXT, **text}, vision_config={**LLAVA_VISION, **vision},
                      **{"image_token_index": LLAVA_IMAGE_TOKEN, **top})
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(cfg, dtype=dtype)
    spice(model, seed)
    model.save_pretrained(str(path))
    return str(path)


def causal_lm(path, *, seed: int = 0, **text) -> str:
    """A language model alone (model_type in ``text``), e.g. Qwen2ForCausalLM."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {**LLAVA_TEXT, **text}
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    spice(model, seed)
    model.save_pretrained(str(path))
    return str(path)


def mock_batch(cfg, spec, *, first: int = 0) -> list:
    """The mock provider's samples ``first`` .. ``first`` + global batch - 1 of a run of ``cfg``
    (a TrainConfig) whose provider gives ``spec``: what its iteration first / batch + 1 reads."""
    from examples.mimo.data import mock as mock_data

    return [mock_data.make_sample(i, cfg=cfg.data, spec=spec, seq_length=cfg.batch.seq_length,
                                  seed=cfg.runtime.seed, with_images=not cfg.grid.llm_only)
            for i in range(first, first + cfg.batch.global_batch_size)]


@torch.no_grad()
def llava_logits(model, samples) -> list:
    """transformers' logits [s, vocab] of each sample (input_ids [s], image [3, H, W] or None)."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    return [model(input_ids=s["input_ids"][None].to(device),
                  **({} if s.get("image") is None else
                     {"pixel_values": s["image"][None].to(device, dtype)})).logits[0]
            for s in samples]


@torch.no_grad()
def llava_loss(model, samples) -> float:
    """transformers' loss of ``samples`` (mock data: input_ids, labels, loss_mask, image),
    averaged over their loss tokens as the trainer averages a global batch."""
    import torch.nn.functional as F

    total, count = 0.0, 0.0
    for s, logits in zip(samples, llava_logits(model, samples)):
        loss = F.cross_entropy(logits.float(), s["labels"].to(logits.device), reduction="none")
        total += float((loss * s["loss_mask"].to(logits.device)).sum())
        count += float(s["loss_mask"].sum())
    return total / count


def coverage_inputs(parts: dict, folder: str):
    """What ``hf_checkpoint.coverage_problems`` checks for a provider's ``hf_parts`` of one
    folder: (our keys -> recipes, the folder's tensor shapes, which tensors are left out)."""
    from examples.mimo.model_providers.hf_checkpoint import Reader

    recipes = {k: r for p in parts.values() for k, r in p.recipes.items()}
    reader = Reader(folder)
    shapes = {n: reader.shape(n) for n in reader.names()}
    return recipes, shapes, lambda n: any(p.unused(n) for p in parts.values())
