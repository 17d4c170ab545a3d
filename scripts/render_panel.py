#!/usr/bin/env python
"""Render the BiomedSeg panel (Resources/UI/BiomedSeg.ui) offscreen to a PNG, without Slicer.

The .ui is loaded with PySide6 and stand-ins for Slicer's qMRML/ctk widgets
(Testing/qt_standins.py); the widgets are filled the way BiomedSeg.py fills them, from the
engine's own panel logic (model list with states, guessed modality and site, catalogue
suggestions, progress text of a running job, the previous result), so the picture shows
what the module shows in Slicer while deepbet runs on the MRHead sample.

    QT_QPA_PLATFORM=offscreen python scripts/render_panel.py [OUT.png]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Testing"))
sys.path.insert(0, str(ROOT / "BiomedSeg"))

DEFAULT_OUT = ROOT / "Resources" / "Screenshots" / "panel.png"


def fill(panel) -> None:
    """Put the panel in the state of a running deepbet job on MRHead, with one earlier result."""
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QStandardItemModel
    from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QLabel, QLineEdit, QListWidget,
                                   QListWidgetItem, QProgressBar, QPushButton, QSpinBox)

    from biomedseg import panel_logic as pl
    from qt_standins import ctkCollapsibleButton, ctkPathLineEdit, qMRMLNodeComboBox

    def find(cls, name):
        widget = panel.findChild(cls, name)
        if widget is None:
            raise LookupError(f"{name} ({cls.__name__}) is not in the .ui")
        return widget

    find(qMRMLNodeComboBox, "inputVolumeSelector").setNodeNames(["MRHead", "CTChest"], "MRHead")
    find(qMRMLNodeComboBox, "roiSelector").setNodeNames(["R"], "Whole volume")
    find(qMRMLNodeComboBox, "outputSegmentationSelector").setNodeNames(["MRHead deepbet"], "MRHead deepbet")

    # Models and their state, exactly as the module lists them (disabled ones greyed out).
    states = {"deepbet": {"ready": True, "state": "ready", "detail": "shipped inside the 'deepbet' package"}}
    choices = pl.model_choices("auto", {**{c.id: pl.get_model(c.id).state() for c in pl.model_choices("auto")},
                                        **states})
    models = find(QComboBox, "modelComboBox")
    for choice in choices:
        models.addItem(choice.label, choice.id)
        models.setItemData(models.count() - 1, choice.tooltip, Qt.ToolTipRole)
    item_model = models.model()
    if isinstance(item_model, QStandardItemModel):
        for row, choice in enumerate(choices):
            item_model.item(row).setEnabled(choice.enabled)
    models.setCurrentIndex(0)
    deepbet = choices[0]
    find(QLabel, "modelStateLabel").setText(f"\u2714 {deepbet.state}: {deepbet.detail}")
    find(QPushButton, "modelActionButton").setVisible(deepbet.action is not None)

    # Modality and site guessed from the sample's intensities and size (MRHead: 256 x 256 x 130, 1 x 1 x 1.3 mm).
    import numpy as np

    from biomedseg.volume import Volume

    rng = np.random.default_rng(0)
    head = Volume(rng.integers(0, 300, (130, 256, 256), dtype=np.int16), np.diag([1.0, 1.0, 1.3, 1.0]), name="MRHead")
    guess = pl.guess_modality_site(head)
    modality = find(QComboBox, "modalityComboBox")
    modality.addItems(pl.modalities_for("deepbet"))
    modality.setCurrentText(pl.match_modality(guess.modality, pl.modalities_for("deepbet")))
    site = find(QComboBox, "siteComboBox")
    site.addItems(pl.sites_for("deepbet", modality.currentText()))
    site.setCurrentText(pl.match_site(guess.site, pl.sites_for("deepbet", modality.currentText())))
    find(QLabel, "guessLabel").setText(guess.reason)
    find(QLineEdit, "promptsLineEdit").setText("brain")
    suggestions = find(QListWidget, "suggestionsListWidget")
    for target in pl.suggestions("deepbet", modality.currentText(), site.currentText()):
        item = QListWidgetItem(target)
        item.setCheckState(Qt.Checked)
        suggestions.addItem(item)
    find(QSpinBox, "sliceFirstSpinBox").setRange(0, 129)
    find(QSpinBox, "sliceLastSpinBox").setRange(0, 129)
    find(QSpinBox, "sliceLastSpinBox").setValue(129)

    # Advanced options: the parameter node's choices.
    for name, values, current in (("sliceAxisComboBox", pl.SLICE_AXES, "axial"),
                                  ("postprocessComboBox", list(pl.POSTPROCESS), "model default"),
                                  ("writeModeComboBox", list(pl.WRITE_MODES), "add as new segments"),
                                  ("deviceComboBox", pl.DEVICES, "auto")):
        combo = find(QComboBox, name)
        combo.addItems(values)
        combo.setCurrentText(current)
    find(QDoubleSpinBox, "thresholdSpinBox").setValue(0.5)
    find(ctkPathLineEdit, "workerPythonPathLineEdit").currentPath = ""
    find(ctkCollapsibleButton, "advancedCollapsibleButton").collapsed = False  # shown open for the picture

    # A running job: the progress text the controller gives for deepbet's third stage.
    job = SimpleNamespace(state="running", stage="segmenting brain", done=2, total=4, eta=3.2, elapsed=3.1,
                          cancel_requested_at=None, submitted_at=time.monotonic() - 3.1)
    progress = pl.describe_progress(job)
    find(QPushButton, "segmentButton").setEnabled(False)
    find(QPushButton, "cancelButton").setEnabled(True)
    bar = find(QProgressBar, "progressBar")
    bar.setRange(0, 100)
    bar.setValue(progress.percent)
    find(QLabel, "statusLabel").setText(progress.text)
    find(QLabel, "messageLabel").setVisible(False)
    find(QPushButton, "messageActionButton").setVisible(False)

    # The earlier run's result (deepbet on MRHead), with Undo, Edit and Export available.
    earlier = pl.RunOutcome("done", names=["brain"], absent=[], seconds=7.7, device="cpu",
                            volumes_ml={"brain": 1436.2})
    find(QLabel, "resultLabel").setText(earlier.summary)
    find(QLabel, "absentLabel").setVisible(False)
    find(QCheckBox, "show3DCheckBox").setChecked(True)
    for name in ("undoButton", "editButton"):
        find(QPushButton, name).setEnabled(True)
    formats = find(QComboBox, "exportFormatComboBox")
    for suffix, label in pl.EXPORT_FORMATS.items():
        if suffix != ".dcm":  # MRHead is not DICOM: no DICOM SEG
            formats.addItem(label, suffix)
    for name in ("exportFileButton", "exportLabelmapButton"):
        find(QPushButton, name).setEnabled(True)


def render(out: Path = DEFAULT_OUT, width: int = 430) -> Path:
    from qt_standins import application, load_ui

    app = application()
    panel, error = load_ui()
    if panel is None:
        raise RuntimeError(f"the .ui does not load: {error}")
    fill(panel)
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
