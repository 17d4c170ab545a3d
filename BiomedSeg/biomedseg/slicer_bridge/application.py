"""What only the running Slicer application offers the panel: its Python, its terminology lists,
its startup environment, translations, its widgets' flags, the Segment Editor and the PyTorch
extension's installer.

These need ``slicer.app`` / ``slicer.modules`` (not in slicer-core), so they are called from the
module file only; each one degrades to "not available" when Slicer lacks the feature.
"""
from __future__ import annotations

import os

from .segmentations import terminology_from_tag

#: Slicer's terminology lists, searched in this order for a target's standard name and colour.
TERMINOLOGY_CONTEXTS = ["Segmentation category and type - 3D Slicer General Anatomy list",
                        "Segmentation category and type - DICOM master list"]


def translate(text: str) -> str:
    """Slicer's translation of a user-visible text (Slicer 5.4 and later; the text itself before)."""
    try:
        from slicer.i18n import tr
        return tr(text)
    except ImportError:
        return text


def ctk_path_filters(*names: str) -> int:
    """ctkPathLineEdit filter flags by name ('Files', 'Dirs', 'Executable', 'Readable')."""
    import ctk

    value = 0
    for name in names:
        value |= getattr(ctk.ctkPathLineEdit, name)
    return value


def slicer_python() -> str:
    """Slicer's own Python launcher (the worker's default interpreter), or '' when it is not there."""
    import slicer

    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    path = os.path.join(slicer.app.slicerHome, "bin", name)
    return path if os.path.exists(path) else ""


def startup_environment() -> dict | None:
    """Slicer's environment before its launcher changed it (for a Python other than Slicer's)."""
    import slicer

    startup = getattr(slicer.util, "startupEnvironment", None)
    return startup() if startup else None


def slicer_terminology(name: str):
    """(terminology, rgb 0..1) of a target from Slicer's own terminology lists, or None.

    Slicer's lists know its standard colours; targets they do not know keep the catalogue's
    entry (set by the engine). A sided target ('left kidney') takes the side's own colour.
    """
    import slicer

    try:
        logic = slicer.modules.terminologies.logic()
        entry = slicer.vtkSlicerTerminologyEntry()
        for context in TERMINOLOGY_CONTEXTS:
            if logic.FindTypeInTerminologyBy3dSlicerLabel(context, name, entry):
                colour_source = entry.GetTypeObject()
                modifier = entry.GetTypeModifierObject()
                if modifier is not None and modifier.GetCodeValue():
                    colour_source = modifier
                terminology = terminology_from_tag(logic.SerializeTerminologyEntry(entry))
                if terminology:
                    return terminology, tuple(c / 255.0 for c in colour_source.GetRecommendedDisplayRGBValue())
    except Exception:  # an older Slicer without these calls: the catalogue's entry is used
        return None
    return None


def has_pytorch_extension() -> bool:
    try:
        import PyTorchUtils  # noqa: F401
        return True
    except ImportError:
        return False


def install_torch_with_extension() -> tuple[bool, str]:
    """PyTorch through the PyTorch extension's installer (it picks the CUDA build for this GPU)."""
    try:
        import PyTorchUtils

        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=">=2.1")
        return torch is not None, "" if torch is not None else "The PyTorch extension did not install torch."
    except Exception as exc:
        return False, f"The PyTorch extension could not install torch ({exc})."


def open_in_segment_editor(segmentation_node, volume_node) -> None:
    """Switch to the Segment Editor on ``segmentation_node`` with ``volume_node`` as its source."""
    import slicer

    slicer.util.selectModule("SegmentEditor")
    editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
    editor.setSegmentationNode(segmentation_node)
    set_source = getattr(editor, "setSourceVolumeNode", None) or getattr(editor, "setMasterVolumeNode")
    set_source(volume_node)


def reset_3d_view() -> None:
    import slicer

    layout = slicer.app.layoutManager()
    if layout is not None and layout.threeDViewCount > 0:
        layout.threeDWidget(0).threeDView().resetFocalPoint()
