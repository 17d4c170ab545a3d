"""Progress on stderr: a bar on a terminal, whole lines anywhere else."""
from __future__ import annotations

import sys


class ProgressBar:
    """tqdm bar fed by the engine's progress(stage, done, total) callbacks."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.bar is None or self.bar.total != total:
            if self.bar is not None:
                self.bar.close()
            self.bar = tqdm(total=total, unit="step", file=sys.stderr, leave=False,
                            bar_format="{desc:<20} {bar} {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")
        self.bar.set_description_str(stage)
        self.bar.n = done
        self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()
