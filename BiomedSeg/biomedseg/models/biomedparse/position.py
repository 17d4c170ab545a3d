"""DETR-style 2-D sine position encoding, normalised to [0, 2*pi] (no parameters).

Used by the pixel decoder's transformer encoder (on res5) and by the decoder for every
feature level. The op order follows the reference so float32 values agree bit for bit.
"""
from __future__ import annotations

import math

import torch


def sine_position_encoding(x: torch.Tensor, num_pos_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """[N, 2*num_pos_feats, H, W] encoding for a feature map ``x`` [N, C, H, W] (y features first, then x)."""
    n, _, h, w = x.shape
    not_mask = torch.ones((n, h, w), device=x.device, dtype=torch.bool)
    y_embed = not_mask.cumsum(1, dtype=x.dtype)
    x_embed = not_mask.cumsum(2, dtype=x.dtype)
    eps, scale = 1e-6, 2 * math.pi
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=x.dtype, device=x.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
