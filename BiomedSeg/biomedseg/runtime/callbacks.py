"""The two callbacks every long computation takes, by one name each."""
from __future__ import annotations

from typing import Callable

from ..errors import CancelledError

#: progress(stage, done, total): called between units of work (slices, windows, stages).
Progress = Callable[[str, int, int], None]
#: cancelled() -> True when the caller wants the run stopped at the next safe point.
CancelCheck = Callable[[], bool]


def check_cancel(cancelled: CancelCheck | None, what: str = "Inference") -> None:
    """Stop with ``CancelledError`` at a safe point when the caller asked to."""
    if cancelled is not None and cancelled():
        raise CancelledError(f"{what} was cancelled.")
