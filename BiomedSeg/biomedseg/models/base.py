"""The interface every model backend implements, and how backends are found."""
from __future__ import annotations

import importlib
from typing import Callable, Protocol

import numpy as np

from ..volume import Volume

#: progress(stage, done, total): called between units of work (slices, windows, stages).
Progress = Callable[[str, int, int], None]
#: cancelled() -> True when the caller wants the run stopped at the next safe point.
CancelCheck = Callable[[], bool]


class Backend(Protocol):
    """A loaded model. ``predict`` returns float32 probabilities (k, j, i) per prompt."""

    model_id: str
    device: str

    def predict(self, volume: Volume, prompts: list[str], *, progress: Progress,
                cancelled: CancelCheck, options: dict) -> dict[str, np.ndarray]:
        ...


def backend_class(path: str):
    """Import 'package.module:Class' from the catalogue lazily (torch only loads here)."""
    module_name, _, class_name = path.partition(":")
    return getattr(importlib.import_module(module_name), class_name)
