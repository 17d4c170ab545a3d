"""Every output of a run checked before any model runs, so a bad path costs seconds, not an hour.

``check_outputs`` takes the segmentation output, the image it is drawn on and the run's other files
(a preview PNG, a report JSON, a probabilities image) and refuses, each in one sentence with what to
do: a name BiomedSeg cannot write; two outputs naming one file; an output that is one of the input's
files; a label table that belongs to another labelmap; every path ``atomic.check_target`` refuses; and
a DICOM SEG the reference cannot carry (``check_dicom_seg_reference``, which the DICOM SEG writer
calls too, so the rule lives here once).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ..errors import InputError
from ..volume import Volume
from .atomic import check_target
from .readers import suffix_of
from .dicom_seg import check_dicom_seg_reference
from .writers import SEGMENTATION_SUFFIXES, check_table_owner, outputs_for

#: What ``-o`` may name: a segmentation format, or ``.json`` for the result without voxels.
OUTPUT_SUFFIXES = SEGMENTATION_SUFFIXES + (".json",)
#: What a run's other files may be: a preview, a report, a label table, a probabilities image.
OTHER_SUFFIXES = (".png", ".json", ".csv", ".nii.gz", ".nii", ".nrrd", ".mha")


def check_outputs(output: str | os.PathLike, volume: Volume | None, *, overwrite: bool = False,
                  others: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Every path the run will write (``output``, its label tables, ``others``), or an ``InputError``.

    ``volume`` is the image the result is drawn on, as read (its ``meta`` names the input files and,
    for DICOM, the series); ``None`` checks the paths alone. Missing highdicom for a ``.dcm`` output
    is a ``DependencyMissingError`` (an install fixes it, not another name)."""
    output = Path(output)
    suffix = suffix_of(output)
    if suffix not in OUTPUT_SUFFIXES:
        raise InputError(f"Output '{output}' {_ending(suffix)}, which BiomedSeg does not write.",
                         hint=f"Name it with one of {', '.join(OUTPUT_SUFFIXES)}.")
    main = [output] if suffix == ".json" else outputs_for(output)
    extra = [Path(p) for p in others]
    targets = main + extra
    roles = ["the output"] + [f"the label table of '{output.name}'"] * (len(main) - 1) + ["another output"] * len(extra)
    _refuse_twice_named(targets, roles)
    for path in extra:
        if suffix_of(path) not in OTHER_SUFFIXES:
            raise InputError(f"'{path}' {_ending(suffix_of(path))}, which BiomedSeg does not write.",
                             hint=f"Name it with one of {', '.join(OTHER_SUFFIXES)}.")
    if volume is not None:
        _refuse_input_files(targets, volume)
    if len(main) > 1:
        check_table_owner(main[1], output)
    for path in targets:
        check_target(path, overwrite)
    if suffix == ".dcm" and volume is not None:
        check_dicom_seg_reference(volume)
    return targets


def _ending(suffix: str) -> str:
    return f"ends in '{suffix}'" if suffix else "has no file ending"


def _same_file(a: Path, b: Path) -> bool:
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)  # hard links and other names of one file too
    except OSError:
        pass
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def _refuse_twice_named(targets: list[Path], roles: list[str]) -> None:
    for n, path in enumerate(targets):
        for m, earlier in enumerate(targets[:n]):
            if _same_file(earlier, path):
                raise InputError(f"'{path}' is named twice among this run's outputs (as {roles[m]} and as {roles[n]}), "
                                 "so one would replace the other.", hint="Give each output a name of its own.")


def _input_files(volume: Volume) -> list[Path]:
    """The files the image was read from: the file itself, or a DICOM series' files (not its folder)."""
    files = [Path(f) for f in volume.meta.get("dicom_files") or []]
    source = volume.meta.get("source")
    if source and not Path(source).is_dir() and Path(source) not in files:
        files.append(Path(source))
    return files


def _refuse_input_files(targets: list[Path], volume: Volume) -> None:
    inputs = _input_files(volume)
    for path in targets:
        for source in inputs:
            if _same_file(path, source):
                what = "one of the input's DICOM files" if len(inputs) > 1 else "the input image"
                raise InputError(f"'{path}' is {what} ('{source}'); writing it would destroy the image "
                                 "the result is drawn on.", hint="Write the result to another file.")


__all__ = ["check_outputs", "check_dicom_seg_reference", "OUTPUT_SUFFIXES", "OTHER_SUFFIXES"]
