"""Probability maps as a volume: each target's soft map on the input grid, with the threshold used.

One target is a 3D float32 scalar NRRD; several are one 4D NRRD whose leading axis (kind ``list``)
holds one map per target, in order, so Slicer and pynrrd read the same geometry the labelmaps
have (``volume.nrrd_header``). Key/value fields say what the numbers are:

``targets``          JSON list of the target names, in the order of the list axis
``component<N>_name`` the name of map N (4D files only)
``threshold``        the threshold the masks were cut at (``repr`` of the float: read back exactly)
``model``            the model id ('' when not given)
``value``            ``probability 0..1``
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import InputError
from ..volume import Volume, nrrd_header
from .atomic import atomic_write, check_target
from .readers import suffix_of

#: What the voxels of a probability file mean (its ``value`` field).
VALUE = "probability 0..1"


def probability_header(reference: Volume, targets: list[str], threshold: float, model_id: str = "") -> dict:
    """The NRRD header (pynrrd style, data in i, j, k order) of maps for ``targets`` on ``reference``'s grid."""
    grid = Volume(np.broadcast_to(np.zeros((), np.uint8), reference.shape), reference.ijk_to_ras)
    header = nrrd_header(grid)  # the labelmap writers' geometry, exactly
    if len(targets) > 1:
        header["space directions"] = np.vstack([[np.nan] * 3, header["space directions"]])
        header["kinds"] = ["list", "domain", "domain", "domain"]
        header.update({f"component{n}_name": " ".join(name.splitlines()) for n, name in enumerate(targets)})
    header.update({"encoding": "gzip", "targets": json.dumps(list(targets)), "threshold": repr(float(threshold)),
                   "model": str(model_id), "value": VALUE})
    return header


def write_probabilities(path: str | os.PathLike, reference: Volume, probabilities: Mapping[str, np.ndarray],
                        threshold: float, overwrite: bool = False, model_id: str = "") -> Path:
    """Write each target's float32 map (k, j, i on ``reference``'s grid) to the NRRD ``path``; returns it.

    Refused (``InputError``) before anything is written: another suffix than ``.nrrd``, no maps (a
    model that returns only labels), a map off the grid, a threshold outside (0, 1), or an existing
    ``path`` without ``overwrite``. The file is written whole or not at all.
    """
    path = Path(path)
    if suffix_of(path) != ".nrrd":
        raise InputError(f"'{path}': probability maps are written as .nrrd, not '{suffix_of(path) or 'no suffix'}'.",
                         hint="Name the file ….nrrd.")
    if not probabilities:
        raise InputError("The model returned no probability maps (it gives labels or text only, or found none of "
                         "the targets), so there is nothing to write.", hint="Leave out --probabilities.")
    if not 0.0 < float(threshold) < 1.0:
        raise InputError(f"Threshold {threshold} must lie strictly between 0 and 1.")
    check_target(path, overwrite)
    targets = [str(t) for t in probabilities]
    maps = []
    for target, prob in probabilities.items():
        prob = np.asarray(prob)
        if tuple(prob.shape) != tuple(reference.shape):
            raise InputError(f"The probability map of '{target}' has shape {prob.shape}, not the grid "
                             f"{tuple(reference.shape)} of '{reference.name or 'the input'}'.")
        maps.append(prob.astype(np.float32, copy=False))
    header = probability_header(reference, targets, threshold, model_id)
    if len(maps) == 1:
        data = np.transpose(maps[0], (2, 1, 0))
    else:
        data = np.transpose(np.stack(maps), (0, 3, 2, 1))
    data = np.ascontiguousarray(data)

    def write(tmp: Path) -> None:
        import nrrd

        nrrd.write(str(tmp), data, header, index_order="F")

    return atomic_write(path, write, overwrite)


def read_probabilities(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], float]:
    """A file ``write_probabilities`` wrote: ({target: float32 map (k, j, i)}, threshold)."""
    import nrrd

    data, header = nrrd.read(str(path), index_order="F")
    try:
        targets = json.loads(header["targets"])
        threshold = float(header["threshold"])
    except (KeyError, ValueError) as exc:
        raise InputError(f"'{path}' is not a BiomedSeg probability file (no {exc} field).") from None
    if data.ndim == 3:
        maps = [np.transpose(data, (2, 1, 0))]
    else:
        maps = list(np.transpose(data, (0, 3, 2, 1)))
    if len(maps) != len(targets):
        raise InputError(f"'{path}' holds {len(maps)} maps for {len(targets)} targets.")
    return {t: np.ascontiguousarray(m, dtype=np.float32) for t, m in zip(targets, maps)}, threshold


__all__ = ["VALUE", "probability_header", "read_probabilities", "write_probabilities"]
