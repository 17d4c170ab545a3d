"""DICOM SEG output: segments as a binary Segmentation that references the source series.

A DICOM SEG is only meaningful next to the images it was drawn on (PACS, OHIF and Slicer
find it by study, frame of reference and referenced instances), so it is written only
for a reference read from DICOM. Frame k of every mask is tied to ``dicom_files[k]``, the
file the reader put at slice k; highdicom takes the plane positions from those files, so
no geometry is re-derived here. pydicom and highdicom are the optional ``dicom`` extra and
are imported on use.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import DependencyMissingError, InputError
from ..segments import Segment
from ..volume import Volume
from .atomic import atomic_write

#: Options ``write_dicom_seg`` understands (anything else is refused, so typos surface).
OPTIONS = ("series_description", "series_number", "content_label", "content_description",
           "content_creator_name")


def write_dicom_seg(path: str | os.PathLike, reference: Volume, segments: list[Segment], overwrite: bool = False,
                    **options) -> Path:
    """Write ``segments`` (prepared, on ``reference``'s grid) as a binary DICOM SEG at ``path``.

    Options: ``series_description`` (default 'BiomedSeg segmentation'), ``series_number``
    (1000), ``content_label`` (DICOM CS; highdicom's default is '<modality>_SEG'),
    ``content_description``, ``content_creator_name``. Segment numbers are 1..n in the
    order given (DICOM requires that); names go to the segment labels, terminology to the
    property codes.
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InputError(f"Unknown DICOM SEG option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}.")
    files = check_dicom_seg_reference(reference)  # the checks the run's pre-flight made, once more
    try:
        import highdicom as hd
        import pydicom
        from pydicom.sr.codedict import codes
    except ImportError as exc:
        raise DependencyMissingError(f"Writing DICOM SEG needs pydicom and highdicom ({exc}).",
                                     hint="Install them with: pip install 'biomedseg[dicom]'.") from None

    path = Path(path)
    sources = _read_sources(files, reference, pydicom)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="BiomedSeg", version=__version__, family=codes.cid7162.ArtificialIntelligence)
    try:
        descriptions = [_description(hd, number, seg, algorithm) for number, seg in enumerate(segments, start=1)]
        texts = {"series_description": _lo(options.get("series_description", "BiomedSeg segmentation"))}
        if options.get("content_description"):
            texts["content_description"] = _lo(options["content_description"])
        # Text outside ASCII could be mangled in the source's character set; UTF-8 holds all.
        if not all(t.isascii() for t in [d.SegmentLabel for d in descriptions] + list(texts.values())):
            texts["specific_character_set"] = "ISO_IR 192"
        # (frames, rows, columns, segments): frame k is dicom_files[k], rows are j, columns are i.
        pixels = np.stack([seg.mask for seg in segments], axis=-1).astype(np.uint8)
        dataset = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=int(options.get("series_number", 1000)),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="BiomedSeg",
            manufacturer_model_name="BiomedSeg",
            software_versions=__version__,
            device_serial_number="0",
            content_label=options.get("content_label"),
            content_creator_name=options.get("content_creator_name"),
            # Frames where a segment is absent carry no information; dropping them keeps SEGs
            # of many small structures small. A segment empty everywhere keeps its description
            # and has no frames (highdicom keeps all frames if every segment is empty).
            omit_empty_frames=True,
            **texts,
        )
    except InputError:
        raise
    except ValueError as exc:  # highdicom's checks of option values and source attributes
        raise InputError(f"'{path}': the DICOM SEG cannot be built: {exc}") from None
    if "ContentCreatorName" not in dataset:  # type 2: present even when unknown
        dataset.ContentCreatorName = None
    return atomic_write(path, lambda tmp: dataset.save_as(tmp, enforce_file_format=True), overwrite)


def _read_sources(files: list[str], reference: Volume, pydicom) -> list:
    """Source datasets in slice order, checked to be the grid the masks were drawn on."""
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    _, n_rows, n_columns = reference.shape  # one single-frame file per slice: check_dicom_seg_reference
    for name, ds in zip(files, datasets):
        if (int(ds.Rows), int(ds.Columns)) != (n_rows, n_columns):
            raise InputError(f"'{name}' has {ds.Rows}x{ds.Columns} pixels but the reference slice is "
                             f"{n_rows}x{n_columns}; the DICOM SEG cannot be tied to the images.")
    # Slice 0 must still lie where the first file lies, with the same row and column
    # directions: a volume cropped, flipped or reoriented after reading would not. Later
    # slices are not compared, so series with uneven slice gaps are still written.
    first, lps = datasets[0], reference.ijk_to_lps
    moved = turned = False
    if "ImagePositionPatient" in first:
        offset = np.asarray(first.ImagePositionPatient, float) - lps[:3, 3]
        moved = np.linalg.norm(offset) > 0.5 * float(np.min(reference.spacing))
    if "ImageOrientationPatient" in first:
        cosines = np.asarray(first.ImageOrientationPatient, float).reshape(2, 3)  # row, column
        axes = (lps[:3, :2] / reference.spacing[:2]).T  # i, j directions
        turned = bool(np.any(np.sum(cosines * axes, axis=1) < 0.99))
    if moved or turned:
        raise InputError(f"The reference's first slice is not where '{files[0]}' lies (cropped, flipped or "
                         "reoriented after reading?); the DICOM SEG cannot be tied to the images.",
                         hint="Segment the volume as read from DICOM, or write .seg.nrrd.")
    return datasets


def _lo(text) -> str:
    """Text as a DICOM LO value: no backslash (the value separator), at most 64 bytes."""
    value = str(text).replace("\\", "/").strip()
    while len(value.encode("utf-8")) > 64:
        value = value[:-1]
    return value


def _code(hd, triple):
    """slicerio [scheme, code, meaning] -> highdicom CodedConcept."""
    scheme, value, meaning = (str(x) for x in triple)
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _description(hd, number: int, seg: Segment, algorithm):
    """SegmentDescription with label, property codes, algorithm and CIELab display colour."""
    term = seg.terminology or {}
    if not term.get("category") or not term.get("type"):
        raise InputError(f"Segment '{seg.name}' has no category/type terminology, which DICOM SEG requires.")
    region = term.get("anatomicRegion")
    rgb = [min(255.0, max(0.0, 255.0 * c)) for c in seg.color]
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=_lo(seg.name),
        segmented_property_category=_code(hd, term["category"]),
        segmented_property_type=_code(hd, term["type"]),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=[_code(hd, region)] if region else None,
        display_color=hd.color.CIELabColor.from_rgb(*rgb),
    )
    # Modifiers (left/right) sit inside the code item they modify; highdicom has no argument.
    if term.get("typeModifier"):
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _code(hd, term["typeModifier"])]
    if region and term.get("anatomicRegionModifier"):
        description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [
            _code(hd, term["anatomicRegionModifier"])]
    return description


def check_dicom_seg_reference(volume: Volume) -> list[str]:
    """Refuse a reference a DICOM SEG cannot point to, before anything runs; returns its DICOM files.

    Cheap: one header (no pixels) is read. The checks that need every file's header (rows and
    columns, the first slice's place) stay with the writer."""
    files = volume.meta.get("dicom_files")
    if not files:
        raise InputError(f"DICOM SEG needs a DICOM reference: '{volume.name or 'the reference image'}' was not "
                         "read from a DICOM series, so the segmentation has no images to point to.",
                         hint="Write .seg.nrrd (or .nii.gz) instead.")
    missing = [name for name in ("highdicom", "pydicom") if importlib.util.find_spec(name) is None]
    if missing:
        raise DependencyMissingError(f"Writing DICOM SEG needs pydicom and highdicom ({', '.join(missing)} "
                                     "not installed).", hint="Install them with: pip install 'biomedseg[dicom]'.")
    import pydicom

    try:
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise InputError(f"'{files[0]}' of the reference series cannot be read any more ({exc}).",
                         hint="Read the series again, or write .seg.nrrd.") from None
    n_slices = volume.shape[0]
    frames = int(first.get("NumberOfFrames", 1) or 1)
    if frames > 1 or (len(files) == 1 and n_slices > 1):
        raise InputError(f"'{files[0]}' is a multi-frame (enhanced) DICOM image holding all {max(frames, n_slices)} "
                         "frames in one file; DICOM SEG output supports series of single-frame files only.",
                         hint="Write .seg.nrrd instead.")
    if len(files) != n_slices:
        raise InputError(f"The reference has {n_slices} slices but lists {len(files)} DICOM files; it was "
                         "changed after reading, so the DICOM SEG frames cannot be tied to the images.",
                         hint="Segment the volume as read from DICOM, or write .seg.nrrd.")
    if not str(first.get("FrameOfReferenceUID", "") or "").strip():
        raise InputError(f"'{files[0]}' has no Frame of Reference UID, which a DICOM SEG needs to share the "
                         "images' patient coordinates.", hint="Write .seg.nrrd instead.")
    return list(files)
