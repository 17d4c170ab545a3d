"""CLIP-style causal text transformer and the language head of BiomedParse v1.

``TextTransformer`` (12 layers, width 512, 8 heads, QuickGELU, TF-style LayerNorm eps 1e-12
computed in float32, causal mask) gives per-token hidden states. ``LanguageEncoder`` projects
them with ``lang_proj`` [512, 512]: every token (the decoder's grounding tokens) and the hidden
state at the first <|endoftext|> (the prompt's class embedding, matched against the decoder's
query captions with temperature ``exp(logit_scale)``). Checkpoint prefix:
``sem_seg_head.predictor.lang_encoder``.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import MultiheadAttention


class TFLayerNorm(nn.Module):
    """LayerNorm with epsilon inside the square root, computed in float32."""

    def __init__(self, width: int, eps: float = 1e-12):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight * x.to(dtype) + self.bias


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = MultiheadAttention(width, heads)
        self.ln_1 = TFLayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * 4))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(width * 4, width))
        self.ln_2 = TFLayerNorm(width)

    def forward(self, x, attn_mask):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, attn_mask=attn_mask, need_weights=False)
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """input_ids [N, 77] -> last hidden state [N, 77, width] (after ``ln_final``)."""

    def __init__(self, context_length: int = 77, vocab_size: int = 49408, width: int = 512, layers: int = 12,
                 heads: int = 8):
        super().__init__()
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])
        self.ln_final = TFLayerNorm(width)

    def causal_mask(self, device, dtype):
        n = self.context_length
        return torch.full((n, n), float("-inf"), device=device, dtype=dtype).triu_(1)

    def forward(self, input_ids):
        x = self.token_embedding(input_ids) + self.positional_embedding
        mask = self.causal_mask(x.device, x.dtype)
        x = x.permute(1, 0, 2)
        for block in self.resblocks:
            x = block(x, mask)
        return self.ln_final(x.permute(1, 0, 2))


class LanguageEncoder(nn.Module):
    """Text transformer + ``lang_proj`` + ``logit_scale`` (names as in the checkpoint).

    ``transformer_name`` is the attribute (checkpoint name) of the text transformer: ``lang_encoder``
    in v1; BiomedParse v2 keeps the same network under ``encoder_transformer``.
    """

    def __init__(self, width: int = 512, dim_proj: int = 512, transformer_name: str = "lang_encoder",
                 **transformer_kwargs):
        super().__init__()
        self.transformer_name = transformer_name
        self.add_module(transformer_name, TextTransformer(width=width, **transformer_kwargs))
        self.lang_proj = nn.Parameter(torch.empty(width, dim_proj))
        self.logit_scale = nn.Parameter(torch.ones([]))

    def forward(self, input_ids, attention_mask=None):
        """(token_emb [N, 77, P], class_emb [N, P]); class_emb is taken at the first EOT (= argmax id)."""
        hidden = getattr(self, self.transformer_name)(input_ids)
        class_x = hidden[torch.arange(hidden.size(0), device=hidden.device), input_ids.argmax(dim=-1)]
        return hidden @ self.lang_proj, class_x @ self.lang_proj

    def temperature(self):
        """exp(logit_scale) clamped at 100, as the reference's ``vl_similarity``."""
        return self.logit_scale.exp().clamp(max=100)
