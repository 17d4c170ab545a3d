"""The voxels a grid box covers (a neighbour module, imported relatively from the backend)."""
import numpy as np


def box_slices(volume, box):
    """Array slices of the voxel centres inside ``box``; a 2D box covers only its own slice."""
    start = np.ceil(np.asarray(box.start) - 1e-9).astype(int)
    stop = np.floor(np.asarray(box.stop) + 1e-9).astype(int) + 1
    slices = [slice(max(0, a), min(n, b)) for a, b, n in zip(start, stop, volume.shape)]
    if box.slice is not None:
        axis = volume.slice_orientation(box.plane).slice_axis
        slices[axis] = slice(box.slice, box.slice + 1)
    return tuple(slices)
