"""Progress on stderr: a bar on a terminal, whole lines anywhere else.

A log file or a CI job captured the tqdm bar as a heap of carriage-return fragments. When
stderr is not a terminal each stage gets a line when it starts and a line every tenth of
its work (and at most one every ``LINE_SECONDS``), so a log reads top to bottom.
"""
from __future__ import annotations

import sys
import time

LINE_SECONDS = 5.0


class ProgressBar:
    """Fed by the engine's progress(stage, done, total) callbacks."""

    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.lines = enabled and not _is_terminal(self.stream)
        self.bar = None
        self._last = (None, -1, 0.0)  # stage, tenth, time of the last line

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.lines:
            self._line(stage, done, total)
            return
        from tqdm import tqdm

        if self.bar is None or self.bar.total != total:
            if self.bar is not None:
                self.bar.close()
            self.bar = tqdm(total=total, unit="step", file=self.stream, leave=False,
                            bar_format="{desc:<20} {bar} {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")
        self.bar.set_description_str(stage)
        self.bar.n = done
        self.bar.refresh()

    def _line(self, stage: str, done: int, total: int) -> None:
        if not stage and not total:
            return  # the worker's "started" tick: nothing to say yet
        last_stage, last_tenth, last_time = self._last
        tenth = int(10 * done / total) if total else 10
        now = time.monotonic()
        new_stage = stage != last_stage
        if new_stage or (tenth > last_tenth and (now - last_time >= LINE_SECONDS or tenth == 10)):
            print(f"{stage}: {done}/{total}", file=self.stream, flush=True)
            self._last = (stage, tenth, now)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
