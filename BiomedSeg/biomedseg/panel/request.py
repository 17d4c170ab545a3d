"""The worker request built from the panel state, checked before anything is sent.

Everything a person can get wrong in the panel (a model not in this version, the wrong
device, a slice range outside the volume, no prompt, a prompt type the model does not take)
is refused here with a sentence, so a bad request never reaches the worker. The panel sends
the whole volume with the region (slice range along the slice axis, ROI): the engine cuts
it out and returns masks on the whole grid, the same way for the CLI. Only the options the
model declares are sent (modality and site where the model has them).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..catalog import check_options, check_prompts, get_model
from ..decisions import decide
from ..errors import InputError
from ..geometry import Region, make_region, region_box
from ..prompts import TextPrompt
from ..volume import Volume
from .models import device_supported
from .state import POSTPROCESS, SLICE_AXES, PanelState, parse_prompts


@dataclass
class Request:
    """A worker job as the panel wants it: the volume, the model call, and its region."""

    volume: Volume
    model: str
    prompts: list
    region: Region
    kwargs: dict = field(default_factory=dict)
    #: what the engine will warn about (a target not trained for this modality, a forced run)
    warnings: list[str] = field(default_factory=list)


def geometric_prompts(state: PanelState, volume: Volume, prompt_nodes, entry) -> list:
    """Boxes and clicks from markups nodes, in world RAS (``slicer_bridge.prompts_from_markups``).

    A 3D model reads an ROI as a 3D box; a slice-wise model reads it as a box on the slice axis's
    plane. Each node's name is the target it describes (several nodes with one name are one object).
    """
    if not prompt_nodes:
        return []
    from .. import slicer_bridge

    plane = None if entry.input == "3d" else state.slice_axis
    out = []
    for node in prompt_nodes:
        out += slicer_bridge.prompts_from_markups(node, target=node.GetName().strip() or "object", plane=plane)
    return out


def build_request(state: PanelState, volume: Volume, roi_bounds: tuple | None = None,
                  prompt_nodes=None, prompts: list | None = None) -> Request:
    """Check the panel state against the catalogue and turn it into a worker request
    (``prompts``: typed prompts in RAS beyond the state's text and the markups nodes)."""
    entry = get_model(state.model)
    if not entry.data.get("backend"):
        raise InputError(f"Model '{state.model}' is not available in this version of BiomedSeg.",
                         hint="Choose another model.")
    if not device_supported(entry, state.device):
        raise InputError(f"Model '{state.model}' does not run on '{state.device}'; it runs on "
                         f"{', '.join(entry.data.get('devices', []))}.", hint="Set the device to auto.")
    typed = [TextPrompt(p) for p in parse_prompts(state.prompts)] + list(prompts or [])
    prompts = check_prompts(state.model, typed + geometric_prompts(state, volume, prompt_nodes, entry), state.free_text)
    if state.postprocess not in POSTPROCESS:
        raise InputError(f"Unknown post-processing '{state.postprocess}'; use one of {', '.join(POSTPROCESS)}.")
    if state.slice_axis not in SLICE_AXES:
        raise InputError(f"Unknown slice axis '{state.slice_axis}'; use axial, coronal or sagittal.")
    if not 0.0 < float(state.threshold) < 1.0:
        raise InputError(f"Threshold {state.threshold} must lie strictly between 0 and 1.")
    region = make_region(state.slice_axis, state.slice_range, roi_bounds)
    region_box(volume, region)  # a range outside the volume or an ROI beside it: said here, not in the worker
    keep_largest, fill_holes = POSTPROCESS[state.postprocess]
    options = {name: value for name, value in (("modality", state.modality), ("site", state.site))
               if value and name in entry.options}
    options.update(state.options)
    check_options(state.model, entry.options, options)
    # the engine's own guard, here so a refusal (with 'Use anyway') comes before anything is sent; the
    # modality list's choice counts as said only for models that take it (deepbet's one entry says nothing)
    decisions = decide(entry, volume, prompts, options, force=state.force, free_text=state.free_text)
    kwargs = {"device": state.device, "threshold": float(state.threshold), "keep_largest": keep_largest,
              "fill_holes": fill_holes, "weights": state.weights or None, "options": options, "region": region,
              "free_text": bool(state.free_text), "force": bool(state.force)}
    kwargs["probabilities"] = bool(state.show_probabilities) and "masks" in entry.results  # the soft maps to show
    return Request(volume, state.model, prompts, region, kwargs, list(decisions["warnings"]))


__all__ = ["Request", "build_request", "geometric_prompts"]
