"""What every provider does the same way: base TransformerConfig settings, assembling the
MimoModel from two branch specs, and freezing branches."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from examples.mimo.interfaces import ENCODER_MODULE


def check_divides(divisor_flag: str, divisor: int, dividend_flag: str, dividend: int) -> None:
    if dividend % divisor:
        raise ValueError(f"{divisor_flag} {divisor} must divide {dividend_flag} {dividend}")


def base_config_kwargs(*, tp: int, pp: int, dtype: torch.dtype) -> dict:
    """TransformerConfig settings the hetero loop relies on, whatever the model."""
    return dict(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Full weights drawn on the CPU and then split: the initial model does not depend on the
        # layout (the parity tests rely on it). Tools and tests that build without the trainer's
        # kernel options get this; the trainer's --use-cpu-initialization overrides it.
        use_cpu_initialization=True,
        # Activations cross the bridge with their shapes, so lengths may vary per step; megatron
        # then requires the alltoall MoE dispatcher even for dense models.
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",
        # The loop sums the loss over tokens and divides gradients by the global token count.
        calculate_per_token_loss=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )


def transformer_config(*, tp: int, pp: int, dtype: torch.dtype, kernel_fields: Optional[dict] = None,
                       **kwargs):
    """``kernel_fields``: the branch's ``KernelConfig.transformer_fields`` (FP8, recompute, fusions)
    or, for a projector, its ``init_fields``; they override the base settings."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(**{**base_config_kwargs(tp=tp, pp=pp, dtype=dtype),
                                **(kernel_fields or {})}, **kwargs)


def assemble(*, topology, language_spec: Callable[[object], object],
             encoder_spec: Callable[[object], object], image_token_id: int):
    """This rank's part of the MimoModel (unwrapped, unfrozen); with --colocated all of it.

    Every rank describes both branches (MimoModelConfig checks the keys) but builds only its own;
    the other branch's spec carries no process groups and is never instantiated. The two
    callables take the branch's ProcessGroupCollection (None off that branch).
    """
    from megatron.core.models.mimo.config.base_configs import MimoModelConfig
    from megatron.core.models.mimo.config.role import MIMO_LANGUAGE_MODULE_KEY
    from megatron.core.models.mimo.model.base import MimoModel

    llm_pgc = topology.module_pgc(MIMO_LANGUAGE_MODULE_KEY)
    lm = language_spec(llm_pgc)
    if topology.grid_config.colocated:
        lm = _seeded_anew(lm, torch.initial_seed())
    modalities, special = {}, {}
    if not topology.grid_config.llm_only:
        modalities[ENCODER_MODULE] = encoder_spec(topology.module_pgc(ENCODER_MODULE))
        special[ENCODER_MODULE] = image_token_id
    return MimoModel(MimoModelConfig(language_model_spec=lm, modality_submodules_spec=modalities,
                                     special_token_ids=special,
                                     module_to_grid_map=topology.grid_map),
                     # with --sequence-parallel MimoModel splits the sequence over this group;
                     # without it, megatron-core falls back to parallel_state's, which we never set
                     tp_group=llm_pgc.tp if llm_pgc is not None else None)


def freeze(model, *, lm: bool, vit: bool, projection: bool) -> None:
    if model.language_model is not None and lm:
        model.language_model.requires_grad_(False)
    vision: Optional[torch.nn.Module] = model.modality_submodules[ENCODER_MODULE] \
        if ENCODER_MODULE in model.modality_submodules else None
    if vision is not None:
        if vit:
            vision.encoders.requires_grad_(False)
        if projection:
            vision.input_projections.requires_grad_(False)


def module_config(module, encoder_name: str):
    """The TransformerConfig that DDP should use for a built branch."""
    encoders = getattr(module, "encoders", None)
    return encoders[encoder_name].config if encoders is not None else module.config


def _seeded_anew(spec, seed: int):
    """The LLM's spec, built from a freshly seeded RNG as on its own ranks: a colocated model
    (MimoModel builds the encoder first, on the same ranks) then starts from the same weights as
    the hetero layouts and the single-process reference."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    base = spec.module

    class SeededAnew(base):
        def __init__(self, *args, **kwargs):
            torch.manual_seed(seed)
            super().__init__(*args, **kwargs)

    SeededAnew.__name__, SeededAnew.__qualname__ = base.__name__, base.__qualname__
    return ModuleSpec(module=SeededAnew, params=spec.params, submodules=spec.submodules)


def layerwise_sharded_state_dict(module: torch.nn.Module, prefix: str, sharded_offsets, metadata,
                                 *, tp_group) -> dict:
    """The sharded state dict of a plain torch module around megatron-core layers (RADIO's and
    the mock ViT's wrappers): megatron-core would save such a module as if it were replicated, so
    TP ranks claimed the same rows (and local layers' extra state clashed at the save). Here every
    megatron-core module gives its own TP-sharded entries, under the per-layer names
    (``decoder.layers.<i>.``) that the replicated form used, rather than a TransformerBlock's
    stacked ones: checkpoints written before keep loading, and the HF mappings keep their names.
    Parameters outside megatron-core's modules stay replicated over ``tp_group``."""
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.transformer_block import TransformerBlock
    from megatron.core.transformer.utils import (
        ensure_metadata_has_dp_cp_group,
        make_sharded_tensors_for_checkpoint,
    )

    metadata = ensure_metadata_has_dp_cp_group(metadata)

    def own(m: torch.nn.Module, at: str) -> dict:
        state: dict = {}
        m._save_to_state_dict(state, "", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, at, {}, sharded_offsets, tp_group=tp_group,
                                                   dp_cp_group=metadata["dp_cp_group"])

    out = own(module, prefix)
    for name, child in module.named_children():
        at = f"{prefix}{name}."
        if isinstance(child, TransformerBlock):
            out.update(own(child, at))
            for n, c in child.named_children():
                if n == "layers":
                    for i, layer in enumerate(c):
                        out.update(layer.sharded_state_dict(f"{at}layers.{i}.", sharded_offsets,
                                                            metadata))
                else:
                    out.update(layerwise_sharded_state_dict(c, f"{at}{n}.", sharded_offsets,
                                                            metadata, tp_group=tp_group))
        elif isinstance(child, MegatronModule) and not any(
                isinstance(m, TransformerBlock) for m in child.modules()):
            out.update(child.sharded_state_dict(at, sharded_offsets, metadata))
        else:
            out.update(layerwise_sharded_state_dict(child, at, sharded_offsets, metadata,
                                                    tp_group=tp_group))
    return out
