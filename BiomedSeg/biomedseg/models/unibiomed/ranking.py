"""Which slice to centre UniBiomed's 5 language-model slices on: BiomedCLIP's best slice for the target.

The authors' model reads only 5 slices of a volume, so they should show the target. BiomedCLIP's
``rank`` task scores every slice against a text; when BiomedCLIP's packages and weights are already
on this machine (the hub cache or ``$BIOMEDSEG_WEIGHTS_DIR``; nothing is downloaded for it), its own
backend is loaded here, once per UniBiomed backend, and asked. Otherwise the caller takes the middle
of the slice range, and the run report says why. Model code cannot go through the engine (the layers
forbid it), so this uses BiomedCLIP's backend class and the weights lookup directly.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from biomedseg.models.base import LoadContext
from biomedseg.models.biomedclip import backend as biomedclip
from biomedseg.prompts import PromptSet
from biomedseg.runtime.weights import resolve_weights, weights_state
from biomedseg.volume import Volume

ENTRY = Path(biomedclip.__file__).with_name("model.json")


class SliceRanker:
    """BiomedCLIP's ``rank`` for one text at a time, loaded on first use; ``why`` says what is missing."""

    def __init__(self, device: str):
        self.device = device
        self.backend = None
        self.why = ""

    def available(self) -> bool:
        if self.backend is not None:
            return True
        entry = json.loads(ENTRY.read_text())
        missing = [name for name in entry["requires"] if importlib.util.find_spec(name) is None]
        if missing:
            self.why = f"BiomedCLIP needs {', '.join(missing)} here"
            return False
        state = weights_state(entry["weights"])
        if not state["present"]:
            self.why = "BiomedCLIP's weights are not on this machine"
            return False
        paths = resolve_weights(entry["weights"], offline=True)
        backend = biomedclip.BiomedCLIPBackend(self.device)
        backend.load(LoadContext(entry["id"], self.device, list(paths), ENTRY.parent, entry))
        self.backend = backend
        return True

    def best(self, volume: Volume, target: str, plane: str, window=None) -> tuple[int, float]:
        """(slice number as --slice-range counts, score) of the slice that fits ``target`` best."""
        prompts = PromptSet(texts=[target], targets=[target])
        options = {"task": "rank", "top": 1, "window": window}
        plan = self.backend.plan(volume, prompts, options, plane=plane)
        out = self.backend.run(volume, prompts, plan, progress=lambda *a: None, cancelled=lambda: False)
        best = out.report["ranking"][target][0]
        return int(best["slice"]), float(best["score"])
