"""Multi-head attention with the parameter layout of ``torch.nn.MultiheadAttention``.

Checkpoint keys are ``in_proj_weight``/``in_proj_bias``/``out_proj.{weight,bias}``, so the
modules keep those names. Two numerical behaviours exist in BiomedParse v1 and both are kept:
* ``MultiheadAttention``: what ``nn.MultiheadAttention`` computes (sequence-first tensors).
  It calls ``F.multi_head_attention_forward`` with the same arguments the authors' modules
  pass, so the arithmetic (separate or packed projections, bmm or SDPA) is the same.
* ``NanSafeMultiheadAttention``: the SEEM decoder's self-attention, whose softmax is followed by
  ``nan_to_num`` so rows masked everywhere (padding tokens) become zeros instead of NaN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _PackedProjections(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)


class MultiheadAttention(_PackedProjections):
    """``nn.MultiheadAttention`` (batch_first=False, no dropout) with explicit arguments."""

    def forward(self, query, key, value, attn_mask=None, key_padding_mask=None, need_weights: bool = True):
        out, _ = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads,
            self.in_proj_weight, self.in_proj_bias, None, None, False, 0.0,
            self.out_proj.weight, self.out_proj.bias, training=False,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=True)
        return out


class NanSafeMultiheadAttention(_PackedProjections):
    """SEEM's attention: bool mask filled with -inf, softmax, ``nan_to_num``; inputs are (L, N, E)."""

    def forward(self, query, key, value, attn_mask=None):
        tgt_len, bsz, embed_dim = query.shape
        heads = self.num_heads
        head_dim = embed_dim // heads
        w, b = self.in_proj_weight, self.in_proj_bias
        e = embed_dim
        if (query is key or torch.equal(query, key)) and (key is value or torch.equal(key, value)):
            q, k, v = F.linear(query, w, b).chunk(3, dim=-1)
        elif key is value or torch.equal(key, value):
            q = F.linear(query, w[:e], b[:e])
            k, v = F.linear(key, w[e:], b[e:]).chunk(2, dim=-1)
        else:
            q = F.linear(query, w[:e], b[:e])
            k = F.linear(key, w[e:2 * e], b[e:2 * e])
            v = F.linear(value, w[2 * e:], b[2 * e:])
        q = q * float(head_dim) ** -0.5
        q = q.contiguous().view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.contiguous().view(-1, bsz * heads, head_dim).transpose(0, 1)
        v = v.contiguous().view(-1, bsz * heads, head_dim).transpose(0, 1)
        weights = torch.bmm(q, k.transpose(1, 2))
        if attn_mask is not None:
            weights.masked_fill_(attn_mask, float("-inf"))
        weights = F.softmax(weights, dim=-1).nan_to_num()
        out = torch.bmm(weights, v)
        out = out.transpose(0, 1).contiguous().view(tgt_len, bsz, embed_dim)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias)
