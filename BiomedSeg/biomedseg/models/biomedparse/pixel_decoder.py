"""Pixel decoder of BiomedParse v1: transformer encoder on res5, then a top-down FPN.

res5 -> 1x1 ``input_proj`` -> 6 post-norm encoder layers (sine position encoding) -> ``layer_4``;
then for res4, res3, res2: 1x1 ``adapter_k`` + nearest-upsampled coarser map -> 3x3 ``layer_k``
(GroupNorm 32, ReLU). The decoder receives the first three maps ([1/32, 1/16, 1/8]); the
stride-4 map goes through ``mask_features`` (3x3 conv with bias) to give per-pixel embeddings.
The convs are detectron2-style (conv, then norm, then activation) under the checkpoint's names.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .attention import MultiheadAttention
from .position import sine_position_encoding


class ConvNorm(nn.Conv2d):
    """Conv2d followed by an optional GroupNorm(32) and ReLU (detectron2 ``Conv2d(norm=..., activation=...)``)."""

    def __init__(self, cin: int, cout: int, kernel: int, *, norm: bool, relu: bool):
        super().__init__(cin, cout, kernel_size=kernel, padding=kernel // 2, bias=not norm)
        self.norm = nn.GroupNorm(32, cout) if norm else None
        self.relu = relu

    def forward(self, x):
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        return F.relu(x) if self.relu else x


class EncoderLayer(nn.Module):
    """DETR post-norm encoder layer: positions added to queries and keys only."""

    def __init__(self, d_model: int = 512, nhead: int = 8, dim_feedforward: int = 2048):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos):
        q = k = src + pos
        src = self.norm1(src + self.self_attn(q, k, src))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class TransformerEncoder(nn.Module):
    def __init__(self, num_layers: int = 6, d_model: int = 512, nhead: int = 8, dim_feedforward: int = 2048):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(d_model, nhead, dim_feedforward) for _ in range(num_layers)])

    def forward(self, src, pos):
        for layer in self.layers:
            src = layer(src, pos)
        return src


class TransformerEncoderOnly(nn.Module):
    """Holds ``encoder`` (checkpoint prefix ``transformer.encoder``); maps [N,C,H,W] -> [N,C,H,W]."""

    #: See ``SEEMDecoder.exact_layout``: False makes the flattened maps contiguous (for frozen parameters).
    exact_layout = True

    def __init__(self, d_model: int = 512, num_layers: int = 6):
        super().__init__()
        self.encoder = TransformerEncoder(num_layers, d_model)

    def forward(self, src, pos_embed):
        bs, c, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        if not self.exact_layout:
            src, pos_embed = src.contiguous(), pos_embed.contiguous()
        memory = self.encoder(src, pos_embed)
        return memory.permute(1, 2, 0).view(bs, c, h, w)


class PixelDecoder(nn.Module):
    """Returns (mask_features [N,512,H/4,W/4], transformer_encoder_features, [1/32, 1/16, 1/8] maps)."""

    def __init__(self, in_channels=(192, 384, 768, 1536), conv_dim: int = 512, mask_dim: int = 512,
                 enc_layers: int = 6):
        super().__init__()
        n = len(in_channels)
        for idx, cin in enumerate(in_channels[:-1]):
            self.add_module(f"adapter_{idx + 1}", ConvNorm(cin, conv_dim, 1, norm=True, relu=False))
            self.add_module(f"layer_{idx + 1}", ConvNorm(conv_dim, conv_dim, 3, norm=True, relu=True))
        self.mask_features = ConvNorm(conv_dim, mask_dim, 3, norm=False, relu=False)
        self.input_proj = ConvNorm(in_channels[-1], conv_dim, 1, norm=False, relu=False)
        self.transformer = TransformerEncoderOnly(conv_dim, enc_layers)
        self.add_module(f"layer_{n}", ConvNorm(conv_dim, conv_dim, 3, norm=True, relu=True))
        self.conv_dim = conv_dim
        self.num_levels = n

    def forward(self, features: dict):
        names = [f"res{i + 2}" for i in range(self.num_levels)]
        multi_scale = []
        y = None
        encoder_features = None
        for idx in range(self.num_levels - 1, -1, -1):
            x = features[names[idx]]
            if y is None:
                src = self.input_proj(x)
                pos = sine_position_encoding(x, self.conv_dim // 2)
                encoder_features = self.transformer(src, pos)
                y = getattr(self, f"layer_{idx + 1}")(encoder_features)
            else:
                lateral = getattr(self, f"adapter_{idx + 1}")(x)
                y = lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest")
                y = getattr(self, f"layer_{idx + 1}")(y)
            if len(multi_scale) < 3:
                multi_scale.append(y)
        return self.mask_features(y), encoder_features, multi_scale
