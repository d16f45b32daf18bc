"""RADIO ViT followed by pixel shuffle: the vision encoder of the Nemotron VLM."""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch

from examples.mimo.images import pixel_shuffle


class FP32RMSNorm(torch.nn.Module):
    """RMSNorm computed in fp32 and cast back, weight applied in fp32: transformers'
    NemotronH_Omni_RMSNorm, the projector's input norm (torch's RMSNorm computes in bf16)."""

    def __init__(self, size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(x.dtype)


@functools.lru_cache(maxsize=None)  # one class per process: specs compare module types
def normed_projector():
    """megatron-core's MultimodalProjector behind transformers' nemotron_h_omni projector norm
    (``norm``, an FP32RMSNorm of its input); the projector's own names are unchanged."""
    from megatron.core.models.vision.multimodal_projector import MultimodalProjector

    class NormedProjector(MultimodalProjector):
        def __init__(self, config, submodules, projector_type, input_size, tp_group=None):
            super().__init__(config, submodules, projector_type, input_size, tp_group=tp_group)
            self.norm = FP32RMSNorm(input_size)

        def forward(self, hidden_states):
            return super().forward(self.norm(hidden_states))

    return NormedProjector


class RadioEncoder(torch.nn.Module):
    """megatron-core's RADIOViTModel, class tokens dropped, patches pixel-shuffled. As transformers
    runs RADIO: no final norm, and its cropped position embeddings in their evaluation form also
    in training (RADIO's random crops and scales are for pretraining the ViT itself; a VLM's
    step must compute what the imported model computes).

    Fixed resolution: ``images`` [b, 3, H, W] -> [b, H*W/(4 p^2), 4c].
    Dynamic resolution: ``packed_patches`` [1, T, 3 p^2] holding every image's patches back to
    back (``patchify``) and ``imgs_sizes`` [(h, w), ...] in pixels -> [sum_i h_i*w_i/(4 p^2),
    4c]; attention stays within each image (packed sequences).
    """

    def __init__(self, *, config, layer_spec, img_h: int, img_w: int,
                 patch_dim: int, class_token_len: int, max_img_size: int,
                 dynamic_resolution: bool, pg_collection):
        from megatron.core.models.vision.radio import RADIOViTModel

        super().__init__()
        self.config = config
        self.patch_dim = patch_dim
        self.class_token_len = class_token_len
        self.dynamic_resolution = dynamic_resolution
        self.tp_group = pg_collection.tp if pg_collection is not None else None
        self.vit = RADIOViTModel(
            config, layer_spec, ln_post_impl=None, add_class_token=True, force_cpe_eval_mode=True,
            class_token_len=class_token_len, patch_dim=patch_dim, img_h=img_h, img_w=img_w,
            max_img_h=max_img_size, max_img_w=max_img_size, dynamic_resolution=dynamic_resolution,
            pg_collection=pg_collection)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        from examples.mimo.model_providers.common import layerwise_sharded_state_dict

        return layerwise_sharded_state_dict(self, prefix, sharded_offsets, metadata,
                                            tp_group=self.tp_group)

    def forward(self, images: Optional[torch.Tensor] = None,
                packed_patches: Optional[torch.Tensor] = None,
                imgs_sizes: Optional[Sequence[Tuple[int, int]]] = None) -> torch.Tensor:
        if self.dynamic_resolution:
            if packed_patches is None or imgs_sizes is None:
                raise ValueError("dynamic resolution needs packed_patches and imgs_sizes")
            return self._forward_packed(packed_patches, [tuple(map(int, s)) for s in imgs_sizes])
        if images is None:
            raise ValueError("fixed resolution needs images [b, 3, H, W]")
        x = self.vit(images)[:, self.class_token_len:]
        return pixel_shuffle(x, images.shape[-2] // self.patch_dim, images.shape[-1] // self.patch_dim)

    def _forward_packed(self, patches: torch.Tensor, sizes: List[Tuple[int, int]]) -> torch.Tensor:
        from megatron.core.packed_seq_params import PackedSeqParams

        grids = [(h // self.patch_dim, w // self.patch_dim) for h, w in sizes]
        lengths = torch.tensor([0] + [r * c for r, c in grids], dtype=torch.int32)
        cu_seqlens = torch.cumsum(lengths, 0, dtype=torch.int32).to(patches.device)
        longest = int(lengths.max())
        # RADIO shifts these boundaries itself to make room for each image's class tokens.
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens,
                                 cu_seqlens_kv=cu_seqlens.clone(), max_seqlen_q=longest,
                                 max_seqlen_kv=longest)
        x = self.vit(patches, imgs_sizes=sizes, packed_seq_params=params)
        out, start = [], 0
        for rows, cols in grids:
            start += self.class_token_len
            out.append(pixel_shuffle(x[:, start:start + rows * cols], rows, cols)[0])
            start += rows * cols
        return torch.cat(out)
