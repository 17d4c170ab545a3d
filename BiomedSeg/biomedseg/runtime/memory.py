"""How many units of work (slices, windows) fit in one forward pass.

Each backend knows what one unit costs on each kind of device (measured where it could be,
estimated otherwise); this is the one rule that turns that into a batch: the share of the
free memory the batch may take, divided by the cost of one unit, between 1 and the most
that pays off on that device. When the guess is still too big, the engine's out-of-memory
policy halves the batch.
"""
from __future__ import annotations

from .device import device_kind, free_memory_bytes


def batch_that_fits(device: str, bytes_per_unit: float, max_batch: dict, share: float,
                    free_bytes: int | None = None) -> int:
    """Units per pass that fit in ``share`` of the free memory of ``device`` (at least 1, at most
    ``max_batch[device kind]``)."""
    kind = device_kind(device)
    if free_bytes is None:
        free_bytes = free_memory_bytes(device)
    return max(1, min(int(max_batch[kind]), int(free_bytes * share // max(1.0, float(bytes_per_unit)))))
