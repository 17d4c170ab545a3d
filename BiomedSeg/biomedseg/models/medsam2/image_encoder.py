"""MedSAM2 image encoder: Hiera-T trunk, FPN neck and sine position encoding (SAM2.1, 512x512 input).

Configuration of ``sam2.1_hiera_t512``: embed 96, heads 1/2/4/8, stages (1, 2, 7, 2), global attention
in blocks 5, 7, 9, window sizes (8, 4, 14, 7), background position embedding 7x7. The neck projects the
four stages to 256 channels, adds nearest-upsampled top-down features on levels 2 and 3 only, and drops
the 16x16 level (``scalp`` 1). Parameter names are the authors' (``image_encoder.trunk.blocks.3.attn.qkv``
...), so their state dict loads strictly. Layouts follow the reference (trunk outputs are permuted views
of channels-last tensors, attention runs on [B, heads, N, C]) so kernels round as theirs do.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SIZE = 512


class PositionEmbeddingSine(nn.Module):
    """DETR-style 2-D sine encoding, y features first, positions normalised to (0, scale].

    Depends only on the feature map's height and width, so it is cached per (H, W, device).
    Shared with the memory encoder (64 features there).
    """

    def __init__(self, num_pos_feats: int, normalize: bool = True, scale: float | None = None,
                 temperature: int = 10000):
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even, got {num_pos_feats}")
        if scale is not None and not normalize:
            raise ValueError("scale needs normalize=True")
        self.num_pos_feats = num_pos_feats // 2  # per axis
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self._cache: dict = {}

    def _encode(self, h: int, w: int, device) -> torch.Tensor:
        ys = torch.arange(1, h + 1, dtype=torch.float32, device=device).view(1, -1, 1).repeat(1, 1, w)
        xs = torch.arange(1, w + 1, dtype=torch.float32, device=device).view(1, 1, -1).repeat(1, h, 1)
        if self.normalize:
            eps = 1e-6
            ys = ys / (ys[:, -1:, :] + eps) * self.scale
            xs = xs / (xs[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        px = xs[:, :, :, None] / dim_t
        py = ys[:, :, :, None] / dim_t
        px = torch.stack((px[:, :, :, 0::2].sin(), px[:, :, :, 1::2].cos()), dim=4).flatten(3)
        py = torch.stack((py[:, :, :, 0::2].sin(), py[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)[0]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, num_pos_feats, H, W] float32 for a feature map ``x`` [B, C, H, W]."""
        key = (x.shape[-2], x.shape[-1], x.device)
        if key not in self._cache:
            self._cache[key] = self._encode(x.shape[-2], x.shape[-1], x.device)
        return self._cache[key][None].repeat(x.shape[0], 1, 1, 1)


# ---- Hiera trunk ---------------------------------------------------------------------------
def window_partition(x: torch.Tensor, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """[B, H, W, C] -> [B * windows, size, size, C], zero-padding H and W up to multiples of ``size``."""
    b, h, w, c = x.shape
    pad_h, pad_w = (size - h % size) % size, (size - w % size) % size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // size, size, wp // size, size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, size, size, c), (hp, wp)


def window_unpartition(windows: torch.Tensor, size: int, padded: tuple[int, int],
                       hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of ``window_partition``: back to [B, H, W, C], padding cropped."""
    hp, wp = padded
    h, w = hw
    b = windows.shape[0] // (hp * wp // size // size)
    x = windows.reshape(b, hp // size, wp // size, size, size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w, :]
    return x


def pool_hw(x: torch.Tensor, pool: nn.Module | None) -> torch.Tensor:
    """Apply a 2-D pooling to a channels-last [B, H, W, C] map."""
    if pool is None:
        return x
    return pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class PatchEmbed(nn.Module):
    """7x7 stride-4 convolution, output channels-last [B, H/4, W/4, C]."""

    def __init__(self, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=4, padding=3)

    def forward(self, x):
        return self.proj(x).permute(0, 2, 3, 1)


class Mlp(nn.Module):
    """Two linear layers with GELU, under the reference's ``layers.{0,1}`` names."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, hidden), nn.Linear(hidden, dim)])
        self.act = nn.GELU()

    def forward(self, x):
        return self.layers[1](self.act(self.layers[0](x)))


class MultiScaleAttention(nn.Module):
    """Multi-head self-attention on a [B, H, W, C] map; with ``q_pool`` the queries (only) are
    max-pooled, so the output has the pooled grid (how Hiera downsamples between stages)."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_pool: nn.Module | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.q_pool = q_pool
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x):
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1)
        q, k, v = torch.unbind(qkv, 2)  # each [B, N, heads, C/heads]
        if self.q_pool is not None:
            q = pool_hw(q.reshape(b, h, w, -1), self.q_pool)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, self.num_heads, -1)
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(x.transpose(1, 2).reshape(b, h, w, -1))


class MultiScaleBlock(nn.Module):
    """Pre-LN transformer block with optional window attention and, at a stage change, q-pooling plus
    a projected, pooled shortcut. Windows are cut before attention and re-assembled on the pooled grid."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, window_size: int = 0,
                 q_stride: tuple[int, int] | None = None, mlp_ratio: float = 4.0):
        super().__init__()
        self.dim, self.dim_out = dim, dim_out
        self.window_size = window_size
        self.q_stride = q_stride
        self.pool = nn.MaxPool2d(kernel_size=q_stride, stride=q_stride) if q_stride else None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, q_pool=self.pool)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio))
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x):  # [B, H, W, C]
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            shortcut = pool_hw(self.proj(x), self.pool)
        size = self.window_size
        if size > 0:
            hw = (x.shape[1], x.shape[2])
            x, padded = window_partition(x, size)
        x = self.attn(x)
        if self.q_stride:
            # the windows shrank with the queries: re-assemble on the pooled grid
            size = self.window_size // self.q_stride[0]
            hw = (shortcut.shape[1], shortcut.shape[2])
            padded = tuple(n + (size - n % size) % size for n in hw)
        if self.window_size > 0:
            x = window_unpartition(x, size, padded, hw)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class Hiera(nn.Module):
    """Hierarchical ViT (Ryali et al. 2023) as in SAM2; returns each stage's output, highest
    resolution first, as [B, C, H, W] (permuted views of channels-last tensors)."""

    def __init__(self, embed_dim: int = 96, num_heads: int = 1, stages=(1, 2, 7, 2),
                 global_att_blocks=(5, 7, 9), window_spec=(8, 4, 14, 7),
                 window_pos_embed_bkg_spatial_size=(7, 7), q_pool: int = 3, q_stride=(2, 2),
                 dim_mul: float = 2.0, head_mul: float = 2.0):
        super().__init__()
        if len(stages) != len(window_spec):
            raise ValueError("one window size per stage")
        self.stage_ends = [sum(stages[:i]) - 1 for i in range(1, len(stages) + 1)]
        pool_blocks = [end + 1 for end in self.stage_ends[:-1]][:q_pool]
        self.patch_embed = PatchEmbed(embed_dim)
        # windowed absolute position embedding (Bolya et al. 2023): a background table interpolated
        # to the patch grid plus a window-sized table tiled over it
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, embed_dim, window_spec[0], window_spec[0]))
        self.blocks = nn.ModuleList()
        stage = 0
        for i in range(sum(stages)):
            dim_out = embed_dim
            # the first block of a stage still uses the previous stage's window size
            window = 0 if i in global_att_blocks else window_spec[stage]
            if i - 1 in self.stage_ends:
                dim_out = int(embed_dim * dim_mul)
                num_heads = int(num_heads * head_mul)
                stage += 1
            self.blocks.append(MultiScaleBlock(embed_dim, dim_out, num_heads, window_size=window,
                                               q_stride=tuple(q_stride) if i in pool_blocks else None))
            embed_dim = dim_out
        self.channel_list = [self.blocks[i].dim_out for i in self.stage_ends[::-1]]

    def _pos_embed(self, hw: tuple[int, int]) -> torch.Tensor:
        pos = F.interpolate(self.pos_embed, size=hw, mode="bicubic")
        win = self.pos_embed_window
        pos = pos + win.tile([a // b for a, b in zip(pos.shape, win.shape)])
        return pos.permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        x = x + self._pos_embed(x.shape[1:3])
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stage_ends:
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs


# ---- FPN neck and the encoder --------------------------------------------------------------
class Lateral(nn.Module):
    """1x1 projection of one trunk level (a module of its own for the ``convs.{i}.conv`` names)."""

    def __init__(self, dim: int, d_model: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, d_model, kernel_size=1)

    def forward(self, x):
        return self.conv(x)


class FpnNeck(nn.Module):
    """Laterals to ``d_model`` channels; levels in ``top_down_levels`` also get the coarser level's
    output, nearest-upsampled x2 in float32 (no output convs). Returns (features, pos), finest first."""

    def __init__(self, d_model: int = 256, backbone_channel_list=(768, 384, 192, 96),
                 top_down_levels=(2, 3), position_encoding: nn.Module | None = None):
        super().__init__()
        self.backbone_channel_list = list(backbone_channel_list)
        self.convs = nn.ModuleList([Lateral(dim, d_model) for dim in backbone_channel_list])
        self.top_down_levels = set(top_down_levels)
        self.position_encoding = position_encoding or PositionEmbeddingSine(d_model)

    def forward(self, xs: list[torch.Tensor], levels: int | None = None):
        """``levels``: how many of the finest levels to return (the coarser ones are still computed
        when a returned level needs them as top-down input)."""
        n = len(self.convs) - 1
        if len(xs) != n + 1:
            raise ValueError(f"expected {n + 1} trunk levels, got {len(xs)}")
        keep = n + 1 if levels is None else levels
        out, pos = [None] * (n + 1), [None] * (n + 1)
        prev = None
        for i in range(n, -1, -1):  # coarse to fine
            lateral = self.convs[n - i](xs[i])
            if i in self.top_down_levels and prev is not None:
                top_down = F.interpolate(prev.to(dtype=torch.float32), scale_factor=2.0, mode="nearest",
                                         align_corners=None, antialias=False)
                prev = lateral + top_down
            else:
                prev = lateral
            out[i] = prev
            if i < keep:
                pos[i] = self.position_encoding(prev).to(prev.dtype)
        return out[:keep], pos[:keep]


class ImageEncoder(nn.Module):
    """Trunk + neck; the coarsest ``scalp`` levels are dropped. ``forward`` returns the authors' dict:
    ``vision_features`` (the coarsest kept level), ``vision_pos_enc`` and ``backbone_fpn`` (finest first,
    before the mask decoder's ``conv_s0``/``conv_s1``)."""

    def __init__(self, trunk: Hiera | None = None, neck: FpnNeck | None = None, scalp: int = 1):
        super().__init__()
        self.trunk = trunk if trunk is not None else Hiera()
        self.neck = neck if neck is not None else FpnNeck()
        self.scalp = scalp
        if self.trunk.channel_list != self.neck.backbone_channel_list:
            raise ValueError(f"trunk channels {self.trunk.channel_list} != neck's {self.neck.backbone_channel_list}")

    def forward(self, sample: torch.Tensor) -> dict:
        if sample.ndim != 4 or sample.shape[1] != 3:
            raise ValueError(f"expected [B, 3, H, W] frames, got {tuple(sample.shape)}")
        levels = len(self.neck.convs) - self.scalp
        features, pos = self.neck(self.trunk(sample), levels=levels)
        return {"vision_features": features[-1], "vision_pos_enc": pos, "backbone_fpn": features}
