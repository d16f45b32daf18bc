"""RADIO ViT followed by pixel shuffle: the vision encoder of the Nemotron VLM."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from examples.mimo.images import pixel_shuffle


class RadioEncoder(torch.nn.Module):
    """megatron-core's RADIOViTModel, class tokens dropped, patches pixel-shuffled.

    Fixed resolution: ``images`` [b, 3, H, W] -> [b, H*W/(4 p^2), 4c].
    Dynamic resolution: ``packed_patches`` [1, T, 3 p^2] holding every image's patches back to
    back (``patchify``) and ``imgs_sizes`` [(h, w), ...] in pixels -> [sum_i h_i*w_i/(4 p^2),
    4c]; attention stays within each image (packed sequences).
    """

    def __init__(self, *, config, layer_spec, ln_post_impl, img_h: int, img_w: int,
                 patch_dim: int, class_token_len: int, max_img_size: int,
                 dynamic_resolution: bool, pg_collection):
        from megatron.core.models.vision.radio import RADIOViTModel

        super().__init__()
        self.config = config
        self.patch_dim = patch_dim
        self.class_token_len = class_token_len
        self.dynamic_resolution = dynamic_resolution
        self.vit = RADIOViTModel(
            config, layer_spec, ln_post_impl=ln_post_impl, add_class_token=True,
            class_token_len=class_token_len, patch_dim=patch_dim, img_h=img_h, img_w=img_w,
            max_img_h=max_img_size, max_img_w=max_img_size, dynamic_resolution=dynamic_resolution,
            pg_collection=pg_collection)

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
