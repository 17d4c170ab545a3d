#!/usr/bin/env python
"""Render the panel's Correct section offscreen to a PNG, from a real correction run, without Slicer.

The .ui is loaded with PySide6 and the stand-ins for Slicer's widgets (Testing/qt_standins.py). What
the section shows comes from a real run driven the way BiomedSegLib/correct.py drives it: the
interactive toy model (Testing/toy_models/click_session, registered as a site model) in a real
worker, a real MRML scene (slicer-core) with the correction phantom (Testing/correction_cases.py),
a box on slice 15 propagated over slices 5-24, then an exclude click on the leak (slice 20) in the
same worker session. The status line is that correction's outcome, the hint is what the next
include click on the missed part will do, the rules line is the Segment Editor's settings in that
scene, and the buttons follow the controller's state. Slicer's own views and styling are not shown.

    QT_QPA_PLATFORM=offscreen python scripts/render_correct.py [OUT.png] [--medsam2-weights CKPT]

With ``--medsam2-weights`` the run is MedSAM2's (the README's picture: a checkpoint of the
deterministic parity weights, written by ``bench/medsam2.py --write-checkpoint``, so the figures are
a real run's but the mask is not a trained model's).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Testing"))
sys.path.insert(0, str(ROOT / "BiomedSeg"))

DEFAULT_OUT = ROOT / "Resources" / "Screenshots" / "correct_section.png"


def capture_correction(name: str = "organ", weights: str | None = None) -> dict:
    """Propagate a box, then correct it with one exclude click, through the worker as the panel does.
    With ``weights`` (a MedSAM2 checkpoint) the model is MedSAM2 itself instead of the toy."""
    from correction_cases import LEAK, MISSED, MODEL, RANGE, TOY_MODELS, click, phantom, ras, roi
    from conftest import mrml_scene, registered_models

    from biomedseg import slicer_bridge as sb
    from biomedseg.panel import CorrectionController, PanelController, PanelState

    with registered_models(TOY_MODELS):
        with mrml_scene() as scene:
            volume = phantom()
            node = sb.node_from_volume(scene, volume, volume.name)
            panel = PanelController(scene)
            corrections = CorrectionController(panel)
            state = PanelState(model="medsam2" if weights else MODEL, prompts=[], show_3d=False,
                               weights=weights or "")
            try:
                corrections.begin(state, node, name=name, slice_range=RANGE)
                corrections.add_box(roi(scene, volume))
                corrections.propagate(state)
                first = panel.wait(timeout=300)
                if first.state != "done":
                    raise RuntimeError(f"the propagation did not finish: {first.summary}")
                points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "exclude")
                corrections.add_point(points, click(points, volume, *LEAK), include=False)
                corrections.update(state)
                second = panel.wait(timeout=300)
                if second.state != "done" or second.image_sent:
                    raise RuntimeError(f"the correction did not run in the session: {second.summary}")
                corrections.set_tool("include")
                hint = corrections.hint(ras(volume, *MISSED))
                session = corrections.current
                segments = [s["name"] for s in sb.segments_of(session.segmentation_node)]
                rules = sb.describe_rules(sb.editor_rules(scene), session.segmentation_node)
                can_undo = corrections.can_undo
            finally:
                panel.close()
    return {"first": first, "second": second, "hint": hint, "segments": segments, "segment": session.name,
            "range": RANGE, "slices": volume.shape[0], "rules": rules, "tool": "include", "can_undo": can_undo}


def fill(panel, run: dict) -> None:
    """Put the Correct section's widgets in the state ``capture_correction`` recorded, as BiomedSegLib/correct.py does."""
    from PySide6.QtWidgets import QComboBox, QLabel, QPushButton, QSpinBox

    def find(cls, name):
        widget = panel.findChild(cls, name)
        if widget is None:
            raise LookupError(f"{name} ({cls.__name__}) is not in the .ui")
        return widget

    combo = find(QComboBox, "correctSegmentComboBox")
    combo.addItem("New segment", "")
    for segment in run["segments"]:
        combo.addItem(segment, segment)
    combo.setCurrentText(run["segment"])
    for spin, value in (("correctFirstSpinBox", run["range"][0]), ("correctLastSpinBox", run["range"][1])):
        find(QSpinBox, spin).setRange(0, run["slices"] - 1)
        find(QSpinBox, spin).setValue(value)
    for tool, name in (("box", "boxToolButton"), ("include", "includeToolButton"), ("exclude", "excludeToolButton")):
        find(QPushButton, name).setChecked(tool == run["tool"])
    find(QPushButton, "correctUndoButton").setEnabled(run["can_undo"])
    find(QPushButton, "clearPromptsButton").setEnabled(True)
    find(QLabel, "nextClickLabel").setText(run["hint"])
    find(QLabel, "correctRulesLabel").setText(run["rules"])
    find(QLabel, "correctStatusLabel").setText(run["second"].summary)


def render(out: Path = DEFAULT_OUT, width: int = 430, run: dict | None = None, weights: str | None = None) -> Path:
    from qt_standins import application, ctkCollapsibleButton, load_ui

    app = application()
    panel, error = load_ui()
    if panel is None:
        raise RuntimeError(f"the .ui does not load: {error}")
    fill(panel, run if run is not None else capture_correction(weights=weights))
    panel.resize(width, 100)
    panel.adjustSize()
    panel.resize(width, panel.sizeHint().height())
    panel.show()
    app.processEvents()
    section = panel.findChild(ctkCollapsibleButton, "correctCollapsibleButton")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not section.grab().save(str(out)):
        raise RuntimeError(f"could not write {out}")
    panel.close()
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Render the Correct section from a real run.")
    parser.add_argument("out", nargs="?", default=str(DEFAULT_OUT))
    parser.add_argument("--medsam2-weights", help="run MedSAM2 with this checkpoint instead of the toy model")
    args = parser.parse_args()
    print(render(Path(args.out), weights=args.medsam2_weights))
