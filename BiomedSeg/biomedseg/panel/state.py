"""What the panel's widgets can say, and the ``PanelState`` they say it in.

The choices here are also the allowed values of the Slicer module's parameter node, so the
scene file, the widgets and the request builder cannot disagree about them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..catalog import default_model_id
from ..prompts import parse_text_prompts

SLICE_AXES = ["axial", "coronal", "sagittal"]
DEVICES = ["auto", "cuda", "mps", "cpu"]
#: Post-processing choice -> (keep_largest, fill_holes); None leaves it to the model's defaults.
POSTPROCESS = {
    "model default": (None, None),
    "none": (False, False),
    "keep largest component": (True, False),
    "fill holes": (False, True),
    "largest component + fill holes": (True, True),
}
#: Write mode shown -> slicer_bridge.write_segments mode.
WRITE_MODES = {
    "add as new segments": "add",
    "overwrite segments of the same name": "overwrite",
}
#: File suffix -> what the export menu says.
EXPORT_FORMATS = {
    ".seg.nrrd": "Slicer segmentation (.seg.nrrd)",
    ".nii.gz": "NIfTI labelmap (.nii.gz)",
    ".nrrd": "NRRD labelmap (.nrrd)",
    ".dcm": "DICOM SEG (.dcm)",
}


#: 'liver, left kidney; tumor' -> ['liver', 'left kidney', 'tumor']: the same rule as the CLI's --prompt.
parse_prompts = parse_text_prompts


def join_prompts(prompts: list[str]) -> str:
    return ", ".join(prompts)


def toggle_prompt(text: str, target: str) -> str:
    """The prompt line after clicking a suggestion: adds ``target``, or removes it if it is there."""
    prompts = parse_prompts(text)
    if target.lower() in {p.lower() for p in prompts}:
        prompts = [p for p in prompts if p.lower() != target.lower()]
    else:
        prompts.append(target)
    return join_prompts(prompts)


def chosen_prompts(text: str) -> set[str]:
    """The prompts of the line, lower-cased: which suggestions show a tick."""
    return {p.lower() for p in parse_prompts(text)}


@dataclass
class PanelState:
    """Everything the panel's widgets say, in engine terms (what the parameter node stores)."""

    model: str = field(default_factory=default_model_id)
    prompts: list[str] = field(default_factory=lambda: ["brain"])
    modality: str = ""
    site: str = ""
    slice_axis: str = "axial"
    #: Inclusive (first, last) slice indices along ``slice_axis``; None = every slice.
    slice_range: tuple[int, int] | None = None
    threshold: float = 0.5
    postprocess: str = "model default"
    write_mode: str = "add as new segments"
    device: str = "auto"
    #: Python the worker runs in ('' = the default: Slicer's own Python).
    worker_python: str = ""
    #: A BiomedSeg server (`biomedseg serve`) to run on instead of the local worker ('' = local), its token
    #: ('' = $BIOMEDSEG_TOKEN or this machine's token file), and whether to run locally when it cannot be
    #: reached (a choice the person makes, never a silent switch).
    server_url: str = ""
    server_token: str = ""
    fallback_local: bool = False
    #: Local checkpoint (file or folder) instead of the catalogue's source ('' = none).
    weights: str = ""
    show_3d: bool = True
    #: Ask the worker for each target's soft map and show it over the image ("<target> probability").
    show_probabilities: bool = False
    #: Send text prompts the model does not list as written (its 'Free text' box; free-text models only).
    free_text: bool = False
    #: Run even though the image is not one of the model's modalities ('Use anyway', for one run).
    force: bool = False
    #: Where ``modality`` and ``site`` came from when the panel guessed them ("BiomedCLIP: CT 62%, chest 48%",
    #: "DICOM tags: CT; BiomedCLIP: chest 48%"); '' when the person chose them or nothing was recognised.
    guess_source: str = ""
    #: Extra backend options (tests use them to steer the test backend).
    options: dict = field(default_factory=dict)


def state_from_parameters(p) -> PanelState:
    """The run request's settings from the module's parameter node (any object with its fields)."""
    return PanelState(
        model=p.model, prompts=parse_prompts(p.prompts), modality=p.modality, site=p.site,
        slice_axis=p.sliceAxis, slice_range=(p.sliceFirst, p.sliceLast) if p.useSliceRange else None,
        threshold=p.threshold, postprocess=p.postprocess, write_mode=p.writeMode, device=p.device,
        worker_python=p.workerPython, weights=p.weightsPath, show_3d=p.show3D,
        show_probabilities=p.showProbabilities, free_text=getattr(p, "freeText", False),
        server_url=getattr(p, "serverUrl", ""), fallback_local=getattr(p, "fallbackLocal", False))


__all__ = ["SLICE_AXES", "DEVICES", "POSTPROCESS", "WRITE_MODES", "EXPORT_FORMATS", "parse_prompts", "join_prompts",
           "toggle_prompt", "chosen_prompts", "PanelState", "state_from_parameters"]
