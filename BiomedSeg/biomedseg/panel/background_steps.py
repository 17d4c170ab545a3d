"""An install plan's steps run one after the other in background processes.

The panel polls from its QTimer, so nothing here waits for a step: a reader thread keeps
the output, ``poll()`` only looks. Steps that are not commands (PyTorch through the PyTorch
extension, whose installer has to run inside Slicer) are handed back to the caller.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections import deque
from typing import Callable

from .messages import Progress
from .worker_python import isolated_environment


class BackgroundSteps:
    """Runs the command steps of a plan one after the other in the background; ``poll()`` from a timer.

    Output lines are kept (the last 200) for the error message and the log; ``cancel()`` stops
    the running command. Steps of another kind are handed back to the caller through
    ``pending_special`` (the panel runs them and calls ``special_done``).
    """

    def __init__(self, plan, env: dict | None = None, progress_of: Callable | None = None,
                 isolated_env: dict | None = None):
        self.plan = plan
        self.env = env
        self.isolated_env = isolated_env if isolated_env is not None else isolated_environment(env)
        self.progress_of = progress_of  # () -> percent or None, for the running step
        self.index = -1
        self.proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self.lines: deque[str] = deque(maxlen=200)
        self.state = "running"  # running, done, failed, cancelled
        self.error = ""
        self.pending_special = None
        self._next()

    def _next(self) -> None:
        self.index += 1
        if self.index >= len(self.plan.steps):
            self.state = "done"
            return
        step = self.plan.steps[self.index]
        if step.kind != "command":
            self.pending_special = step
            return
        try:  # in its own process group, so that cancel stops pip's children too
            self.proc = subprocess.Popen(step.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                         env=self.isolated_env if step.isolated else self.env,
                                         start_new_session=True)
        except OSError as exc:
            self._fail(f"'{step.description}' could not start ({exc.strerror or exc}).")
            return
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()

    def _read(self, proc) -> None:
        for line in proc.stdout:
            self.lines.append(line.rstrip())

    def _fail(self, text: str) -> None:
        self.state = "failed"
        self.error = text

    def special_done(self, ok: bool, error: str = "") -> None:
        self.pending_special = None
        if ok:
            self._next()
        else:
            self._fail(error or f"'{self.plan.steps[self.index].description}' did not complete.")

    @property
    def finished(self) -> bool:
        return self.state != "running"

    def poll(self) -> Progress:
        if self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            self.proc.wait()
            self.proc = None
            if self._reader is not None:  # the pipe is at its end: let the reader take the last lines
                self._reader.join(timeout=0.5)
            if code != 0 and self.state == "running":
                tail = "\n".join(list(self.lines)[-5:])
                self._fail(f"'{self.plan.steps[self.index].description}' failed (exit code {code}). {tail}")
            elif self.state == "running":
                self._next()
        n = len(self.plan.steps)
        if self.state == "done":
            return Progress(100, "Installed." if self.plan.packages else "Done.")
        if self.state != "running":
            return Progress(0, self.error if self.state == "failed" else "Cancelled.")
        step = self.plan.steps[self.index]
        percent = self.progress_of() if self.progress_of else None
        if percent is None and n > 1:
            percent = int(100 * self.index / n)
        last = self.lines[-1][:80] if self.lines else ""
        return Progress(percent, f"Step {self.index + 1} of {n}: {step.description}" + (f" — {last}" if last else ""))

    def cancel(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM) if os.name != "nt" else self.proc.terminate()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None
        if self.state == "running":
            self.state = "cancelled"


__all__ = ["BackgroundSteps"]
