"""Direction matrices the geometry tests run through: every axis permutation and flip plus an oblique grid."""
from __future__ import annotations

import itertools

import numpy as np


def rotation(axis, degrees) -> np.ndarray:
    """Rodrigues rotation matrix about the vector ``axis`` (right-handed, ``degrees``)."""
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    a = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * (k @ k)


def affine(direction, spacing, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """ijk->RAS 4x4 from a direction matrix (columns = axis directions), spacing per axis and origin."""
    m = np.eye(4)
    m[:3, :3] = np.asarray(direction, float) * np.asarray(spacing, float)
    m[:3, 3] = origin
    return m


def signed_permutations() -> list[tuple[str, np.ndarray]]:
    """All 48 direction matrices whose columns are +-unit RAS axes, as (name, matrix)."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            d = np.zeros((3, 3))
            for col, (row, sign) in enumerate(zip(perm, signs)):
                d[row, col] = sign
            out.append((f"perm{''.join(map(str, perm))}_sign{''.join('+' if s > 0 else '-' for s in signs)}", d))
    return out


#: An oblique direction: a signed permutation tilted by 22 degrees about a skew axis.
OBLIQUE = rotation([1.0, 2.0, 3.0], 22.0) @ np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=np.float64)

#: The 48 signed permutations followed by ("oblique", OBLIQUE): 49 (name, matrix) cases.
DIRECTIONS = signed_permutations() + [("oblique", OBLIQUE)]
assert len(DIRECTIONS) == 49


def reoriented(volume, perm, flips):
    """The same physical image stored with its (k, j, i) array axes permuted by ``perm`` and
    flipped where ``flips`` says; returns it and a function mapping its arrays back."""
    from biomedseg.volume import Volume

    flip_axes = [a for a, f in enumerate(flips) if f]
    array = np.flip(np.transpose(volume.array, perm), axis=flip_axes)
    old_of_new = np.zeros((4, 4))
    old_of_new[3, 3] = 1
    for new_axis, old_axis in enumerate(perm):
        new_i, old_i = 2 - new_axis, 2 - old_axis
        old_of_new[old_i, new_i] = -1 if flips[new_axis] else 1
        if flips[new_axis]:
            old_of_new[old_i, 3] = volume.shape[old_axis] - 1

    def back(mask):
        return np.transpose(np.flip(mask, axis=flip_axes), np.argsort(perm))

    return Volume(np.ascontiguousarray(array), volume.ijk_to_ras @ old_of_new, name="reoriented"), back
