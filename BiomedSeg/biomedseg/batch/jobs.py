"""From a case and the batch's settings to a checked request, and the checks the `segment` command runs.

The same library functions as `segment` (``catalog.check_prompts``, ``check_options``,
``decisions.decide``, ``io.preflight.check_outputs``), per case: a manifest row may give its own
prompts and options, and each image meets the modality guard. ``settings`` is what decides the
result and goes into the case's settings hash.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import InputError
from .cases import Case
from .summary import file_identity, settings_hash

#: --format choices: the suffix of each case's segmentation
FORMATS = (".seg.nrrd", ".nii.gz", ".nrrd")


@dataclass
class BatchSettings:
    """What the command line says for every case (a manifest row may replace prompts and add options)."""

    model: str
    outdir: Path
    prompts: list = field(default_factory=list)  # typed prompts of the command line
    options: dict = field(default_factory=dict)
    threshold: float = 0.5
    keep_largest: bool | None = None
    fill_holes: bool | None = None
    weights: str | None = None
    device: str = "auto"
    plane: str = "axial"
    free_text: bool = False
    force: bool = False
    format: str = ".seg.nrrd"
    preview: bool = False
    report: bool = False
    overwrite: bool = False


@dataclass
class CaseJob:
    """A case checked against the catalogue (before its image is read), with its output paths."""

    case: Case
    prompts: list
    options: dict  # as stated (modality and site included): what the engine and the guard get
    settled: dict  # declared options with their defaults, for the report
    settings: dict
    digest: str
    output: Path
    outputs: list[Path]  # every file a successful run writes (label tables, preview, report)
    preview: Path | None
    report: Path | None

    def request(self, s: BatchSettings, region) -> dict:
        """The engine's keyword arguments (``engine.segment`` / ``WorkerClient.run``)."""
        return dict(device=s.device, threshold=s.threshold, keep_largest=s.keep_largest, fill_holes=s.fill_holes,
                    weights=s.weights, options=self.options, region=region, free_text=s.free_text, force=s.force)


def check_settings(s: BatchSettings) -> None:
    """What holds for every case, checked once before anything (a typo fails the batch, not each case)."""
    from ..catalog import check_options, check_prompts, get_model

    if s.weights is not None and not s.weights.strip():
        raise InputError("--weights is empty.", hint="Give the checkpoint file or folder, or leave --weights out.")
    if not (0.0 < s.threshold < 1.0):
        raise InputError(f"Threshold {s.threshold} must lie strictly between 0 and 1.")
    if s.format not in FORMATS:
        raise InputError(f"--format {s.format!r}: use one of {', '.join(f.lstrip('.') for f in FORMATS)}.")
    entry = get_model(s.model)
    if "masks" not in entry.results:
        raise InputError(f"Model '{s.model}' returns {', '.join(entry.results)}, not masks: `batch` writes "
                         "segmentations.", hint="Run `biomedseg segment ... -o NAME.json` per image instead.")
    check_prompts(s.model, s.prompts, s.free_text)
    check_options(s.model, entry.options, s.options)


def prepare(case: Case, s: BatchSettings) -> CaseJob:
    """The case's prompts and options, checked (``InputError`` for this case only), and its settings hash."""
    from ..catalog import check_options, check_prompts, get_model
    from ..io.writers import outputs_for
    from ..prompts import TextPrompt, prompt_from_dict, prompt_to_dict

    entry = get_model(s.model)
    prompts = list(s.prompts)
    if case.prompt is not None or case.prompts is not None:
        prompts = [TextPrompt(t) for t in case.prompt or []] + [prompt_from_dict(p) for p in case.prompts or []]
    prompts = check_prompts(s.model, prompts, s.free_text)
    options = {**s.options, **case.options}
    settled = check_options(s.model, entry.options, options)
    output = s.outdir / f"{case.name}{s.format}"
    preview = s.outdir / f"{case.name}.png" if s.preview else None
    report = s.outdir / f"{case.name}.run.json" if s.report else None
    settings = {"model": s.model, "model_version": entry.data.get("version"),
                "weights": file_identity(s.weights) if s.weights else None,
                "weights_sha256": entry.weights.get("file_sha256"),
                "prompts": [prompt_to_dict(p) for p in prompts], "options": options, "threshold": s.threshold,
                "keep_largest": s.keep_largest, "fill_holes": s.fill_holes, "plane": s.plane,
                "free_text": s.free_text, "force": s.force, "engine": __version__, "format": s.format,
                "input": file_identity(case.input)}
    return CaseJob(case, prompts, options, settled, settings, settings_hash(settings), output,
                   outputs_for(output) + [p for p in (preview, report) if p], preview, report)


def read_checked(job: CaseJob, s: BatchSettings, owned: list[str]):
    """Read the case's image and run `segment`'s checks on it: (volume, decisions, warnings, read seconds).

    Files an earlier run of this batch wrote for this case (``owned``) may be replaced; any other file
    in the way needs --overwrite, as with `segment`.
    """
    from ..catalog import get_model
    from ..decisions import decide
    from ..io import read_volume
    from ..io.preflight import check_outputs

    started = time.perf_counter()
    volume = read_volume(job.case.input)
    seconds = time.perf_counter() - started
    warnings = [str(w) for w in volume.meta.get("warnings", [])]
    others = [p for p in (job.preview, job.report) if p]
    check_outputs(job.output, volume, overwrite=replace_allowed(job, s, owned), others=others)
    decisions = decide(get_model(s.model), volume, job.prompts, job.options, force=s.force, free_text=s.free_text)
    return volume, decisions, warnings + decisions["warnings"], seconds


def replace_allowed(job: CaseJob, s: BatchSettings, owned: list[str]) -> bool:
    """Whether writing this case may replace files: --overwrite, or the files in the way are the ones the
    summary says this batch wrote (``owned``: names in OUTDIR)."""
    return s.overwrite or all(p.name in owned or not os.path.lexists(p) for p in job.outputs)
