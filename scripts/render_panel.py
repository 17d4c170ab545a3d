#!/usr/bin/env python
"""Render the BiomedSeg panel (Resources/UI/BiomedSeg.ui) offscreen to a PNG, without Slicer.

The .ui is loaded with PySide6 and stand-ins for Slicer's qMRML/ctk widgets
(Testing/qt_standins.py). What the widgets show comes from a real run, driven the way
BiomedSeg.py drives it: Colin27 (a real T1, Debian's mricron-data) in a real MRML scene
(slicer-core), the engine's guess of modality and site, the catalogue's model states and
suggestions, one deepbet run through the worker (its result line), then a second run caught
mid-way (its progress text and time left). Buttons follow ``biomedseg.panel.button_states``, the
rules the module uses (busy: only Cancel). Slicer's own views and styling are not shown.

    QT_QPA_PLATFORM=offscreen python scripts/render_panel.py [OUT.png]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Testing"))
sys.path.insert(0, str(ROOT / "BiomedSeg"))

DEFAULT_OUT = ROOT / "Resources" / "Screenshots" / "panel.png"
COLIN = Path("/usr/share/mricron/templates/ch2.nii.gz")


def capture_run(image: Path = COLIN) -> dict:
    """Run deepbet on ``image`` through the worker like the panel does; return what the panel showed."""
    from conftest import mrml_scene

    from biomedseg import slicer_bridge as sb
    from biomedseg.io import read_volume
    from biomedseg.panel import PanelController, button_states, state_for_guess

    with mrml_scene() as scene:
        volume = read_volume(image)
        node = sb.node_from_volume(scene, volume, volume.name)
        controller = PanelController(scene)
        try:
            info = controller.describe_volume(node)
            state = state_for_guess("deepbet", ["brain"], info["guess"])
            controller.start(state, node)
            first = controller.wait(timeout=600)
            if first.state != "done":
                raise RuntimeError(f"the first run did not finish: {first.summary}")
            state.write_mode = "overwrite segments of the same name"
            controller.start(state, node)
            progress = None
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                result = controller.poll()
                if result.finished:
                    raise RuntimeError("the second run ended before it could be caught mid-way")
                if result.progress.percent and "left" in result.progress.text:
                    progress = result.progress
                    break
                time.sleep(0.01)
            buttons = button_states(busy=controller.running, can_run=True, can_undo=controller.can_undo,
                                    has_result=bool(first.names))
            controller.cancel()
            controller.wait(timeout=60)
        finally:
            controller.close()
    return {"name": volume.name, "slices": info["slices"], "guess": info["guess"], "state": state,
            "first": first, "progress": progress, "buttons": buttons,
            "segmentation": f"{volume.name} deepbet", "dicom": info["dicom"]}


def fill(panel, run: dict) -> None:
    """Put the widgets in the state ``capture_run`` recorded, the way BiomedSeg.py fills them."""
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QStandardItemModel
    from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QLabel, QLineEdit, QListWidget,
                                   QListWidgetItem, QProgressBar, QPushButton, QSpinBox)

    from biomedseg.catalog import get_model
    from biomedseg.panel import (DEVICES, EXPORT_FORMATS, POSTPROCESS, SLICE_AXES, WRITE_MODES, modalities_for,
                                 model_choices, sites_for)
    from biomedseg.panel import suggestions as suggested_prompts
    from qt_standins import ctkCollapsibleButton, ctkPathLineEdit, qMRMLNodeComboBox

    def find(cls, name):
        widget = panel.findChild(cls, name)
        if widget is None:
            raise LookupError(f"{name} ({cls.__name__}) is not in the .ui")
        return widget

    state = run["state"]
    find(qMRMLNodeComboBox, "inputVolumeSelector").setNodeNames([run["name"]], run["name"])
    find(qMRMLNodeComboBox, "roiSelector").setNodeNames(["R"], "Whole volume")
    find(qMRMLNodeComboBox, "outputSegmentationSelector").setNodeNames([run["segmentation"]], run["segmentation"])

    # Models and their state on this machine, as the module lists them (disabled ones greyed out).
    choices = model_choices("auto", {c.id: get_model(c.id).state() for c in model_choices("auto")})
    models = find(QComboBox, "modelComboBox")
    for choice in choices:
        models.addItem(choice.label, choice.id)
        models.setItemData(models.count() - 1, choice.tooltip, Qt.ToolTipRole)
    item_model = models.model()
    if isinstance(item_model, QStandardItemModel):
        for row, choice in enumerate(choices):
            item_model.item(row).setEnabled(choice.enabled)
    current = next(c for c in choices if c.id == state.model)
    models.setCurrentIndex(choices.index(current))
    find(QLabel, "modelStateLabel").setText(current.status_line)
    find(QPushButton, "modelActionButton").setVisible(current.action is not None)
    for name, cls in (("promptMarkupsLabel", QLabel), ("promptMarkupsSelector", qMRMLNodeComboBox)):
        find(cls, name).setVisible(current.takes_markups)  # the Box / points row: only for box or point models

    modality = find(QComboBox, "modalityComboBox")
    modality.addItems(modalities_for(state.model))
    modality.setCurrentText(state.modality)
    site = find(QComboBox, "siteComboBox")
    site.addItems(sites_for(state.model, state.modality))
    site.setCurrentText(state.site)
    find(QLabel, "guessLabel").setText(run["guess"].reason)
    find(QLineEdit, "promptsLineEdit").setText(", ".join(state.prompts))
    suggestions = find(QListWidget, "suggestionsListWidget")
    for target in suggested_prompts(state.model, state.modality, state.site):
        item = QListWidgetItem(target)
        item.setCheckState(Qt.Checked if target in state.prompts else Qt.Unchecked)
        suggestions.addItem(item)
    last = run["slices"][state.slice_axis] - 1
    for name in ("sliceFirstSpinBox", "sliceLastSpinBox"):
        find(QSpinBox, name).setRange(0, last)
    find(QSpinBox, "sliceLastSpinBox").setValue(last)

    # Advanced options: the parameter node's choices.
    for name, values, value in (("sliceAxisComboBox", SLICE_AXES, state.slice_axis),
                                ("postprocessComboBox", list(POSTPROCESS), state.postprocess),
                                ("writeModeComboBox", list(WRITE_MODES), state.write_mode),
                                ("deviceComboBox", DEVICES, state.device)):
        combo = find(QComboBox, name)
        combo.addItems(values)
        combo.setCurrentText(value)
    find(QDoubleSpinBox, "thresholdSpinBox").setValue(state.threshold)
    find(ctkPathLineEdit, "workerPythonPathLineEdit").currentPath = state.worker_python
    find(ctkCollapsibleButton, "advancedCollapsibleButton").collapsed = False  # shown open for the picture

    # The second run, caught mid-way, and the first run's result.
    progress = run["progress"]
    bar = find(QProgressBar, "progressBar")
    bar.setRange(0, 100)
    bar.setValue(progress.percent if progress else 0)
    find(QLabel, "statusLabel").setText(progress.text if progress else "")
    find(QLabel, "messageLabel").setVisible(False)
    find(QPushButton, "messageActionButton").setVisible(False)
    find(QLabel, "resultLabel").setText(run["first"].summary)
    find(QLabel, "absentLabel").setVisible(bool(run["first"].absent))
    find(QCheckBox, "show3DCheckBox").setChecked(state.show_3d)
    formats = find(QComboBox, "exportFormatComboBox")
    for suffix, label in EXPORT_FORMATS.items():
        if suffix != ".dcm" or run["dicom"]:  # DICOM SEG only for DICOM sources
            formats.addItem(label, suffix)
    for name, enabled in run["buttons"].items():
        find(QPushButton, name).setEnabled(enabled)


def render(out: Path = DEFAULT_OUT, width: int = 430, run: dict | None = None) -> Path:
    from qt_standins import application, load_ui

    app = application()
    panel, error = load_ui()
    if panel is None:
        raise RuntimeError(f"the .ui does not load: {error}")
    fill(panel, run if run is not None else capture_run())
    panel.resize(width, 100)
    panel.adjustSize()
    panel.resize(width, panel.sizeHint().height())
    panel.show()
    app.processEvents()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not panel.grab().save(str(out)):
        raise RuntimeError(f"could not write {out}")
    panel.close()
    return out


if __name__ == "__main__":
    print(render(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT))
