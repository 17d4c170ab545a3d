"""FocalNet-L image encoder of BiomedParse v1 (res2..res5 at strides 4..32).

Configuration of the released model: embed 192, depths (2, 2, 18, 2), 4 focal levels with
depthwise kernels 3/5/7/9, overlapping conv stems (7x7/4 then 3x3/2), post-LayerNorm blocks with
layer scale, and a context divided by (levels + 1). Names match the checkpoint
(``backbone.layers.{i}.blocks.{j}.modulation.f`` ...). Tensor layouts (permute/contiguous/view)
follow the reference so convolutions see the same memory formats and round the same way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class FocalModulation(nn.Module):
    """Gated sum of depthwise-conv contexts at growing kernel sizes plus a global context."""

    def __init__(self, dim: int, focal_level: int = 4, focal_window: int = 3, focal_factor: int = 2):
        super().__init__()
        self.focal_level = focal_level
        self.f = nn.Linear(dim, 2 * dim + focal_level + 1)
        self.h = nn.Conv2d(dim, dim, kernel_size=1)
        self.proj = nn.Linear(dim, dim)
        self.focal_layers = nn.ModuleList()
        for k in range(focal_level):
            size = focal_factor * k + focal_window
            self.focal_layers.append(nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size=size, groups=dim, padding=size // 2, bias=False), nn.GELU()))

    def forward(self, x):  # x: [B, H, W, C]
        c = x.shape[-1]
        x = self.f(x).permute(0, 3, 1, 2).contiguous()
        q, ctx, gates = torch.split(x, (c, c, self.focal_level + 1), 1)
        ctx_all = 0
        for level in range(self.focal_level):
            ctx = self.focal_layers[level](ctx)
            ctx_all = ctx_all + ctx * gates[:, level:level + 1]
        ctx_global = F.gelu(ctx.mean(2, keepdim=True).mean(3, keepdim=True))
        ctx_all = ctx_all + ctx_global * gates[:, self.focal_level:]
        ctx_all = ctx_all / (self.focal_level + 1)
        out = (q * self.h(ctx_all)).permute(0, 2, 3, 1).contiguous()
        return self.proj(out)


class FocalBlock(nn.Module):
    """Post-LN block: x + g1 * LN(modulation(x)); x + g2 * LN(mlp(x))."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, focal_level: int = 4, focal_window: int = 3):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.modulation = FocalModulation(dim, focal_level, focal_window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma_1 = nn.Parameter(torch.full((dim,), 1e-4))
        self.gamma_2 = nn.Parameter(torch.full((dim,), 1e-4))

    def forward(self, x, h: int, w: int):  # x: [B, H*W, C]
        b, length, c = x.shape
        shortcut = x
        x = self.modulation(x.view(b, h, w, c)).view(b, h * w, c)
        x = shortcut + self.gamma_1 * self.norm1(x)
        return x + self.gamma_2 * self.norm2(self.mlp(x))


class PatchEmbed(nn.Module):
    """Overlapping conv embedding + LayerNorm: 7x7 stride 4 (stem) or 3x3 stride 2 (between stages)."""

    def __init__(self, in_chans: int, embed_dim: int, is_stem: bool):
        super().__init__()
        kernel, stride, pad = (7, 4, 2) if is_stem else (3, 2, 1)
        self.patch = 4 if is_stem else 2
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel, stride=stride, padding=pad)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        _, _, h, w = x.shape
        if w % self.patch:
            x = F.pad(x, (0, self.patch - w % self.patch))
        if h % self.patch:
            x = F.pad(x, (0, 0, 0, self.patch - h % self.patch))
        x = self.proj(x)
        hh, ww = x.shape[2], x.shape[3]
        x = self.norm(x.flatten(2).transpose(1, 2))
        return x.transpose(1, 2).view(-1, self.embed_dim, hh, ww)


class FocalStage(nn.Module):
    def __init__(self, dim: int, depth: int, downsample: bool, focal_level: int, focal_window: int):
        super().__init__()
        self.blocks = nn.ModuleList([FocalBlock(dim, 4.0, focal_level, focal_window) for _ in range(depth)])
        self.downsample = PatchEmbed(dim, 2 * dim, is_stem=False) if downsample else None

    def forward(self, x, h: int, w: int):
        for blk in self.blocks:
            x = blk(x, h, w)
        if self.downsample is None:
            return x, x, h, w
        down = self.downsample(x.transpose(1, 2).view(x.shape[0], x.shape[-1], h, w))
        return x, down.flatten(2).transpose(1, 2), (h + 1) // 2, (w + 1) // 2


class FocalNet(nn.Module):
    """Returns {'res2': [B,192,H/4,W/4], 'res3': 384 @ /8, 'res4': 768 @ /16, 'res5': 1536 @ /32}."""

    size_divisibility = 32

    def __init__(self, embed_dim: int = 192, depths=(2, 2, 18, 2), focal_levels=(4, 4, 4, 4),
                 focal_windows=(3, 3, 3, 3)):
        super().__init__()
        self.num_features = [embed_dim * 2 ** i for i in range(len(depths))]
        self.patch_embed = PatchEmbed(3, embed_dim, is_stem=True)
        self.layers = nn.ModuleList([
            FocalStage(self.num_features[i], depths[i], i < len(depths) - 1, focal_levels[i], focal_windows[i])
            for i in range(len(depths))])
        for i, ch in enumerate(self.num_features):
            self.add_module(f"norm{i}", nn.LayerNorm(ch))

    def forward(self, x):
        x = self.patch_embed(x)
        h, w = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)
        outs = {}
        for i, stage in enumerate(self.layers):
            x_out, x, hn, wn = stage(x, h, w)
            x_out = getattr(self, f"norm{i}")(x_out)
            outs[f"res{i + 2}"] = x_out.view(-1, h, w, self.num_features[i]).permute(0, 3, 1, 2).contiguous()
            h, w = hn, wn
        return outs
