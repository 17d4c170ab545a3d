"""A real `biomedseg serve` process on loopback for the tests: started, read, stopped."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import WORKER_MODELS

ROOT = Path(__file__).resolve().parents[1]
#: the models a test server knows: the controllable test models and the interactive toy
SERVER_MODELS = os.pathsep.join([str(WORKER_MODELS), str(Path(__file__).parent / "toy_models" / "click_session")])


class ServerProcess:
    """``biomedseg serve --port PORT`` with its own token folder; ``url`` and ``token`` once it listens."""

    def __init__(self, config_dir: Path, port: int = 0, extra: list[str] | None = None):
        self.config_dir = Path(config_dir)
        self.port = port
        self.extra = list(extra or [])
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.lines: list[str] = []

    def start(self, timeout: float = 60.0) -> "ServerProcess":
        env = dict(os.environ, BIOMEDSEG_CONFIG_DIR=str(self.config_dir), BIOMEDSEG_EXTRA_MODELS=SERVER_MODELS,
                   PYTHONPATH=str(ROOT / "BiomedSeg"), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "biomedseg.cli", "serve", "--port", str(self.port),
                                      *self.extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                     text=True, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("the server exited: " + "".join(self.lines))
            self.lines.append(line)
            if line.startswith("BiomedSeg server listening on "):
                self.url = line.split()[-1]
                self.port = int(self.url.rsplit(":", 1)[1])
                break
        else:
            raise RuntimeError("the server did not start in time")
        line = self.proc.stdout.readline()  # the token line
        self.lines.append(line)
        return self

    @property
    def token(self) -> str:
        return (self.config_dir / "server-token").read_text().strip()

    def kill(self) -> None:
        """kill -9, as a crash or a power cut would."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode
