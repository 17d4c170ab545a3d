"""BiomedCLIP's text tower: BiomedBERT (``transformers.BertModel``, no pooler), CLS pooling, MLP projection.

The authors' open_clip fetches the BiomedBERT config from another hub repo at build time; here it is
written out from the facts in shared/parity/biomedclip/README.md, so nothing is fetched. Every field
that changes the numbers is set explicitly rather than left to the installed transformers' defaults:
exact GELU, LayerNorm eps 1e-12, pad id 0, 512 positions, 2 token types. Dropouts are 0 because
this is an inference-only port: a module left in train mode still gives eval results.

Pooling is ``last_hidden_state[:, 0]`` (the [CLS] token), not BERT's tanh pooler, which this model
does not have. The attention mask is built here from the ids (``ids != 0``), as the authors do; running
without it moves the pooled feature by up to 3.3. transformers is imported only when a tower is built.
"""
from __future__ import annotations

from torch import nn

from biomedseg.errors import DependencyMissingError

PAD_ID = 0
WIDTH = 768
PROJ_HIDDEN = (WIDTH + 512) // 2  # 640: open_clip's 'mlp' projection takes the mean of the widths
EMBED_DIM = 512
MAX_POSITIONS = 512


def bert_config():
    """The BiomedBERT base (uncased, abstract) configuration, without fetching it."""
    try:
        from transformers import BertConfig
    except ImportError as exc:  # the Slicer-side environment, or a worker without the extra
        raise DependencyMissingError("BiomedCLIP's text tower needs the 'transformers' package.",
                                     hint="Install biomedseg[worker] in the worker's environment.") from exc
    return BertConfig(
        vocab_size=30522, hidden_size=WIDTH, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=MAX_POSITIONS, type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=PAD_ID,
        attn_implementation="sdpa")


class ClsPooler(nn.Module):
    """The hidden state of the first token ([CLS]); a module so hooks can see it, as in open_clip."""

    def forward(self, last_hidden_state):
        return last_hidden_state[:, 0]


class TextTower(nn.Module):
    """``text``: token ids [B, L] (L <= 512, pads 0 at the end) -> features [B, 512]."""

    def __init__(self):
        super().__init__()
        from transformers import BertModel

        self.transformer = BertModel(bert_config(), add_pooling_layer=False)
        self.pooler = ClsPooler()
        self.proj = nn.Sequential(nn.Linear(WIDTH, PROJ_HIDDEN, bias=False), nn.GELU(),
                                  nn.Linear(PROJ_HIDDEN, EMBED_DIM, bias=False))

    def hidden_states(self, ids):
        """BERT's last hidden state [B, L, 768], with the padding masked out of every softmax."""
        mask = (ids != PAD_ID).long()
        return self.transformer(input_ids=ids, attention_mask=mask).last_hidden_state

    def forward(self, ids):
        return self.proj(self.pooler(self.hidden_states(ids)))
