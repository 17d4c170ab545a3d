"""BoltzFormer text decoder of BiomedParse v2, with the per-slice existence classifier.

Checkpoint prefix ``sem_seg_head.predictor``. Compared with v1's SEEM decoder:

* 16 queries (``query_feat_``/``query_embed_``; the trailing underscore keeps them apart from SEEM's
  101), and each (slice, prompt) pair is its own batch item: the prompt's grounding tokens are the
  only text the queries see.
* A pre self-attention over [queries; text tokens] (position [query_embed; the initial text
  tokens]) and an FFN on the queries run before the first prediction head.
* The cross-attention mask of layer i is not a threshold of the previous masks but a Boltzmann
  sample of them (``sampler.BoltzmannSampler``; injectable, for repeatable or recorded runs). Rows
  blocked everywhere are unmasked, as in Mask2Former.
* Self-attention is plain ``nn.MultiheadAttention`` (no NaN guard: nothing is masked there; the
  zero rows padding shorter prompts are ordinary zero tokens, as in the authors' code).
* An existence classifier: one ``classifier_query`` token cross-attends, after every layer, to the
  detached [queries; text] output of that layer's self-attention (before the query FFN), with an
  FFN after each; ``classifier`` maps it to one logit per item.

``class_embed`` is in the checkpoint but feeds nothing on the 3D path; it is kept so the file loads
strictly. The per-layer outputs and the 17-class text embeddings the authors compute are not.
Op order and tensor layouts follow the authors' so float32 results agree to float noise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..biomedparse.attention import MultiheadAttention
from ..biomedparse.decoder import MLP, FFNLayer
from ..biomedparse.position import sine_position_encoding
from ..biomedparse.text_encoder import LanguageEncoder


class SelfAttentionLayer(nn.Module):
    """Post-norm self-attention; positions on queries and keys, not on values."""

    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos):
        q = k = tgt + query_pos
        return self.norm(tgt + self.self_attn(q, k, tgt))


class CrossAttentionLayer(nn.Module):
    """Post-norm cross-attention; ``query_pos`` may be None (the classifier token has no position)."""

    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.multihead_attn = MultiheadAttention(d_model, nhead)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt, memory, pos, query_pos=None, attn_mask=None):
        query = tgt if query_pos is None else tgt + query_pos
        out = self.multihead_attn(query, memory + pos, memory, attn_mask=attn_mask)
        return self.norm(tgt + out)


class BoltzFormerDecoder(nn.Module):
    """Owns the language encoder (``language_encoder``) and decodes [slice x prompt] items."""

    num_feature_levels = 3

    def __init__(self, hidden_dim: int = 512, dim_proj: int = 512, num_queries: int = 16, nheads: int = 8,
                 dim_feedforward: int = 2048, dec_layers: int = 9, mask_dim: int = 512):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.language_encoder = LanguageEncoder(width=512, dim_proj=dim_proj, transformer_name="encoder_transformer")
        self.initial_self_attention_layer = SelfAttentionLayer(hidden_dim, nheads)
        self.initial_ffn_layer = FFNLayer(hidden_dim, dim_feedforward)
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads) for _ in range(dec_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads) for _ in range(dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(hidden_dim, dim_feedforward) for _ in range(dec_layers))
        self.classifier_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads) for _ in range(dec_layers))
        self.classifier_ffn_layers = nn.ModuleList(FFNLayer(hidden_dim, dim_feedforward) for _ in range(dec_layers))
        self.classifier = nn.Linear(hidden_dim, 1)
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat_ = nn.Embedding(num_queries, hidden_dim)
        self.query_embed_ = nn.Embedding(num_queries, hidden_dim)
        self.classifier_query = nn.Embedding(1, hidden_dim)
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        #: In the checkpoint, unused on this path (v1-style query captions).
        self.class_embed = nn.Parameter(torch.empty(hidden_dim, dim_proj))

    def prediction_head(self, output, mask_features, size, layer_id: int, sampler):
        """(mask logits [N, Q, H, W], sampled cross-attention mask [N * heads, Q, h * w], True = blocked)."""
        decoder_output = self.decoder_norm(output).transpose(0, 1)
        mask_embed = self.mask_embed(decoder_output)
        masks = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        attn = F.interpolate(masks.detach(), size=size, mode="bilinear", align_corners=False)
        return masks, sampler(attn.sigmoid().flatten(2), layer_id, self.num_heads)

    def forward(self, multi_scale_features, mask_features, grounding_tokens, sampler, trace: dict | None = None):
        """Decode N = slices x prompts items.

        multi_scale_features: 3 maps [N, C, h, w] (16, 32, 64 px for a 512 input); mask_features
        [N, C, 128, 128]; grounding_tokens [L, N, C] (sequence first); ``sampler`` gives the attention
        masks (``sampler.py``). Returns (last-layer masks of all queries [N, Q, 128, 128],
        existence logits [N, 1]). ``trace``, if a dict, receives ``head_queries``: the query states
        [Q, N, C] entering each of the 10 prediction-head calls.
        """
        src, pos, sizes = [], [], []
        for i in range(self.num_feature_levels):
            x = multi_scale_features[i]
            sizes.append(x.shape[-2:])
            pos.append(sine_position_encoding(x, self.hidden_dim // 2).flatten(2).permute(2, 0, 1))
            src.append((x.flatten(2) + self.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
        bs = src[0].shape[1]
        nq = self.num_queries
        heads_in = trace.setdefault("head_queries", []) if trace is not None else None

        query_embed = self.query_embed_.weight.unsqueeze(1).repeat(1, bs, 1)
        output = self.query_feat_.weight.unsqueeze(1).repeat(1, bs, 1)
        cls_output = self.classifier_query.weight.unsqueeze(1).repeat(1, bs, 1)
        text_output = grounding_tokens
        text_embed = text_output.detach().clone()

        combined = self.initial_self_attention_layer(torch.cat([output, text_output]),
                                                     torch.cat([query_embed, text_embed]))
        output, text_output = combined[:nq], combined[nq:]
        output = self.initial_ffn_layer(output)
        if heads_in is not None:
            heads_in.append(output)
        masks, attn_mask = self.prediction_head(output, mask_features, sizes[0], -1, sampler)

        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
            output = self.transformer_cross_attention_layers[i](output, src[level], pos[level], query_embed,
                                                                attn_mask)
            combined_embed = torch.cat([query_embed, text_embed])
            combined = self.transformer_self_attention_layers[i](torch.cat([output, text_output]), combined_embed)
            output, text_output = combined[:nq], combined[nq:]
            output = self.transformer_ffn_layers[i](output)
            if heads_in is not None:
                heads_in.append(output)
            # The last call's mask is unused, but its draws are made (the authors' random stream).
            masks, attn_mask = self.prediction_head(output, mask_features, sizes[(i + 1) % self.num_feature_levels],
                                                    i, sampler)
            cls_output = self.classifier_cross_attention_layers[i](cls_output, combined.detach(),
                                                                   combined_embed.detach())
            cls_output = self.classifier_ffn_layers[i](cls_output)
        return masks, self.classifier(cls_output[0])
