"""The panel's model list: every catalogue model with its state on this machine.

A model's state (ready, weights to download, dependencies missing, ...) depends on the
Python the worker runs in, which may not be this one, so that Python is asked.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

from ..catalog import ModelEntry, load_catalog
from .worker_python import same_python, with_engine_on_path


@dataclass
class ModelChoice:
    id: str
    title: str
    state: str
    detail: str
    ready: bool
    #: False for models that cannot be chosen at all here (not in this version, wrong device).
    enabled: bool
    input: str
    license: str
    size_bytes: int | None
    gated: bool
    #: what the model takes (text, box, point, mask) and returns (masks, labels, text)
    prompt_types: tuple = ("text",)
    results: tuple = ("masks",)
    #: the model can take text it does not list (its Free text box is offered)
    free_text: bool = False

    @property
    def takes_text(self) -> bool:
        return "text" in self.prompt_types

    @property
    def takes_markups(self) -> bool:
        """Boxes or points: the panel offers its Box / points selector."""
        return "box" in self.prompt_types or "point" in self.prompt_types

    @property
    def label(self) -> str:
        return f"{self.title} — {self.state}"

    @property
    def status_line(self) -> str:
        """The line under the model list: a tick or a warning sign, the state and why."""
        return f"{'✔' if self.ready else '⚠'} {self.state}: {self.detail}"

    @property
    def tooltip(self) -> str:
        size = f", {self.size_bytes / 1e6:,.0f} MB" if self.size_bytes else ""
        gated = ", gated (accept the licence on the hub and log in)" if self.gated else ""
        return f"{self.id}: {self.state} ({self.detail}). Weights: licence {self.license}{size}{gated}."

    @property
    def action(self) -> str | None:
        """What the panel offers to do about the state: install, download, choose a file."""
        return {"dependencies missing": "install_dependencies", "weights to download": "download_weights",
                "weights missing": "choose_weights"}.get(self.state)

    def action_before_run(self, weights_path: str = "") -> str | None:
        """What Segment must do first: install the dependencies, or download weights no local file replaces."""
        if self.action == "install_dependencies" or (self.action == "download_weights" and not weights_path):
            return self.action
        return None


def device_supported(entry: ModelEntry, device: str) -> bool:
    base = (device or "auto").split(":")[0].lower()
    return base == "auto" or base in entry.data.get("devices", [])


def model_states(worker_python: str | None = None, timeout: float = 30.0, env: dict | None = None) -> dict[str, dict]:
    """Each model's ``state()`` as seen by the Python the worker runs in.

    The default worker runs in this Python, so no process is started; another Python is
    asked once (the panel calls this when the worker Python setting changes).
    """
    if not worker_python or same_python(worker_python, sys.executable):
        import importlib

        importlib.invalidate_caches()  # packages installed by a background pip since the last look
        return {e.id: e.state() for e in load_catalog()}
    from ..worker.client import ENGINE_ROOT

    code = ("import json, biomedseg.catalog as c;"
            "print(json.dumps({e.id: e.state() for e in c.load_catalog()}))")
    env = with_engine_on_path(os.environ if env is None else env, ENGINE_ROOT)
    try:
        out = subprocess.run([worker_python, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason = f"cannot be run ({exc})"
        out = None
    if out is not None and out.returncode == 0:
        try:
            return json.loads(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            reason = "gave an unreadable answer"
    elif out is not None:
        reason = "cannot load the engine: " + (out.stderr.strip().splitlines() or ["no output"])[-1]
    state = {"ready": False, "state": "dependencies missing",
             "detail": f"the worker Python '{worker_python}' {reason}"}
    return {e.id: dict(state) for e in load_catalog()}


def model_choices(device: str = "auto", states: dict[str, dict] | None = None) -> list[ModelChoice]:
    """The model list of the panel: every catalogue model with its state on this machine."""
    states = states if states is not None else model_states()
    out = []
    for entry in load_catalog():
        st = states.get(entry.id) or entry.state()
        state, detail, ready = st["state"], st.get("detail", ""), bool(st.get("ready"))
        enabled = state not in ("not available in this version", "needs an NVIDIA GPU")
        if enabled and not device_supported(entry, device):
            state, ready, enabled = "not supported on this device", False, False
            detail = f"runs on {', '.join(entry.data.get('devices', []))}, not on '{device}'"
        weights = entry.weights
        out.append(ModelChoice(entry.id, entry.data.get("title", entry.id), state, detail, ready, enabled,
                               entry.data.get("input", "3d"), str(weights.get("license", "unknown")),
                               weights.get("size_bytes"), bool(weights.get("gated")), tuple(entry.prompt_types),
                               tuple(entry.results), entry.prompt_kind == "text"
                               and not entry.data.get("prompts_free_text")))
    return out


__all__ = ["ModelChoice", "device_supported", "model_states", "model_choices"]
