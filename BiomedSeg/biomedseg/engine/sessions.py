"""Interactive sessions: one image kept in the worker so each new click costs only the prompt.

A request that names a ``session`` and brings an image (re)opens that session: the image,
its region and, for an interactive model, the backend's own session (``open_session``: the
image embedding) are kept. A later request with the same session id and no image runs its
new prompts on the kept image, so neither the voxels nor the embedding are sent or
computed again. Models that are not interactive still keep the image (no re-transfer);
their own caches do the rest. Sessions end when closed, when their model is evicted, or
when more than ``BIOMEDSEG_MAX_SESSIONS`` are open (oldest first).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

from ..errors import InputError
from . import loading

MAX_SESSIONS = int(os.environ.get("BIOMEDSEG_MAX_SESSIONS", "4"))


@dataclass
class EngineSession:
    id: str
    model_id: str
    device: str
    weights: str | None
    volume: object
    region: object
    options: dict
    backend: object
    backend_session: object = None
    runs: int = 0

    def close(self) -> None:
        if self.backend_session is not None:
            self.backend_session.close()
            self.backend_session = None


class SessionStore:
    def __init__(self):
        self.sessions: "OrderedDict[str, EngineSession]" = OrderedDict()
        loading.EVICTION_HOOKS.append(self.close_for_backend)

    def get(self, session_id: str, model_id: str, device: str, weights: str | None) -> EngineSession:
        """The open session, or an InputError that says to send the image again."""
        found = self.sessions.get(session_id)
        if found is None:
            raise InputError(f"Session '{session_id}' is not open in the worker (closed, expired or the worker "
                             "restarted).", hint="Send the image again to open it.")
        if (found.model_id, found.device, found.weights) != (model_id, device, weights):
            raise InputError(f"Session '{session_id}' belongs to model '{found.model_id}' on {found.device}.",
                             hint="Send the image again to open a session for this model.")
        self.sessions.move_to_end(session_id)
        return found

    def runner(self, session_id, model_id, device, weights, volume, region, options, backend, work, grid, entry,
               progress, cancelled):
        """A ``runner(plan)`` for the engine's memory policy that runs in the session (opening it if needed).

        The backend's session (its embedding) is kept only while the image, the region, the options and
        the loaded model stay the same; anything else opens it afresh on the kept image."""
        found = self.sessions.get(session_id)
        same = (found is not None and found.volume is volume and found.region == region
                and found.options == options and found.backend is backend
                and (found.model_id, found.device, found.weights) == (model_id, device, weights))
        if not same:
            self.close(session_id)
            found = EngineSession(session_id, model_id, device, weights, volume, region, dict(options), backend)
            self.sessions[session_id] = found
            while len(self.sessions) > MAX_SESSIONS:
                self.close(next(iter(self.sessions)))
        self.sessions.move_to_end(session_id)

        def run(plan):
            if entry.interactive and found.backend_session is None:
                found.backend_session = backend.open_session(work, plan, progress=progress, cancelled=cancelled)
            found.runs += 1
            if found.backend_session is not None:
                return found.backend_session.run(grid, plan, progress=progress, cancelled=cancelled)
            return backend.run(work, grid, plan, progress=progress, cancelled=cancelled)

        return run

    def close(self, session_id: str) -> bool:
        found = self.sessions.pop(session_id, None)
        if found is not None:
            found.close()
        return found is not None

    def close_for_backend(self, backend) -> None:
        for sid in [s.id for s in self.sessions.values() if s.backend is backend]:
            self.close(sid)

    def close_all(self) -> None:
        for sid in list(self.sessions):
            self.close(sid)

    def describe(self) -> list[dict]:
        return [{"session": s.id, "model": s.model_id, "device": s.device, "runs": s.runs,
                 "shape": list(s.volume.shape)} for s in self.sessions.values()]


SESSIONS = SessionStore()
