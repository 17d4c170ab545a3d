"""BiomedCLIP's image tower: a ViT-B/16 at 224x224 under timm's tensor names, plus the projection.

The names are those of the authors' checkpoint (``visual.trunk.*`` is timm's ``VisionTransformer``,
``visual.head.proj`` open_clip's linear head), so the file loads strictly. The numerics follow
shared/parity/biomedclip/README.md: pre-norm blocks with LayerNorm eps 1e-6 (not torch's 1e-5:
that alone moves the features by 4e-3), fused qkv with bias, exact erf GELU, no layer scale, a final
norm over all tokens and the class token as the pooled feature. Attention runs through
``F.scaled_dot_product_attention`` as timm's fused path does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from biomedseg.errors import InputError

IMAGE_SIZE = 224
PATCH = 16
WIDTH = 768
DEPTH = 12
HEADS = 12
MLP_WIDTH = 3072
EMBED_DIM = 512
LN_EPS = 1e-6
GRID = IMAGE_SIZE // PATCH  # 14 x 14 patches
TOKENS = GRID * GRID + 1  # patches and the class token


class PatchEmbed(nn.Module):
    """16x16 patches, stride 16, as a convolution with bias; tokens in row-major patch order."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, WIDTH, kernel_size=PATCH, stride=PATCH)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        b, n, c = x.shape
        # qkv is laid out (3, heads, head_dim) along the output features
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(64) = 1/8
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(WIDTH, MLP_WIDTH)
        self.act = nn.GELU()  # exact (erf); the tanh form moves the features by 8e-4
        self.fc2 = nn.Linear(MLP_WIDTH, WIDTH)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(WIDTH, eps=LN_EPS)
        self.attn = Attention()
        self.norm2 = nn.LayerNorm(WIDTH, eps=LN_EPS)
        self.mlp = Mlp()

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """timm's ``vit_base_patch16_224`` without its classifier: returns the class token after ``norm``."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.pos_embed = nn.Parameter(torch.zeros(1, TOKENS, WIDTH))  # includes the class position
        self.patch_embed = PatchEmbed()
        self.blocks = nn.ModuleList(Block() for _ in range(DEPTH))
        self.norm = nn.LayerNorm(WIDTH, eps=LN_EPS)

    def forward_features(self, pixels):
        """All 197 tokens after the final norm, [B, 197, 768]."""
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, pixels):
        return self.forward_features(pixels)[:, 0]  # 'token' pooling; fc_norm is the identity here


class Head(nn.Module):
    """open_clip's linear head on the pooled feature: 768 -> 512, no bias (its dropout is p=0)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(WIDTH, EMBED_DIM, bias=False)

    def forward(self, pooled):
        return self.proj(pooled)


class ImageTower(nn.Module):
    """``visual``: pixels [B, 3, 224, 224] (already normalised, see preprocess) -> features [B, 512]."""

    def __init__(self):
        super().__init__()
        self.trunk = VisionTransformer()
        self.head = Head()

    def forward(self, pixels):
        if tuple(pixels.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise InputError(f"BiomedCLIP's image tower takes [B, 3, 224, 224], got {tuple(pixels.shape)}")
        return self.head(self.trunk(pixels))
