"""Which intensity window a model that takes 8-bit images sees: the person's choice, else a rule.

For CT the soft-tissue window (organs and most lesions), named windows on request; for anything
else the 0.5-99.5 percentiles (as MedSAM's preprocessing). ``choose_window`` also says, in words,
which rule ran, for the run report.
"""
from __future__ import annotations

import re

import numpy as np

from ..errors import InputError
from ..imaging_guess import guess_modality
from ..volume import Volume, strided_sample

#: Named CT windows (HU), lower and upper edge. "lung" is the fixture's window.
CT_WINDOWS = {"soft-tissue": (-160.0, 240.0), "lung": (-1350.0, 150.0), "bone": (-450.0, 1050.0),
              "brain": (0.0, 80.0), "liver": (-15.0, 165.0)}
PERCENTILES = (0.5, 99.5)


def choose_window(volume: Volume, option) -> tuple[float, float, str]:
    """(lower, upper, rule) for ``volume``; ``option`` is None, a CT window name, "percentile",
    or "LOWER,UPPER" (or a two-number list)."""
    if option is None:
        modality, why = guess_modality(volume)
        if modality == "CT":
            lo, hi = CT_WINDOWS["soft-tissue"]
            return lo, hi, f"CT soft-tissue window [{lo:g}, {hi:g}] HU ({why})"
        return _percentiles(volume, f"{modality} ({why})")
    if isinstance(option, str) and option.strip().lower() in CT_WINDOWS:
        lo, hi = CT_WINDOWS[option.strip().lower()]
        return lo, hi, f"CT {option.strip().lower()} window [{lo:g}, {hi:g}] HU (chosen)"
    if isinstance(option, str) and option.strip().lower() == "percentile":
        return _percentiles(volume, "chosen")
    values = option if isinstance(option, (list, tuple)) else re.split(r"[,\s]+", str(option).strip())
    try:
        lo, hi = (float(v) for v in values)
    except (TypeError, ValueError):
        raise InputError(f"The window must be LOWER,UPPER, 'percentile' or one of "
                         f"{', '.join(CT_WINDOWS)}; got {option!r}.") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise InputError(f"The window [{lo}, {hi}] needs finite edges with lower < upper.")
    return lo, hi, f"window [{lo:g}, {hi:g}] (chosen)"


def _percentiles(volume: Volume, why: str) -> tuple[float, float, str]:
    lo, hi = (float(v) for v in np.percentile(strided_sample(volume.array), PERCENTILES))
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi, f"{PERCENTILES[0]}-{PERCENTILES[1]} percentile window [{lo:.4g}, {hi:.4g}] of {why}"
