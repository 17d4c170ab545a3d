"""BiomedParse v2 (3D path) assembled under the checkpoint's names.

``BiomedParseV2.state_dict()`` has the keys of ``biomedparse_v2.ckpt``'s ``state_dict`` without the
``model.`` prefix and without the two loss-function tensors (``checkpoint.py``). What is shared
with v1 is v1's code: the FocalNet-L backbone, the transformer-encoder FPN pixel decoder and the
CLIP text transformer are the same networks with the same configuration (and, except for the text
encoder's attribute name, the same tensor names). New here: the BoltzFormer decoder (``decoder.py``).

The network is split into the stages the engine caches separately: image features per slice
(``image_features``), text features per prompt list (``text_features``), and the decoder per
(slice batch, prompt list) (``decode``); ``inference.py`` runs them in the authors' order.
``convolute_outputs`` is False in the released config, so there is no output convolution: the
result is the mean of the first 12 query masks (the last 4 are the authors' edge queries).
"""
from __future__ import annotations

import torch
from torch import nn

from ..biomedparse.backbone import FocalNet
from ..biomedparse.pixel_decoder import PixelDecoder
from .decoder import BoltzFormerDecoder
from .preprocess import pixel_buffers

#: Queries at the end of the 16 used for edge masks in training; the object mask averages the others.
EDGE_QUERIES = 4


class SemSegHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.pixel_decoder = PixelDecoder()
        self.predictor = BoltzFormerDecoder()


class BiomedParseV2(nn.Module):
    """``backbone``, ``sem_seg_head.{pixel_decoder, predictor}`` and the persistent ``pixel_mean``/``pixel_std``."""

    edge_queries = EDGE_QUERIES

    def __init__(self):
        super().__init__()
        self.backbone = FocalNet()
        self.sem_seg_head = SemSegHead()
        for name, value in pixel_buffers().items():
            self.register_buffer(name, value)

    @property
    def language_encoder(self):
        return self.sem_seg_head.predictor.language_encoder

    def normalize(self, packed: torch.Tensor) -> torch.Tensor:
        """int [B, 3, H, W] (0..255) -> ``(x - pixel_mean.mean()) / pixel_std.mean()`` (float32 for int input)."""
        return (packed - self.pixel_mean.mean()) / self.pixel_std.mean()

    def image_features(self, x: torch.Tensor) -> dict:
        """Normalised slices [B, 3, 512, 512] -> res2..res5, ``mask_features`` [B, 512, 128, 128],
        ``transformer_encoder_features`` and ``multi_scale_features`` (16, 32, 64 px)."""
        feats = self.backbone(x)
        mask_features, encoder_features, multi_scale = self.sem_seg_head.pixel_decoder(feats)
        return {**feats, "mask_features": mask_features, "transformer_encoder_features": encoder_features,
                "multi_scale_features": multi_scale}

    def text_features(self, input_ids: torch.Tensor):
        """Token ids [P, 77] -> (token_emb [P, 77, 512], class_emb [P, 512] at the first EOT); not normalised."""
        return self.language_encoder(input_ids)

    def decode(self, multi_scale_features, mask_features, grounding_tokens, sampler, trace: dict | None = None):
        """Items tiled slice-major (item b * P + p) -> (all query masks [N, 16, 128, 128], existence [N, 1])."""
        return self.sem_seg_head.predictor(multi_scale_features, mask_features, grounding_tokens, sampler, trace)

    @classmethod
    def object_masks(cls, query_masks: torch.Tensor) -> torch.Tensor:
        """[N, 16, H, W] -> [N, 1, H, W]: the mean of the non-edge queries (``pred_gmasks``)."""
        return query_masks[:, :-cls.edge_queries].mean(dim=1, keepdim=True)
