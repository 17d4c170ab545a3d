"""BiomedParse v1 assembled under the checkpoint's names (``backbone``, ``sem_seg_head.*``).

``BiomedParseV1.state_dict()`` has exactly the keys of the released ``biomedparse_v1.pt``
minus the unused entries listed in ``checkpoint.py``, so the file loads with ``strict=True``
(``checkpoint.build_biomedparse_v1``; this module knows nothing of files).
The model is split into the stages the engine caches separately: image features (once per
slice), text features (once per prompt list), and the decoder (per prompt group).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import FocalNet
from .decoder import SEEMDecoder
from .pixel_decoder import PixelDecoder

#: ImageNet statistics on 0..255 RGB, as in the authors' config.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
SIZE_DIVISIBILITY = 32


class SemSegHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.pixel_decoder = PixelDecoder()
        self.predictor = SEEMDecoder()


class BiomedParseV1(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = FocalNet()
        self.sem_seg_head = SemSegHead()

    def set_exact_layout(self, exact: bool) -> "BiomedParseV1":
        """True (default): tensor layouts exactly as in the reference (bit-identical outputs on CPU while the
        parameters require grad, as ``checkpoint.build_biomedparse_v1`` leaves them). False: contiguous sequence
        tensors; choose it if the parameters are frozen (``requires_grad_(False)``), where the reference layout
        makes torch project feature maps row by row. Either way the fixtures' tolerances hold (see the parity
        tests).
        """
        self.sem_seg_head.predictor.exact_layout = bool(exact)
        self.sem_seg_head.pixel_decoder.transformer.exact_layout = bool(exact)
        return self

    @property
    def lang_encoder(self):
        return self.sem_seg_head.predictor.lang_encoder

    @staticmethod
    def normalize(images: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """uint8 RGB [B,3,H,W] (0..255) -> (x - mean) / std, zero-padded right/bottom to a multiple of 32."""
        mean = torch.tensor(PIXEL_MEAN, dtype=dtype, device=images.device).view(-1, 1, 1)
        std = torch.tensor(PIXEL_STD, dtype=dtype, device=images.device).view(-1, 1, 1)
        x = (images - mean) / std
        h, w = x.shape[-2:]
        ph, pw = (-h) % SIZE_DIVISIBILITY, (-w) % SIZE_DIVISIBILITY
        return F.pad(x, (0, pw, 0, ph)) if ph or pw else x

    def image_features(self, x: torch.Tensor) -> dict:
        """Normalised image [B,3,H,W] -> backbone maps, mask_features and the decoder's multi-scale maps."""
        feats = self.backbone(x)
        mask_features, encoder_features, multi_scale = self.sem_seg_head.pixel_decoder(feats)
        return {**feats, "mask_features": mask_features, "transformer_encoder_features": encoder_features,
                "multi_scale_features": multi_scale}

    def text_features(self, input_ids: torch.Tensor):
        """Token ids [N,77] -> (token_emb [N,77,512], class_emb [N,512]); neither is normalised."""
        return self.lang_encoder(input_ids)

    def decode(self, features: dict, grounding_tokens: torch.Tensor) -> dict:
        """Grounding tokens [T, B, 512] -> last-layer pred_masks [B,101,H/4,W/4] and pred_captions [B,101,512]."""
        return self.sem_seg_head.predictor(features["multi_scale_features"], features["mask_features"],
                                           grounding_tokens)

    def similarity(self, captions: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        """[Q, P] x [K, P] -> [Q, K] scaled cosine similarity (the reference's ``vl_similarity``)."""
        t = class_emb / (class_emb.norm(dim=-1, keepdim=True) + 1e-7)
        v = captions / (captions.norm(dim=-1, keepdim=True) + 1e-7)
        return self.lang_encoder.temperature() * torch.matmul(v, t.t())
