"""Layer specs for the Nemotron VLM on either backend (``--transformer-impl``).

megatron-core 0.19.2 ships the hybrid (Mamba/attention/MoE) stack spec for transformer-engine only.
The local specs here use megatron-core's own non-TE modules, in layers.local_hybrid_stack (whose
final norm is not the TENorm that ``HybridStack`` hard-wires).
"""

from __future__ import annotations

import copy
import functools
import importlib.util

import torch

from examples.mimo.model_providers import layers

TRANSFORMER_IMPLS = ("transformer_engine", "local")


def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def causal_conv1d_available() -> bool:
    """causal-conv1d with its CUDA extension (the pure-Python part alone cannot run Mamba's
    fused path)."""
    if importlib.util.find_spec("causal_conv1d") is None:
        return False
    try:
        import causal_conv1d_cuda  # noqa: F401  (the compiled extension)
    except ImportError:
        return False
    return True


def check_transformer_impl(impl: str) -> None:
    if impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"--transformer-impl {impl!r} is unknown; known: {list(TRANSFORMER_IMPLS)}")
    if impl == "transformer_engine" and not te_available():
        raise ValueError("--transformer-impl transformer_engine needs transformer_engine, which is "
                         "not importable here; use --transformer-impl local")


def mamba_available() -> bool:
    """After compat.import_mamba_triton_kernels (start-up, for models with Mamba layers)."""
    from megatron.core.ssm import mamba_mixer

    return bool(mamba_mixer.HAVE_MAMBA_SSM)


@functools.lru_cache(maxsize=None)  # one class per process: specs compare module types
def packed_local_attention():
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    class PackedLocalAttention(DotProductAttention):
        """Local attention that also takes packed (THD) sequences, as a block-diagonal mask:
        TE attends within each segment by ``cu_seqlens``, and this does the same locally.

        Two packings reach it: dynamic-resolution RADIO's images, one sequence with a segment per
        image; and a packed LLM micro-batch, b rows of ``tokens_per_sample`` tokens flattened,
        which is attended row by row ([b, s, s] masks, as unpacked, not one [bs, bs])."""

        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None):
            if packed_seq_params is None:
                return super().forward(query, key, value, attention_mask, attn_mask_type,
                                       attention_bias)
            # Attention hands THD tensors over as [t, heads, dim]; the local kernel wants sbhd.
            t = query.size(0)
            s = packed_seq_params.tokens_per_sample or t
            bounds = packed_seq_params.cu_seqlens_q.to(query.device)
            segment = torch.bucketize(torch.arange(t, device=query.device), bounds[1:],
                                      right=True).view(t // s, s)
            mask = segment[:, :, None] != segment[:, None, :]  # True = not attended
            if self.attn_mask_type == AttnMaskType.causal:
                mask = mask | torch.ones(s, s, dtype=torch.bool, device=query.device).triu(1)
            query, key, value = (x.view(t // s, s, *x.shape[1:]).transpose(0, 1).contiguous()
                                 for x in (query, key, value))
            out = super().forward(query, key, value, mask[:, None], attn_mask_type,
                                  attention_bias)  # [s, b, heads * dim]
            return out.transpose(0, 1).reshape(t, -1)

    return PackedLocalAttention


def vit_layer_spec(impl: str):
    from megatron.core.models.vision.vit_layer_specs import (
        get_vit_layer_with_local_spec,
        get_vit_layer_with_transformer_engine_spec,
    )

    if impl == "transformer_engine":
        return get_vit_layer_with_transformer_engine_spec()
    spec = get_vit_layer_with_local_spec()
    spec.submodules.self_attention.submodules.core_attention = packed_local_attention()
    return spec


def norm_class(impl: str):
    if impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return WrappedTorchNorm


def projector_linears(impl: str):
    if impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TERowParallelLinear,
        )

        return TEColumnParallelLinear, TERowParallelLinear
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return ColumnParallelLinear, RowParallelLinear


def hybrid_stack_spec(impl: str, *, num_experts: int):
    if impl == "transformer_engine":
        from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec as te_spec

        spec = copy.deepcopy(te_spec)
        spec.submodules.mamba_layer.submodules.mixer.module = layers.packed_mamba_mixer()
        return spec
    return _local_hybrid_stack_spec(num_experts)


def _local_hybrid_stack_spec(num_experts: int):
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.models.hybrid.hybrid_block import HybridStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import (
        MoETransformerLayer,
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    # TE fuses each pre-norm into the following linear; locally the norm is its own module.
    norm = layers.sequence_parallel_torch_norm()
    mamba = ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
        norm=norm,
        mixer=ModuleSpec(module=layers.packed_mamba_mixer(), submodules=MambaMixerSubmodules(
            in_proj=ColumnParallelLinear, out_proj=RowParallelLinear)),
        mamba_bda=get_bias_dropout_add))
    attention = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=norm,
        self_attention=ModuleSpec(
            module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
            submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear,
                                               core_attention=packed_local_attention(),
                                               linear_proj=RowParallelLinear)),
        self_attn_bda=get_bias_dropout_add))
    moe = ModuleSpec(module=MoETransformerLayer, submodules=TransformerLayerSubmodules(
        pre_mlp_layernorm=norm,
        mlp=get_moe_module_spec(use_te=False, num_experts=max(num_experts, 1),
                                moe_grouped_gemm=False),
        mlp_bda=get_bias_dropout_add))
    dense = ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
        pre_mlp_layernorm=norm,
        mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                            linear_fc2=RowParallelLinear)),
        mlp_bda=get_bias_dropout_add))
    return ModuleSpec(module=layers.local_hybrid_stack(), submodules=HybridStackSubmodules(
        mamba_layer=mamba, attention_layer=attention, moe_layer=moe, mlp_layer=dense))
