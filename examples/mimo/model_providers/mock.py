"""A tiny VLM built only from megatron-core local (non-TE) specs: a ViT-like encoder with an MLP
projector, and a GPT language model. Small enough to train on CPU in CI."""

from __future__ import annotations

import argparse
from typing import Optional
from dataclasses import dataclass

import torch

from examples.mimo.flags import FREE, MATCH, add_group, option, read
from examples.mimo.interfaces import DataSpec, ModelFacts, StepFlops, StepWork
from examples.mimo.model_providers import common, specs
from examples.mimo.model_providers import flops as F

NAME = "mock"
VIT_ENCODER = "vit"


@dataclass(frozen=True)
class MockModelConfig:
    hidden_size: int = option("--hidden-size", MATCH, type=int, default=64)
    num_layers: int = option("--num-layers", MATCH, type=int, default=2)
    num_attention_heads: int = option("--num-attention-heads", MATCH, type=int, default=4)
    vocab_size: int = option("--vocab-size", MATCH, type=int, default=256)
    encoder_hidden_size: int = option("--encoder-hidden-size", MATCH, type=int, default=32)
    encoder_num_layers: int = option("--encoder-num-layers", MATCH, type=int, default=2)
    encoder_num_attention_heads: int = option("--encoder-num-attention-heads", MATCH, type=int,
                                              default=4)
    img_h: int = option("--img-h", MATCH, type=int, default=16)
    img_w: int = option("--img-w", MATCH, type=int, default=16)
    patch_dim: int = option("--patch-dim", MATCH, type=int, default=4)
    freeze_lm: bool = option("--freeze-lm", FREE, action="store_true",
                             help="Freeze the language model.")
    freeze_vit: bool = option("--freeze-vit", FREE, action="store_true",
                              help="Freeze the vision encoder.")
    freeze_projection: bool = option("--freeze-projection", FREE, action="store_true",
                                     help="Freeze the vision projector.")

    @property
    def image_tokens(self) -> int:
        return (self.img_h // self.patch_dim) * (self.img_w // self.patch_dim)

    @property
    def image_token_id(self) -> int:
        # The last vocabulary entry is never produced as text, so it can mark image positions.
        return self.vocab_size - 1


def add_args(parser: argparse.ArgumentParser) -> None:
    add_group(parser, "mock model provider", MockModelConfig)


def config_from_args(args: argparse.Namespace) -> MockModelConfig:
    cfg = MockModelConfig(**read(MockModelConfig, args))
    for flag, value in (("--hidden-size", cfg.hidden_size), ("--num-layers", cfg.num_layers),
                        ("--num-attention-heads", cfg.num_attention_heads),
                        ("--encoder-hidden-size", cfg.encoder_hidden_size),
                        ("--encoder-num-layers", cfg.encoder_num_layers),
                        ("--encoder-num-attention-heads", cfg.encoder_num_attention_heads),
                        ("--img-h", cfg.img_h), ("--img-w", cfg.img_w),
                        ("--patch-dim", cfg.patch_dim)):
        if value < 1:
            raise ValueError(f"{flag} {value} must be >= 1")
    if cfg.vocab_size < 3:
        raise ValueError(f"--vocab-size {cfg.vocab_size} must be >= 3")
    common.check_divides("--num-attention-heads", cfg.num_attention_heads, "--hidden-size",
                         cfg.hidden_size)
    common.check_divides("--encoder-num-attention-heads", cfg.encoder_num_attention_heads,
                         "--encoder-hidden-size", cfg.encoder_hidden_size)
    if cfg.img_h % cfg.patch_dim or cfg.img_w % cfg.patch_dim:
        raise ValueError(f"--patch-dim {cfg.patch_dim} must divide --img-h {cfg.img_h} and "
                         f"--img-w {cfg.img_w}")
    return cfg


def facts(cfg: MockModelConfig) -> ModelFacts:
    h, c, v = cfg.hidden_size, cfg.encoder_hidden_size, cfg.vocab_size
    # Local-spec layer, 4x MLP, biases on: two LayerNorms (4h), QKV (3h^2+3h), projection (h^2+h),
    # fc1 (4h^2+4h), fc2 (4h^2+h).
    layer = lambda w: 12 * w * w + 13 * w  # noqa: E731
    llm = 2 * v * h + 2 * h + cfg.num_layers * layer(h)  # untied embedding/output, final norm
    vit = 3 * cfg.patch_dim ** 2 * c + cfg.image_tokens * c + cfg.encoder_num_layers * layer(c) + 2 * c
    projector = c * h + h + h * h + h
    return ModelFacts(llm_num_layers=cfg.num_layers, llm_num_heads=cfg.num_attention_heads,
                      llm_num_query_groups=cfg.num_attention_heads,
                      encoder_num_heads=cfg.encoder_num_attention_heads, num_experts=0,
                      llm_moe_layers=0, encoder_params=vit + projector, llm_params=llm,
                      llm_hidden_size=h, encoder_hidden_size=c,
                      encoder_num_layers=cfg.encoder_num_layers,
                      encoder_tokens_per_image=cfg.image_tokens,
                      llm_trainable_params=0 if cfg.freeze_lm else None,
                      encoder_trainable_params=(0 if cfg.freeze_vit else vit)
                      + (0 if cfg.freeze_projection else projector),
                      llm_vocab_size=v,
                      # 34 bytes per token and hidden unit per layer (Korthikanti et al., 2022),
                      # and local attention's scores
                      llm_activation_bytes_per_token=34 * h * cfg.num_layers,
                      llm_attention_score_heads=cfg.num_layers * cfg.num_attention_heads,
                      encoder_activation_bytes_per_image=cfg.encoder_num_layers * cfg.image_tokens
                      * (34 * c + 2 * cfg.encoder_num_attention_heads * cfg.image_tokens))


def flops(cfg: MockModelConfig, work: StepWork) -> StepFlops:
    h, c, pd = cfg.hidden_size, cfg.encoder_hidden_size, cfg.patch_dim
    patches, heads = cfg.image_tokens, cfg.encoder_num_attention_heads
    vit_trains = not cfg.freeze_vit
    vit_layer = F.attention(1, patches, hidden=c, heads=heads, groups=heads, head_dim=c // heads) \
        + F.mlp(patches, c, 4 * c)
    encoder = work.images * (
        F.train(F.linear(patches, 3 * pd * pd, c), weights=vit_trains, inputs=False)  # images
        + F.train(cfg.encoder_num_layers * vit_layer, weights=vit_trains, inputs=vit_trains)
        # megatron's linear computes its input gradient whenever a gradient passes through it
        + F.train(F.mlp(patches, c, h, h), weights=not cfg.freeze_projection,
                  inputs=vit_trains or not cfg.freeze_projection))
    s, tokens, n = work.seq_length, work.sequences * work.seq_length, cfg.num_attention_heads
    layer = F.attention(work.sequences, s, hidden=h, heads=n, groups=n, head_dim=h // n) \
        + F.mlp(tokens, h, 4 * h)
    # The LLM's input gradient is needed when its embedding trains or the encoder does.
    encoder_trains = work.images > 0 and (vit_trains or not cfg.freeze_projection)
    llm = F.train(cfg.num_layers * layer + F.linear(tokens, h, cfg.vocab_size),
                  weights=not cfg.freeze_lm, inputs=not cfg.freeze_lm or encoder_trains)
    return StepFlops(encoder=encoder, llm=llm)


def hf_parts(cfg: MockModelConfig, **sources) -> dict:
    return {}


def hf_export(record: dict, *, llm_only: bool):
    raise ValueError("--model-provider mock has no Hugging Face counterpart to export to")


def data_spec(cfg: MockModelConfig) -> DataSpec:
    return DataSpec(vocab_size=cfg.vocab_size, image_token_id=cfg.image_token_id,
                    image_tokens=cfg.image_tokens, image_shape=(3, cfg.img_h, cfg.img_w))


class MockViT(torch.nn.Module):
    """Patch embedding + learned positions + a megatron-core transformer block (no mask)."""

    def __init__(self, config, img_h: int, img_w: int, patch_dim: int, pg_collection):
        from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
        from megatron.core.transformer.transformer_block import TransformerBlock

        super().__init__()
        self.config = config
        self.tp_group = pg_collection.tp if pg_collection is not None else None
        num_patches = (img_h // patch_dim) * (img_w // patch_dim)
        self.patch_embed = torch.nn.Conv2d(3, config.hidden_size, patch_dim, stride=patch_dim,
                                           bias=False, dtype=config.params_dtype)
        self.position_embeddings = torch.nn.Parameter(
            0.02 * torch.randn(num_patches, 1, config.hidden_size, dtype=config.params_dtype))
        self.decoder = TransformerBlock(config, spec=get_vit_layer_with_local_spec(),
                                        pre_process=True, post_process=True,
                                        pg_collection=pg_collection)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        return common.layerwise_sharded_state_dict(self, prefix, sharded_offsets, metadata,
                                                   tp_group=self.tp_group)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).permute(2, 0, 1)  # [patches, b, h]
        x = self.decoder(hidden_states=x + self.position_embeddings, attention_mask=None)
        return x.transpose(0, 1).contiguous()  # [b, patches, h]


def encoder_spec(cfg: MockModelConfig, *, pg_collection, tp: int, dtype: torch.dtype,
                 kernel_fields: Optional[dict] = None, init_fields: Optional[dict] = None):
    from megatron.core.models.mimo.submodules.vision import VisionModalitySubmodules
    from megatron.core.models.vision.multimodal_projector import MultimodalProjector
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    vit_config = common.transformer_config(
        tp=tp, pp=1, dtype=dtype, kernel_fields=kernel_fields, num_layers=cfg.encoder_num_layers,
        hidden_size=cfg.encoder_hidden_size, num_attention_heads=cfg.encoder_num_attention_heads)
    projector_config = common.transformer_config(
        tp=tp, pp=1, dtype=dtype, kernel_fields=init_fields, num_layers=1,
        hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.hidden_size, num_attention_heads=tp,  # no attention; must divide by TP
        activation_func=torch.nn.functional.gelu)
    vit = ModuleSpec(module=MockViT, params=dict(config=vit_config, img_h=cfg.img_h,
                                                img_w=cfg.img_w, patch_dim=cfg.patch_dim,
                                                pg_collection=pg_collection))
    projector = ModuleSpec(module=MultimodalProjector, params=dict(
        config=projector_config,
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
        projector_type="mlp", input_size=cfg.encoder_hidden_size,
        tp_group=pg_collection.tp if pg_collection is not None else None))
    return ModuleSpec(module=VisionModalitySubmodules, params={"pg_collection": pg_collection},
                      submodules={"encoders": {VIT_ENCODER: vit}, "input_projections": [projector]})


def language_spec(cfg: MockModelConfig, *, pg_collection, tp: int, pp: int, dtype: torch.dtype,
                  seq_length: int, kernel_fields: Optional[dict] = None):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.spec_utils import ModuleSpec

    pp_rank = pg_collection.pp.rank() if pg_collection is not None else 0
    config = common.transformer_config(
        tp=tp, pp=pp, dtype=dtype, kernel_fields=kernel_fields, num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads)
    layer = get_gpt_layer_local_spec()
    layer.submodules.self_attention.submodules.core_attention = specs.packed_local_attention()
    return ModuleSpec(module=GPTModel, params=dict(
        config=config, transformer_layer_spec=layer,
        vocab_size=cfg.vocab_size, max_sequence_length=seq_length,
        pre_process=pp_rank == 0, post_process=pp_rank == pp - 1,
        share_embeddings_and_output_weights=False, position_embedding_type="rope",
        pg_collection=pg_collection))


def module_config(module) -> object:
    return common.module_config(module, VIT_ENCODER)


def build(cfg: MockModelConfig, *, topology, dtype: torch.dtype, seq_length: int,
          device: torch.device, kernels):
    """Build this rank's part of the non-colocated MimoModel (unwrapped, on the current device)."""
    grid = topology.grid_config
    fields = kernels.transformer_fields(fp8=False)  # local layers: validation let no FP8 through
    model = common.assemble(
        topology=topology, image_token_id=cfg.image_token_id,
        language_spec=lambda pgc: language_spec(cfg, pg_collection=pgc, tp=grid.llm_tp,
                                                pp=grid.llm_pp, dtype=dtype, seq_length=seq_length,
                                                kernel_fields=fields),
        encoder_spec=lambda pgc: encoder_spec(cfg, pg_collection=pgc, tp=grid.encoder_tp,
                                              dtype=dtype, kernel_fields=fields,
                                              init_fields=kernels.init_fields()))
    common.freeze(model, lm=cfg.freeze_lm, vit=cfg.freeze_vit, projection=cfg.freeze_projection)
    return model
