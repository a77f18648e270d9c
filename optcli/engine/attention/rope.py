"""RoPE's rotation in the half-split layout (as transformers): the one definition the layer applies to q and k
(models/layer_ops.py) and an 8-bit cache's centre is rotated by (kv_centre.py), which must be the same op for the
centre the store takes away to be what the read adds back."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(-x2, x1) for x = (x1, x2) split at the middle of the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos/sin: [T, head_dim]."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]
