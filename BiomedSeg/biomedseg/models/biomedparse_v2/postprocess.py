"""From BiomedParse v2's outputs to a label map, as the authors' ``inference.py`` and ``utils.py``.

1. ``probabilities_512``: the 128 x 128 mask *logits* are upsampled to 512 (bicubic, antialias,
   align_corners False), then passed through a sigmoid.
2. ``postprocess``: with several prompts, per slice non-maximum suppression over the prompts
   (``slice_nms``): masks are ``prob > 0.5``; prompts in descending existence probability; stop at the
   first below the score threshold; skip empty masks; keep a mask and drop the remaining prompts whose
   mask overlaps it with IoU > 0.5 -- so two prompts never claim the same structure on a slice. With
   one prompt a slice is kept when its existence probability is above the threshold. The result is
   ``prob x keep``.
3. ``merge_multiclass_masks``: argmax over [0.5 (background); kept probabilities]; label j is
   ``ids[j - 1]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NMS_IOU_THRESHOLD = 0.5
SCORE_THRESHOLD = 0.5


def upsample_logits(mask_logits: torch.Tensor, size: int = 512) -> torch.Tensor:
    """[A, B, h, w] logits -> [A, B, size, size] (bicubic, antialias, align_corners False)."""
    return F.interpolate(mask_logits, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


def probabilities_512(mask_logits: torch.Tensor) -> torch.Tensor:
    """sigmoid(bicubic-antialias upsampling of the logits to 512 x 512); input [A, B, 128, 128]."""
    return upsample_logits(mask_logits, 512).sigmoid()


def nms_keep(masks: torch.Tensor, scores: torch.Tensor, iou_threshold: float = NMS_IOU_THRESHOLD,
             score_threshold: float = SCORE_THRESHOLD) -> list[int]:
    """Indices kept among N binary masks [N, H, W] with scores [N] (the authors' ``nms_masks_batch_iou``)."""
    masks = masks.bool()
    order = scores.argsort(descending=True)
    keep: list[int] = []
    while order.numel() > 0:
        best = int(order[0])
        if scores[best] < score_threshold:
            break
        if not masks[best].any():
            order = order[1:]
            continue
        keep.append(best)
        rest = order[1:]
        if rest.numel() == 0:
            break
        others = masks[rest]
        inter = (others & masks[best]).flatten(1).sum(1).float()
        union = (others | masks[best]).flatten(1).sum(1).float()
        order = rest[inter / union <= iou_threshold]
    return keep


def slice_nms(probs: torch.Tensor, scores: torch.Tensor, iou_threshold: float = NMS_IOU_THRESHOLD,
              score_threshold: float = SCORE_THRESHOLD) -> tuple[torch.Tensor, torch.Tensor]:
    """probs [P, D, H, W], existence probabilities [P, D] -> (probs x keep, keep [P, D] int64), slice by slice."""
    n_prompts, n_slices = probs.shape[:2]
    keep = torch.zeros((n_prompts, n_slices), dtype=torch.int64, device=probs.device)
    for d in range(n_slices):
        kept = nms_keep(probs[:, d] > 0.5, scores[:, d], iou_threshold, score_threshold)
        if kept:
            keep[kept, d] = 1
    return probs * keep[..., None, None], keep


def postprocess(probs: torch.Tensor, existence_logits: torch.Tensor, threshold: float = SCORE_THRESHOLD,
                do_nms: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' ``postprocess`` on probabilities [P, D, H, W] and existence logits [P, D].

    Returns (kept probabilities, keep flags [P, D] int64). P == 1 (or ``do_nms`` False): a slice is
    kept when sigmoid(existence) > threshold.
    """
    scores = existence_logits.sigmoid()
    if do_nms and probs.shape[0] > 1:
        return slice_nms(probs, scores, NMS_IOU_THRESHOLD, threshold)
    keep = (scores > threshold).to(torch.int64)
    return probs * keep.int()[..., None, None], keep


def merge_multiclass_masks(masks: torch.Tensor, ids) -> torch.Tensor:
    """Kept probabilities [P, ...] -> int64 labels [...]: 0 where no prompt exceeds 0.5, else ``ids[argmax]``."""
    background = torch.full_like(masks[0:1], 0.5)
    labels = torch.cat([background, masks], dim=0).argmax(dim=0)
    remap = {j + 1: int(i) for j, i in enumerate(ids) if j + 1 != int(i)}
    if remap:
        original = labels.clone()
        for j, target in remap.items():
            labels[original == j] = target
    return labels
