"""SEEM-style mask decoder of BiomedParse v1 (text-grounding path only).

101 learnable object queries, 9 post-norm layers. Layer i: masked cross-attention of the queries
to feature level i % 3 (32x32, 64x64, 128x128 for a 1024 input; mask = sigmoid of the previous
prediction < 0.5 resized bilinearly, rows masked everywhere unmasked), then self-attention over
[queries; grounding tokens] (the prompt tokens are both content and position, and attend to the
queries and to each other), then an FFN. Prediction heads run before layer 0 and after every
layer: LayerNorm, a 3-layer MLP dotted with the per-pixel mask features (mask logits), and
``class_embed`` (the query captions compared with the prompt embedding).

Spatial/visual prompting (``pn_indicator``, ``mask_sptial_embed``, ``spatial_*``) is not built:
those checkpoint entries are dropped by the loader, by name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MultiheadAttention, NanSafeMultiheadAttention
from .position import sine_position_encoding
from .text_encoder import LanguageEncoder


class SelfAttentionLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.self_attn = NanSafeMultiheadAttention(d_model, nhead)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, attn_mask=None):
        q = k = tgt + query_pos
        return self.norm(tgt + self.self_attn(q, k, tgt, attn_mask=attn_mask))


class CrossAttentionLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.multihead_attn = MultiheadAttention(d_model, nhead)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt, memory, attn_mask, pos, query_pos):
        out = self.multihead_attn(tgt + query_pos, memory + pos, memory, attn_mask=attn_mask)
        return self.norm(tgt + out)


class FFNLayer(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt):
        return self.norm(tgt + self.linear2(F.relu(self.linear1(tgt))))


class MLP(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, outs))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class SEEMDecoder(nn.Module):
    """Checkpoint prefix ``sem_seg_head.predictor``; also owns the language encoder (``lang_encoder``)."""

    num_feature_levels = 3
    #: True (default): the reference's sequence-first views of the feature maps; with parameters that require
    #: grad (as built) the outputs are bit-identical to the authors' on CPU. False: contiguous copies, made once;
    #: use it when parameters are frozen (requires_grad False), where torch would otherwise project the strided
    #: views row by row (slow; one kernel per row on GPU). Results then differ by float noise only.
    exact_layout = True

    def __init__(self, hidden_dim: int = 512, dim_proj: int = 512, num_queries: int = 101, nheads: int = 8,
                 dim_feedforward: int = 2048, dec_layers: int = 9, mask_dim: int = 512):
        super().__init__()
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.num_queries = num_queries
        self.hidden_dim = hidden_dim
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads) for _ in range(dec_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads) for _ in range(dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.lang_encoder = LanguageEncoder(width=512, dim_proj=dim_proj)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.class_embed = nn.Parameter(torch.empty(hidden_dim, dim_proj))

    def prediction_heads(self, output, mask_features, attn_mask_size):
        """(mask logits [B,Q,h,w], captions [B,Q,P], cross-attention mask [B*heads, Q, prod(size)])."""
        decoder_output = self.decoder_norm(output).transpose(0, 1)
        captions = decoder_output @ self.class_embed
        mask_embed = self.mask_embed(decoder_output)
        if mask_features.shape[0] == mask_embed.shape[0]:
            masks = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        else:  # one image shared by several prompt groups
            masks = torch.einsum("bqc,chw->bqhw", mask_embed, mask_features[0])
        attn = F.interpolate(masks, size=attn_mask_size, mode="bilinear", align_corners=False)
        attn = attn.sigmoid().flatten(2).unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1) < 0.5
        return masks, captions, attn.detach()

    def forward(self, multi_scale_features, mask_features, grounding_tokens):
        """Decode one or more prompt groups.

        multi_scale_features: 3 maps [B or 1, C, h, w] (coarse to fine); mask_features [B or 1, C, H, W];
        grounding_tokens: [T, B, C] (sequence first), all valid tokens of a group (no padding).
        Returns {'pred_masks': [B, Q, H, W], 'pred_captions': [B, Q, P]} of the last layer.
        """
        bs = grounding_tokens.shape[1]
        src, pos, sizes = [], [], []
        for i in range(self.num_feature_levels):
            x = multi_scale_features[i]
            sizes.append(x.shape[-2:])
            p = sine_position_encoding(x, self.hidden_dim // 2).flatten(2).permute(2, 0, 1)
            s = (x.flatten(2) + self.level_embed.weight[i][None, :, None]).permute(2, 0, 1)
            if not self.exact_layout:
                s, p = s.contiguous(), p.contiguous()
            if s.shape[1] != bs:
                s, p = s.expand(-1, bs, -1), p.expand(-1, bs, -1)
            src.append(s)
            pos.append(p)

        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        queries = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)
        tokens = grounding_tokens
        token_pos = grounding_tokens.detach().clone()
        nq = queries.shape[0]
        self_pos = torch.cat([query_pos, token_pos])

        masks, captions, attn_mask = self.prediction_heads(queries, mask_features, sizes[0])
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
            queries = self.transformer_cross_attention_layers[i](queries, src[level], attn_mask, pos[level], query_pos)
            x = self.transformer_self_attention_layers[i](torch.cat([queries, tokens]), self_pos)
            x = self.transformer_ffn_layers[i](x)
            queries, tokens = x[:nq], x[nq:]
            next_size = sizes[(i + 1) % self.num_feature_levels]
            masks, captions, attn_mask = self.prediction_heads(queries, mask_features, next_size)
        return {"pred_masks": masks, "pred_captions": captions}
