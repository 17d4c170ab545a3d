"""The authors' plausibility check of a predicted mask (``check_mask_stats``).

BiomedParse v1 was trained on slices that contain the target, so it draws a mask for any prompt.
The authors test whether a mask looks like the target: over the pixels with probability >= 128/255,
the mean probability and the mean R, G, B intensities (all / 256) are each compared with a Beta
distribution fitted per (modality type, target) by a one-sample KS test; the four p-values are
multiplied and the product's 4th root is the adjusted p-value (reject below 0.05).
The Beta parameters come from ``target_dist.json`` ({modality: {target: [[a, b] x 4]}}), a file of
the authors' model repository; pass its path or its loaded contents.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np


def load_target_dist(path: str | os.PathLike) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def mask_stats(mask: np.ndarray, img: np.ndarray) -> list[float]:
    """[mean prob, mean R, mean G, mean B] / 256 over mask >= 128; zeros when max(mask) <= 127."""
    if mask.max() <= 127:
        return [0, 0, 0, 0]
    sel = mask >= 128
    return [mask[sel].mean() / 256, img[:, :, 0][sel].mean() / 256,
            img[:, :, 1][sel].mean() / 256, img[:, :, 2][sel].mean() / 256]


@dataclass
class PValue:
    p_value: float            # adjusted: prod(ks_pvalues) ** 0.25
    ks_pvalues: list          # per statistic
    mask_stats: list


def mask_p_value(img: np.ndarray, mask: np.ndarray, modality_type: str, target: str,
                 target_dist: dict | str | os.PathLike) -> PValue:
    """``img`` uint8 RGB [H,W,3] model image, ``mask`` = probabilities * 255 on the same grid."""
    dist = target_dist if isinstance(target_dist, dict) else load_target_dist(target_dist)
    if modality_type not in dist:
        raise ValueError(f"Unknown modality type {modality_type!r}; known: {sorted(dist)}")
    if target not in dist[modality_type]:
        raise ValueError(f"Unknown target {target!r} for {modality_type}; known: {sorted(dist[modality_type])}")
    ms = mask_stats(np.asarray(mask), np.asarray(img))
    return p_value_of_stats(ms, dist[modality_type][target])


def p_value_of_stats(ms, params) -> PValue:
    """The test itself, on the four statistics of ``mask_stats`` and their [[a, b] x 4] Beta parameters
    (for callers that compute the statistics elsewhere, e.g. on the GPU)."""
    from scipy import stats

    ps = [float(stats.ks_1samp([ms[i]], stats.beta(a, b).cdf).pvalue) for i, (a, b) in enumerate(params)]
    return PValue(p_value=float(np.prod(ps) ** 0.25), ks_pvalues=ps, mask_stats=[float(v) for v in ms])


def check_mask_stats(img, mask, modality_type: str, target: str, target_dist) -> float:
    """The adjusted p-value alone, like the reference function of the same name."""
    return mask_p_value(img, mask, modality_type, target, target_dist).p_value
