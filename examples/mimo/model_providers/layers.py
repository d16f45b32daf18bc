"""Model layers that work around megatron-core 0.19.2, used by the providers' layer specs.

They are compat.py's kind (one function per problem, a canary each in test_hetero_compat.py, named
with the others by ``compat.active()``) but live on the provider side: providers never import
the trainer. Each docstring names the megatron-core function and the symptom.
"""

from __future__ import annotations

import functools
from typing import Dict, List

import torch
import torch.nn.functional as F

_ACTIVE: Dict[str, None] = {}  # insertion-ordered set: the workarounds built in this process


def _mark(name: str) -> None:
    _ACTIVE.setdefault(name)


def active() -> List[str]:
    return list(_ACTIVE)


@functools.lru_cache(maxsize=None)  # one class per process: specs compare module types
def sequence_parallel_torch_norm():
    """``WrappedTorchNorm`` (transformer/torch_norm.py) asserts ``not config.sequence_parallel``,
    so local layers cannot run --sequence-parallel (TE's norms and apex's can). A torch norm is
    exact on a sequence shard; its parameters only need ``sequence_parallel = True`` so that
    ``finalize_model_grads`` all-reduces their gradients over the TP group, as for TE's."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    class SequenceParallelTorchNorm:
        def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
            if not config.sequence_parallel:
                return WrappedTorchNorm(config, hidden_size, eps, **kwargs)
            _mark("sequence_parallel_torch_norm")
            norm = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}[
                config.normalization](normalized_shape=hidden_size, eps=eps)
            for param in norm.parameters():
                param.sequence_parallel = True
            return norm

    return SequenceParallelTorchNorm


@functools.lru_cache(maxsize=None)  # one class per process: specs compare module types
def local_hybrid_stack():
    """``HybridStack.__init__`` (models/hybrid/hybrid_block.py) builds its final norm with
    ``TENorm`` whatever the spec says, so the hybrid model cannot be built without
    transformer-engine. This subclass builds it as a torch norm (the local specs' choice)."""
    from megatron.core.models.hybrid.hybrid_block import HybridStack

    class LocalHybridStack(HybridStack):
        def __init__(self, config, submodules, *args, post_layer_norm: bool = True, **kwargs):
            super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
            self.post_layer_norm = post_layer_norm
            if self.post_process and post_layer_norm:
                self.final_norm = sequence_parallel_torch_norm()(
                    config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)

    _mark("local_hybrid_stack")
    return LocalHybridStack


@functools.lru_cache(maxsize=None)  # one class per process: specs compare module types
def packed_mamba_mixer():
    """``MambaMixer.forward`` (ssm/mamba_mixer.py) takes packed sequences only on its memory-
    efficient path, which needs the causal-conv1d CUDA extension (pure-Python mamba-ssm has none,
    so the Nemotron provider turns that path off); a packed batch then fails with "Training with
    packed sequences is not supported in the non-memory-efficient code path". This subclass runs
    that path's computation with no state crossing a sample: the short convolution sees only its
    own sample's tokens, and mamba-ssm's Triton scan restarts at each sample (``seq_idx``)."""
    from einops import rearrange
    from megatron.core.ssm import mamba_mixer

    class PackedMambaMixer(mamba_mixer.MambaMixer):
        def forward(self, hidden_states, inference_context=None, *, inference_params=None,
                    packed_seq_params=None):
            if packed_seq_params is None or self.use_mem_eff_path or inference_context is not None:
                return super().forward(hidden_states, inference_context,
                                       inference_params=inference_params,
                                       packed_seq_params=packed_seq_params)
            if self.cp.cp_size != 1:
                raise NotImplementedError("packed sequences in Mamba layers need context parallel 1")
            _mark("packed_mamba_mixer")
            zxBCdt, _ = self.in_proj(hidden_states)
            return self.out_proj(self._packed_ssm(zxBCdt, packed_seq_params.seq_idx))

        def _packed_ssm(self, zxBCdt: torch.Tensor, seq_idx: torch.Tensor) -> torch.Tensor:
            cp = self.cp
            z, xBC, dt = torch.split(
                rearrange(zxBCdt, "l b d -> b l d"),
                [cp.d_inner_local_tpcp, cp.d_inner_local_tpcp + 2 * cp.ngroups_local_tpcp * self.d_state,
                 cp.nheads_local_tpcp], dim=-1)
            xBC = self.act(_conv1d_within_segments(rearrange(xBC, "b l d -> b d l"),
                                                  cp.get_conv1d_weight(), cp.get_conv1d_bias(),
                                                  seq_idx))
            x, B, C = torch.split(rearrange(xBC, "b d l -> b l d"),
                                  [cp.d_inner_local_tpcp, cp.ngroups_local_tpcp * self.d_state,
                                   cp.ngroups_local_tpcp * self.d_state], dim=-1)
            z = rearrange(z, "b l (h p) -> b l h p", p=self.headdim).contiguous()
            y = mamba_mixer.mamba_chunk_scan_combined(
                rearrange(x, "b l (h p) -> b l h p", p=self.headdim).contiguous(),
                dt.contiguous(), -torch.exp(cp.get_A_log().float()),
                rearrange(B, "b l (g n) -> b l g n", n=self.d_state).contiguous(),
                rearrange(C, "b l (g n) -> b l g n", n=self.d_state).contiguous(),
                self.chunk_size,
                D=(rearrange(cp.get_D().float(), "(h p) -> h p", p=self.headdim)
                   if self.D_has_hdim else cp.get_D()),
                z=None if self.rmsnorm else z, dt_bias=cp.get_dt_bias().float(), dt_softplus=True,
                seq_idx=seq_idx.to(torch.int32).contiguous(),
                **({"state_dtype": self.mamba_training_ssm_states_dtype}
                   if mamba_mixer.MAMBA_HAS_STATE_DTYPE else {}))
            y = rearrange(y, "b l h p -> l b (h p)").contiguous()
            if self.rmsnorm:
                y = self.norm(y, rearrange(z, "b l h p -> l b (h p)").contiguous())
            return y

    return PackedMambaMixer


def _conv1d_within_segments(x: torch.Tensor, weight: torch.Tensor, bias, seq_idx: torch.Tensor):
    """Depthwise causal conv1d, x [b, d, l], weight [d, 1, w], where a token sees only earlier
    tokens with its own ``seq_idx`` [b, l] (causal-conv1d's ``seq_idx``, in torch: w shifted
    multiply-adds, cheap next to the projections around it)."""
    width, length = weight.shape[-1], x.shape[-1]
    out = x * weight[None, :, 0, width - 1, None]
    for back in range(1, width):
        same = F.pad(seq_idx, (back, 0), value=-1)[..., :length] == seq_idx
        out = out + F.pad(x, (back, 0))[..., :length] * same[:, None, :] \
            * weight[None, :, 0, width - 1 - back, None]
    return out if bias is None else out + bias[None, :, None]


@functools.lru_cache(maxsize=None)  # one class per process: specs compare module types
def clip_vit_model():
    """``CLIPViTModel`` (models/vision/clip_vit_model.py) keeps no ``tp_group``, so
    ``MegatronModule.sharded_state_dict`` falls back to parallel_state's TP group, which the
    hetero grids never initialise: saving the tower or importing weights into it fails with
    "tensor model parallel group is not initialized". This subclass keeps its process groups' TP
    group, as ``RADIOViTModel`` does.
    It also asserts that the patch divides the image, where transformers' stride-patch
    convolution ignores the rest of a side (SigLIP so400m, LLaVA-OneVision's tower: 384 px in
    patches of 14). This subclass is built for the whole patches and crops the rest before its
    convolution, which changes nothing that convolution computes."""
    from megatron.core.models.vision.clip_vit_model import CLIPViTModel

    class GroupedCLIPViTModel(CLIPViTModel):
        def __init__(self, *args, pg_collection=None, patch_dim=14, img_h=336, img_w=336,
                     **kwargs):
            super().__init__(*args, pg_collection=pg_collection, patch_dim=patch_dim,
                             img_h=img_h - img_h % patch_dim, img_w=img_w - img_w % patch_dim,
                             **kwargs)
            if pg_collection is not None:
                _mark("clip_vit_model")
                self.tp_group = pg_collection.tp

        def forward(self, x, attention_mask=None):
            return super().forward(x[..., :self.img_h, :self.img_w], attention_mask)

    return GroupedCLIPViTModel


@functools.lru_cache(maxsize=None)  # one class per process: specs compare module types
def tied_gpt_model():
    """``LanguageModule.tie_embeddings_and_output_weights_state_dict`` (models/common/
    language_module/language_module.py) numbers the last pipeline stage's copy of tied embeddings
    by ``parallel_state.get_data_parallel_rank``, not by the ``dp_cp_group`` its metadata carries:
    with tied embeddings and --llm-pp > 1 every sharded state dict of the language model (a save,
    the Hugging Face import) fails on the hetero grids with "data parallel group with CP ... is
    not initialized". This subclass answers that call with the metadata's group."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_model import GPTModel

    class TiedGPTModel(GPTModel):
        def tie_embeddings_and_output_weights_state_dict(self, sharded_state_dict, output_key,
                                                         embedding_key, metadata=None):
            group = (metadata or {}).get("dp_cp_group")
            if group is None or self.pre_process or not self.post_process:
                return super().tie_embeddings_and_output_weights_state_dict(
                    sharded_state_dict, output_key, embedding_key, metadata or {})
            _mark("tied_gpt_model")
            real = parallel_state.get_data_parallel_rank
            parallel_state.get_data_parallel_rank = lambda *args, **kwargs: group.rank()
            try:
                return super().tie_embeddings_and_output_weights_state_dict(
                    sharded_state_dict, output_key, embedding_key, metadata)
            finally:
                parallel_state.get_data_parallel_rank = real

    return TiedGPTModel
