"""The BiomedParse v2 forward pass as the engine uses it: encode slices once, decode per prompt list.

The authors' ``forward_eval`` interleaves image and text work per slice batch. The arithmetic only
depends on each (slice, prompt) item, so it is split here into what can be cached:

* ``V2Inference.encode(packed)``: backbone + pixel decoder for a batch of packed slices
  (``preprocess.pack_slices``) -> ``SliceFeatures`` (per slice, untiled; ``.select``/``.cpu``/``.to``).
* ``V2Inference.prompt_tokens(prompts)``: CLIP tokens -> grounding tokens [L_max, P, 512]. Shorter
  prompts are padded with zero rows that are *not* masked (the authors' behaviour), so a prompt's
  result depends on the longest prompt of its list.
* ``V2Inference.decode(features, tokens, sampler)``: features tiled per prompt slice-major (item
  b * P + p) and decoded -> mask logits [B, P, 128, 128] and existence logits [B, P].
  A re-prompt re-runs only this.

``segment_slices`` runs the authors' loop over a whole resized volume. The attention-mask sampler
(``sampler.py``) is passed in; its draws follow decode calls in order, so decoding the batches in the
same order with a sampler of the same seed repeats a result.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .network import BiomedParseV2
from .postprocess import probabilities_512  # noqa: F401 -- part of the facade
from .preprocess import pack_slices
from .sampler import BoltzmannSampler


@dataclass
class SliceFeatures:
    """What the decoder needs of B slices: ``mask_features`` [B, 512, 128, 128] and three
    ``multi_scale`` maps [B, 512, 16/32/64, ...]; ``extras`` holds backbone maps when kept (tests)."""

    mask_features: torch.Tensor
    multi_scale: tuple
    extras: dict = field(default_factory=dict)

    @classmethod
    def from_image_features(cls, feats: dict, keep_extras: bool = False) -> SliceFeatures:
        extras = {k: v for k, v in feats.items() if k not in ("mask_features", "multi_scale_features")}
        return cls(feats["mask_features"], tuple(feats["multi_scale_features"]), extras if keep_extras else {})

    def __len__(self) -> int:
        return int(self.mask_features.shape[0])

    def _map(self, fn) -> SliceFeatures:
        return SliceFeatures(fn(self.mask_features), tuple(fn(m) for m in self.multi_scale),
                             {k: fn(v) for k, v in self.extras.items()})

    def select(self, indices) -> SliceFeatures:
        """The sub-batch of the slices at ``indices`` (positions in this batch), in that order."""
        idx = torch.as_tensor(list(indices), dtype=torch.long, device=self.mask_features.device)
        return self._map(lambda t: t.index_select(0, idx))

    def cpu(self) -> SliceFeatures:
        return self._map(lambda t: t.cpu())

    def to(self, device) -> SliceFeatures:
        return self._map(lambda t: t.to(device))

    @staticmethod
    def concat(parts) -> SliceFeatures:
        """Slices of several ``SliceFeatures`` as one batch (e.g. cached single slices re-batched)."""
        parts = list(parts)
        return SliceFeatures(torch.cat([p.mask_features for p in parts]),
                             tuple(torch.cat([p.multi_scale[i] for p in parts]) for i in range(3)))


@dataclass
class PromptTokens:
    """Text features of one prompt list: ``grounding`` [L_max, P, 512] (what the decoder reads), and the
    encoder's ``token_emb`` [P, 77, 512], ``class_emb`` [P, 512], ``input_ids``/``attention_mask`` [P, 77]."""

    prompts: list
    grounding: torch.Tensor
    token_emb: torch.Tensor
    class_emb: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompts)


def grounding_tokens(token_emb: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Valid tokens (SOT..EOT) of each prompt stacked sequence-first [L_max, P, C]; padding rows are 0.

    The authors pad with -1 and then zero every row whose entries sum to -C; the same rule is used.
    """
    rows = [emb[mask.bool()] for emb, mask in zip(token_emb, attention_mask)]
    tokens = nn.utils.rnn.pad_sequence(rows, padding_value=-1)
    tokens[tokens.sum(dim=-1) == -tokens.shape[-1]] = 0
    return tokens


def tile_per_prompt(feature: torch.Tensor, n_prompts: int) -> torch.Tensor:
    """[B, ...] -> [B * P, ...], item b * P + p is slice b (materialised, as the authors' ``tile_feature``)."""
    b = feature.shape[0]
    return feature.unsqueeze(1).expand(b, n_prompts, *feature.shape[1:]).reshape(b * n_prompts, *feature.shape[1:])


class V2Inference:
    """BiomedParse v2 on one device; every call runs under ``torch.no_grad`` as the authors'."""

    def __init__(self, net: BiomedParseV2, tokenizer, device: str = "cpu"):
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.tokenizer = tokenizer

    @property
    def dtype(self) -> torch.dtype:
        return self.net.pixel_mean.dtype

    def encode(self, packed: torch.Tensor, keep_extras: bool = False) -> SliceFeatures:
        """[B, 3, 512, 512] float32 normalised slices -> per-slice features (``keep_extras``: backbone maps too)."""
        with torch.no_grad():
            x = packed.to(device=self.device, dtype=self.dtype)
            return SliceFeatures.from_image_features(self.net.image_features(x), keep_extras)

    def prompt_tokens(self, prompts: list[str]) -> PromptTokens:
        """CLIP tokens (77, padded with EOT) -> text encoder -> grounding tokens [L_max, P, 512]."""
        prompts = list(prompts)
        if not prompts:
            raise ValueError("BiomedParse v2 needs at least one text prompt")
        tokens = self.tokenizer(prompts)
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        with torch.no_grad():
            token_emb, class_emb = self.net.text_features(ids)
            return PromptTokens(prompts, grounding_tokens(token_emb, mask), token_emb, class_emb, ids, mask)

    def decode(self, features: SliceFeatures, tokens: PromptTokens, sampler,
               trace: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits [B, P, 128, 128] and existence logits [B, P] (float32 for a float32 model).

        ``sampler`` gives the attention masks (``sampler.BoltzmannSampler`` or ``InjectedMasks``);
        ``trace``, if a dict, receives the decoder's ``head_queries`` and ``query_masks`` [B*P, 16, ...].
        """
        b, p = len(features), len(tokens)
        with torch.no_grad():
            mask_features = tile_per_prompt(features.mask_features.to(self.device), p)
            multi_scale = [tile_per_prompt(m.to(self.device), p) for m in features.multi_scale]
            grounding = tokens.grounding.to(self.device).repeat(1, b, 1)
            query_masks, existence = self.net.decode(multi_scale, mask_features, grounding, sampler, trace)
            if trace is not None:
                trace["query_masks"] = query_masks
            masks = self.net.object_masks(query_masks)
            return masks.view(b, p, *masks.shape[-2:]), existence.view(b, p)


def segment_slices(inference: V2Inference, resized_u8, prompts: list[str], slice_batch_size: int = 4,
                   sampler=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' volume loop on resized uint8 slices [D, 512, 512] (``preprocess.process_input``).

    Slices go in batches of ``slice_batch_size`` (the last one smaller), each packed with its neighbours,
    encoded and decoded with all prompts. ``sampler`` defaults to ``BoltzmannSampler.seeded()`` (seed 0),
    fresh per call. Returns (mask logits [P, D, 128, 128], existence logits [P, D]).
    """
    if slice_batch_size < 1:
        raise ValueError("slice_batch_size must be positive")
    sampler = BoltzmannSampler.seeded() if sampler is None else sampler
    tokens = inference.prompt_tokens(prompts)
    n = int(resized_u8.shape[0])
    masks, existence = [], []
    for start in range(0, n, slice_batch_size):
        stop = min(start + slice_batch_size, n)
        features = inference.encode(pack_slices(resized_u8, start, stop))
        m, e = inference.decode(features, tokens, sampler)
        masks.append(m)
        existence.append(e)
    return torch.cat(masks).transpose(0, 1), torch.cat(existence).transpose(0, 1)
