"""Image tensors as the vision encoders see them: pure helpers that both the data side (which
prepares the encoder's input) and the providers (which consume it) use, so neither imports the
other."""

from __future__ import annotations

import torch


def pixel_shuffle(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[b, rows*cols, c] -> [b, rows*cols/4, 4c]: each 2x2 block of patches becomes one token."""
    b, _, c = x.shape
    x = x.reshape(b, rows // 2, 2, cols // 2, 2, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (rows // 2) * (cols // 2), 4 * c)


def patchify(image: torch.Tensor, patch_dim: int) -> torch.Tensor:
    """[3, H, W] -> [H*W/p^2, 3 p^2], patches row-major, each as RADIO flattens it (c, y, x)."""
    c, h, w = image.shape
    x = image.reshape(c, h // patch_dim, patch_dim, w // patch_dim, patch_dim)
    return x.permute(1, 3, 0, 2, 4).reshape(-1, c * patch_dim * patch_dim)
