"""Reading images from files into ``Volume``: NIfTI, NRRD, MHA, DICOM, PNG/JPEG/TIFF.

Each format goes through the library that owns it (nibabel for NIfTI's RAS affine,
pynrrd for NRRD's space fields, SimpleITK for ITK formats, DICOM series and 2D images),
and every error names the file and what is wrong with it.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..volume import Volume, from_nibabel, from_nrrd, from_sitk, validate

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
ITK_SUFFIXES = (".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
READABLE = NIFTI_SUFFIXES + NRRD_SUFFIXES + ITK_SUFFIXES + DICOM_SUFFIXES + IMAGE_2D_SUFFIXES

#: DICOM tags copied into ``Volume.meta`` (used to guess modality and site, and for DICOM SEG).
DICOM_TAGS = {
    "0008|0060": "modality", "0018|0015": "body_part", "0008|103e": "series_description",
    "0020|000e": "series_uid", "0020|000d": "study_uid", "0008|0016": "sop_class_uid",
}


def suffix_of(path: str | os.PathLike) -> str:
    name = str(path).lower()
    for double in (".nii.gz", ".seg.nrrd"):
        if name.endswith(double):
            return double
    return Path(name).suffix


def read_volume(path: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """Read an image file or DICOM folder as a Volume in RAS.

    A folder is read as a DICOM series; when it holds several, ``series_uid`` picks one
    (otherwise the error lists them).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"'{p}' does not exist.")
    if p.is_dir():
        return read_dicom_series(p, series_uid)
    suffix = suffix_of(p)
    try:
        if suffix in NIFTI_SUFFIXES:
            volume = _read_nifti(p)
        elif suffix in NRRD_SUFFIXES or suffix == ".seg.nrrd":
            volume = _read_nrrd(p)
        elif suffix in ITK_SUFFIXES:
            volume = _read_with_sitk(p)
        elif suffix in DICOM_SUFFIXES:
            volume = _read_dicom_file(p)
        elif suffix in IMAGE_2D_SUFFIXES:
            volume = _read_2d_image(p)
        elif _looks_like_dicom(p):
            volume = _read_dicom_file(p)
        else:
            raise InputError(f"'{p}': '{suffix or p.name}' is not a format BiomedSeg reads. "
                             f"Use one of {', '.join(READABLE)} or a DICOM folder.")
    except InputError as err:
        if str(p) in err.message:
            raise
        raise InputError(f"'{p}': {err.message}", hint=err.hint) from None
    volume.meta.setdefault("source", str(p))
    if not volume.name:
        volume.name = _stem(p)
    return volume


#: Share of the available memory one image may take once read.
MEMORY_SHARE = 0.8
#: Peak memory of a read as a multiple of the array it gives (readers hold a decoded copy too).
READ_PEAK = 2
#: deflate (gzip, zlib) never expands data more than this: a bound on what a compressed file can hold.
DEFLATE_MAX_RATIO = 1032


def check_declared_size(p: Path, shape, itemsize: int, stored_bytes: int | None = None) -> None:
    """Before any voxel is read: the header's size must fit in the file and in memory.

    A tiny file whose header declares 1000^3 floats would otherwise make the reader allocate
    gigabytes (or die with a MemoryError) before noticing the data is not there."""
    import math

    import psutil

    shape = [int(n) for n in shape]
    need = math.prod(shape) * int(itemsize)
    if stored_bytes is not None and need > stored_bytes:
        raise InputError(f"'{p}': the voxel data cannot be read: the header declares {'x'.join(map(str, shape))} "
                         f"voxels ({need:,} bytes), but the file holds at most {max(0, stored_bytes):,} bytes of them: the file is "
                         "truncated or damaged, or its header is wrong.", hint="Export the image again.")
    available = psutil.virtual_memory().available
    if READ_PEAK * need > MEMORY_SHARE * available:
        raise InputError(f"'{p}': reading it needs {need / 1e9:.1f} GB ({'x'.join(map(str, shape))} voxels), more "
                         f"than the {available / 1e9:.1f} GB of memory available.",
                         hint="Crop or downsample it first, or use a machine with more memory.")


def _nrrd_itemsize(header: dict) -> int:
    """Bytes per value of a NRRD header's 'type' (8, the largest, when it is not one we know)."""
    kind = str(header.get("type", "")).lower().replace("signed ", "").replace("unsigned ", "u")
    sizes = {"char": 1, "uchar": 1, "int8": 1, "uint8": 1, "int8_t": 1, "uint8_t": 1, "short": 2, "ushort": 2,
             "int16": 2, "uint16": 2, "int16_t": 2, "uint16_t": 2, "short int": 2, "ushort int": 2, "int": 4,
             "uint": 4, "int32": 4, "uint32": 4, "int32_t": 4, "uint32_t": 4, "float": 4, "double": 8}
    return sizes.get(kind, 8)


def _nifti_stored_bytes(p: Path, offset: int) -> int:
    """Voxel bytes the file can hold: exactly, for .nii; for .nii.gz at most what deflate can expand its
    size to (gzip's own length field is modulo 4 GiB and covers only the last member, so it is no bound)."""
    size = p.stat().st_size
    if suffix_of(p) == ".nii":
        return size - offset
    return DEFLATE_MAX_RATIO * size - offset


def _metaimage_stored_bytes(p: Path) -> int | None:
    """The same bound for a .mha with its data inside: exact when raw, deflate's bound when compressed."""
    try:
        with open(p, "rb") as f:
            head = f.read(65536)
    except OSError:
        return None
    marker = head.find(b"ElementDataFile")
    end = head.find(b"\n", marker)
    if marker < 0 or end < 0 or b"LOCAL" not in head[marker:end]:
        return None  # detached data: ITK reads the other file
    data_bytes = p.stat().st_size - (end + 1)
    compressed = any(line.strip().lower().startswith(b"compresseddata") and line.strip().lower().endswith(b"true")
                     for line in head[:marker].splitlines())
    return DEFLATE_MAX_RATIO * data_bytes if compressed else data_bytes


def sitk_pixel_bytes(reader) -> int:
    """Bytes per component of the pixel type an ITK reader reports (8 when unknown)."""
    import SimpleITK as sitk

    sizes = {sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
             sitk.sitkInt32: 4, sitk.sitkFloat32: 4, sitk.sitkVectorUInt8: 1, sitk.sitkVectorInt8: 1,
             sitk.sitkVectorUInt16: 2, sitk.sitkVectorInt16: 2, sitk.sitkVectorFloat32: 4}
    return sizes.get(reader.GetPixelIDValue(), 8)


def _stem(p: Path) -> str:
    name = p.name
    for s in (".nii.gz", ".seg.nrrd") + READABLE:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name


def _read_nifti(p: Path) -> Volume:
    import nibabel as nib

    try:
        img = nib.load(str(p))
    except Exception as exc:  # nibabel raises many types for corrupt headers
        raise InputError(f"'{p}' is not a readable NIfTI file ({exc}).") from None
    # nibabel's loaded header has zero pixdims already replaced by 1 (with only a log
    # message), so look at the header as stored: without an sform, pixdim is the spacing.
    try:
        with nib.openers.ImageOpener(str(p)) as f:
            raw_header = type(img.header).from_fileobj(f, check=False)
        pixdim = np.asarray(raw_header["pixdim"][1:4], dtype=np.float64)
    except Exception:  # noqa: BLE001 -- nibabel itself read it; fall back to its header
        pixdim = np.asarray(img.header["pixdim"][1:4], dtype=np.float64)
    header = img.header
    slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
    scaled = not (slope in (None, 1.0) and inter in (None, 0.0))
    stored = _nifti_stored_bytes(p, int(header["vox_offset"]))
    check_declared_size(p, img.shape, img.get_data_dtype().itemsize, stored)  # what the file holds
    if scaled:  # and what it becomes: scaled values come back as float64
        check_declared_size(p, img.shape, 8)
    n_spatial = min(3, len(img.shape))
    if not np.all(pixdim[:n_spatial] > 0) and int(img.header["sform_code"]) == 0:
        raise InputError(f"'{p}': voxel spacing must be positive, the header gives "
                         f"{pixdim[:n_spatial].tolist()}.")
    if int(img.header["sform_code"]) == 0 and int(img.header["qform_code"]) == 0:
        # No orientation stored: nibabel and ITK guess differently. Slicer reads with ITK,
        # so take ITK's guess, or our results would not line up with the image in Slicer.
        return _read_with_sitk(p)
    try:
        if len(img.shape) < 3:
            img = nib.Nifti1Image(np.asanyarray(img.dataobj).reshape(img.shape + (1,) * (3 - len(img.shape))),
                                  img.affine, img.header)
        # What the affine means (scanner, aligned, Talairach, MNI...): the writers give results the same codes.
        codes = {"sform": int(header["sform_code"]), "qform": int(header["qform_code"])}
        meta = {"source": str(p), "file_space": "RAS", "nifti_xform_codes": codes}
        return from_nibabel(img, name=_stem(p), meta=meta)
    except InputError:
        raise
    except (OSError, EOFError, ValueError, zlib.error) as exc:  # truncated or damaged voxel data
        raise InputError(f"'{p}': the voxel data cannot be read, the file is truncated or damaged "
                         f"({_first_line(exc)}).") from None


def _read_nrrd(p: Path) -> Volume:
    import nrrd

    try:
        declared = nrrd.read_header(str(p))
    except Exception as exc:
        raise InputError(f"'{p}' is not a readable NRRD file ({exc}).") from None
    check_declared_size(p, declared.get("sizes", [0]), _nrrd_itemsize(declared))  # pynrrd says when data is short
    try:
        data, header = nrrd.read(str(p), index_order="F")
    except Exception as exc:
        raise InputError(f"'{p}' is not a readable NRRD file ({exc}).") from None
    if "space directions" not in header and "spacings" in header:
        spacings = np.asarray(header["spacings"], dtype=np.float64)
        if np.any(~np.isfinite(spacings[:3])) or np.any(spacings[:3] <= 0):
            raise InputError(f"'{p}': voxel spacing must be positive, the header gives {spacings.tolist()}.")
        header = dict(header)
        header["space directions"] = np.diag(spacings)
        header.setdefault("space", "left-posterior-superior")
    space = str(header.get("space", "left-posterior-superior")).lower()
    file_space = "RAS" if space in ("ras", "right-anterior-superior") else "LPS"
    return from_nrrd(data, header, name=_stem(p), meta={"source": str(p), "file_space": file_space})


def _sitk_read(p: Path):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"'{p}' cannot be read ({_first_line(exc)}).") from None
    _check_sitk_geometry(p, reader.GetSpacing(), reader.GetDimension(), reader.GetSize(),
                         reader.GetPixelIDValue(), reader.GetDirection(), reader.GetNumberOfComponents())
    stored = _metaimage_stored_bytes(p) if suffix_of(p) == ".mha" else None
    pixel_bytes = max(1, sitk_pixel_bytes(reader))
    check_declared_size(p, list(reader.GetSize()) + [reader.GetNumberOfComponents()], pixel_bytes, stored)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"'{p}' cannot be read ({_first_line(exc)}).") from None
    tags = {}
    for key, name in DICOM_TAGS.items():
        if reader.HasMetaDataKey(key):
            tags[name] = reader.GetMetaData(key).strip()
    return image, tags


def _check_sitk_geometry(p, spacing, dim, size, pixel_id, direction=None, n_components=1):
    import SimpleITK as sitk

    if not all(s > 0 for s in spacing):
        raise InputError(f"'{p}': voxel spacing must be positive, the header gives {list(spacing)}.")
    if direction is not None:
        d = np.asarray(direction, dtype=np.float64).reshape(dim, dim)[:3, :3]
        norms = np.linalg.norm(d, axis=0)
        if (not np.all(np.isfinite(d)) or np.any(norms == 0)
                or abs(np.linalg.det(d / np.where(norms == 0, 1, norms))) < 1e-6):
            raise InputError(f"'{p}': the direction matrix {np.round(d, 6).tolist()} is not invertible "
                             "(two image axes are parallel or an axis has no direction).")
    if dim == 4 and size[3] > 1:
        raise InputError(f"'{p}': 4D images (size {list(size)}) are not supported; extract one time point first.")
    complex_ids = {sitk.sitkComplexFloat32, sitk.sitkComplexFloat64}
    # MetaImage and NRRD have no complex type: ITK writes complex voxels as two float components.
    two_float = n_components == 2 and pixel_id in {sitk.sitkVectorFloat32, sitk.sitkVectorFloat64}
    if pixel_id in complex_ids or two_float:
        stored = " (stored as 2 floating-point components per voxel)" if two_float else ""
        raise InputError(f"'{p}': complex-valued voxels{stored} are not supported; save magnitude "
                         "(or real/imaginary parts) as a real image first.")


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages carry the useful sentence on their 'ITK ERROR:' / 'sitk::ERROR:' line
    # (matrices and other details may follow it); other exceptions lead with it.
    for ln in lines:
        for marker in ("ITK ERROR:", "sitk::ERROR:"):
            if marker in ln:
                text = ln.split(marker, 1)[1].strip()
                # drop ITK's 'ClassName(0x...): ' prefix
                if text.split(":", 1)[0].endswith(")") and "(0x" in text.split(":", 1)[0]:
                    text = text.split(":", 1)[1].strip()
                return text or ln
    if not lines:
        return type(exc).__name__
    return lines[-1] if lines[0].startswith("Exception thrown in SimpleITK") else lines[0]


def _read_with_sitk(p: Path, extra_meta: dict | None = None) -> Volume:
    image, tags = _sitk_read(p)
    if image.GetDimension() == 4:  # 4D with a single time point
        import SimpleITK as sitk

        size = list(image.GetSize())
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    meta = {"source": str(p), "file_space": "LPS", **tags, **(extra_meta or {})}
    return from_sitk(image, name=_stem(p), meta=meta)


def _read_2d_image(p: Path) -> Volume:
    """PNG/JPEG/TIFF: a one-slice volume, 1 mm pixels, shown as stored (LPS identity)."""
    volume = _read_with_sitk(p)
    volume.meta["image_kind"] = "2d" if volume.shape[0] == 1 else "stack"
    if suffix_of(p) in (".tif", ".tiff") and not volume.channels_last:
        # ITK's TIFF reader decodes several samples per pixel only for RGB photometry; any
        # other multi-sample TIFF comes back as one channel of interleaved bytes.
        samples = _tiff_samples_per_pixel(p)
        if samples and samples > 1:
            raise InputError(f"'{p}': the TIFF stores {samples} samples per pixel that are not RGB colour; "
                             "only grey or RGB(A) TIFFs are read. Save one channel (or RGB) first.")
    return volume


def _tiff_samples_per_pixel(p: Path) -> int | None:
    """SamplesPerPixel (tag 277) of the first TIFF page, or None when it cannot be told."""
    try:
        from PIL import TiffImagePlugin

        with open(p, "rb") as f:
            ifd = TiffImagePlugin.ImageFileDirectory_v2(f.read(8))
            f.seek(ifd.next)
            ifd.load(f)
        return int(ifd.get(277, 1))
    except Exception:  # noqa: BLE001 -- only a sanity check on top of ITK's reading
        return None


def _looks_like_dicom(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


#: DICOM tags that place an image in patient space; without them ITK assumes 1 mm, the origin, axial.
SPACING_TAGS = ("0028|0030", "0018|1164", "0018|2010")  # Pixel / Imager Pixel / Nominal Scanned Pixel Spacing
POSITION_TAG, ORIENTATION_TAG = "0020|0032", "0020|0037"


def dicom_geometry_warnings(where: str, has_tag, image, n_slices: int = 1) -> list[str]:
    """Sentences for the geometry a DICOM image lacks, where ITK's defaults (1 mm, the origin, axial)
    silently stand in for it.

    ``where`` names the image (quoted); ``has_tag(key)`` tells whether its first file has a tag; ``image``
    is what ITK made of it (an image, or a reader after ``ReadImageInformation``). A default counts only
    when the tag is absent and the value read is the default: enhanced (multi-frame) files keep their
    geometry in functional groups, which ITK reads."""
    spacing = [float(v) for v in image.GetSpacing()]
    origin = [float(v) for v in image.GetOrigin()]
    dim = len(spacing)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
    warnings = []
    if not any(has_tag(key) for key in SPACING_TAGS) and spacing[:2] == [1.0, 1.0]:
        warnings.append(f"{where} has no Pixel Spacing tag, so its pixels are taken to be 1 mm; distances, "
                        "volumes and models that expect real sizes will be wrong if they are not.")
    lacking = []
    if not has_tag(POSITION_TAG) and not any(origin):
        lacking.append(("Image Position (Patient)", "placed at the origin"))
    if not has_tag(ORIENTATION_TAG) and np.array_equal(direction, np.eye(dim)):
        lacking.append(("Image Orientation (Patient)", "taken to be axial"))
    if lacking:
        missing = [name for name, _ in lacking]
        assumed = " and ".join(text for _, text in lacking)
        if not has_tag(POSITION_TAG) and n_slices > 1 and dim > 2 and spacing[2] == 1.0:
            assumed += ", its slices 1 mm apart"
        warnings.append(f"{where} has no {' or '.join(missing)}, so it is {assumed}; it may not line "
                        "up with other images of the patient.")
    return warnings


def _warn(volume: Volume, sentences: list[str]) -> Volume:
    """Add sentences to ``volume.meta["warnings"]`` (the CLI and the panel show them)."""
    if sentences:
        volume.meta.setdefault("warnings", []).extend(sentences)
    return volume


def _read_dicom_file(p: Path) -> Volume:
    import SimpleITK as sitk

    volume = _read_with_sitk(p)
    volume.meta["dicom_files"] = [str(p)]
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    reader.ReadImageInformation()  # read once already: the header only
    return _warn(volume, dicom_geometry_warnings(f"'{p}'", reader.HasMetaDataKey, reader))


class _ItkWarningsOff:
    """ITK's own WARNING text (GDCM's 'No Series were found') off while a DICOM folder is searched: our
    sentence says what was wrong instead."""

    def __enter__(self):
        import SimpleITK as sitk

        self.before = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)

    def __exit__(self, *exc):
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalWarningDisplay(self.before)


def list_dicom_series(folder: str | os.PathLike) -> list[dict]:
    """The DICOM series in a folder: UID, number of files, description."""
    import SimpleITK as sitk

    series = []
    with _ItkWarningsOff():
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    for uid in uids:
        with _ItkWarningsOff():
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
        desc = ""
        try:
            r = sitk.ImageFileReader()
            r.SetFileName(files[0])
            r.ReadImageInformation()
            desc = r.GetMetaData("0008|103e").strip() if r.HasMetaDataKey("0008|103e") else ""
        except RuntimeError:
            pass
        series.append({"uid": uid, "files": len(files), "description": desc})
    return series


def read_dicom_series(folder: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """Read one DICOM series from a folder (sorted by patient position by GDCM)."""
    import SimpleITK as sitk

    folder = Path(folder)
    series = list_dicom_series(folder)
    if not series:
        raise _no_series(folder)
    if series_uid is None:
        if len(series) > 1:
            listing = "; ".join(f"{s['uid']} ({s['files']} files{', ' + s['description'] if s['description'] else ''})"
                                for s in series)
            raise InputError(f"'{folder}' holds {len(series)} DICOM series; choose one by UID: {listing}.")
        series_uid = series[0]["uid"]
    elif series_uid not in {s["uid"] for s in series}:
        raise InputError(f"'{folder}' has no DICOM series with UID {series_uid}; it has "
                         f"{', '.join(s['uid'] for s in series)}.")
    with _ItkWarningsOff():
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"'{folder}': DICOM series {series_uid} cannot be read ({_first_line(exc)}).") from None
    if any(s <= 0 for s in image.GetSpacing()):
        raise InputError(f"'{folder}': voxel spacing must be positive, got {list(image.GetSpacing())}.")
    tags = {}
    for key, name in DICOM_TAGS.items():
        if reader.HasMetaDataKey(0, key):
            tags[name] = reader.GetMetaData(0, key).strip()
    meta = {"source": str(folder), "file_space": "LPS", "dicom_files": files, **tags}
    volume = from_sitk(image, name=tags.get("series_description") or folder.name, meta=meta)
    validate(volume, str(folder))
    where = f"The DICOM series in '{folder}' ('{Path(files[0]).name}' first)" if len(files) > 1 else f"'{files[0]}'"
    return _warn(volume, dicom_geometry_warnings(where, lambda key: reader.HasMetaDataKey(0, key), image, len(files)))


def _no_series(folder: Path) -> InputError:
    """Why a folder gave no DICOM series, with what it holds instead."""
    try:
        entries = sorted(folder.iterdir(), key=lambda e: e.name)
    except OSError as exc:
        return InputError(f"'{folder}' holds no readable DICOM series: it cannot be listed ({exc.strerror}).")
    files = [e for e in entries if e.is_file()]
    folders = [e.name + "/" for e in entries if e.is_dir()]
    dicom = [e.name for e in files if suffix_of(e) in DICOM_SUFFIXES or _looks_like_dicom(e)]

    def some(names):
        return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")

    if not entries:
        return InputError(f"'{folder}' holds no readable DICOM series: the folder is empty.",
                          hint="Give the folder that holds the DICOM files, or an image file.")
    if dicom:
        return InputError(f"'{folder}' holds no readable DICOM series: its {len(dicom)} DICOM file(s) ({some(dicom)}) "
                          "are not images ITK can stack into a series (a DICOMDIR, reports, or damaged files?).",
                          hint="Give one of the files itself, or the folder of the image series.")
    held = [f"{len(files)} other file(s): {some([e.name for e in files])}"] * bool(files) + \
        [f"folder(s) {some(folders)}"] * bool(folders)
    return InputError(f"'{folder}' holds no readable DICOM series: it has no DICOM files, only {' and '.join(held)}.",
                      hint=("Give the subfolder that holds the DICOM files." if folders and not files else
                            "Give one of those files as the input, or the folder of a DICOM series."))
