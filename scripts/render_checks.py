#!/usr/bin/env python
"""Render what the panel says before anything runs, offscreen, to one PNG (no Slicer, no model run).

Two panels side by side, both on slicerio's CTChest4 (a real chest CT) in a real MRML scene:
left, deepbet chosen and Segment pressed: the modality guard's refusal with *Use anyway*
(``panel.build_request`` -> ``panel.describe_error``); right, BiomedParse v1 with the prompts
"liver, livr, left lung" typed: the live prompt check (``panel.prompt_notes``). The sentences
and the button come from the engine's own functions; the widgets are filled the way
BiomedSeg.py fills them (``scripts/render_panel.py``).

    QT_QPA_PLATFORM=offscreen python scripts/render_checks.py [OUT.png]
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Testing"))
sys.path.insert(0, str(ROOT / "BiomedSeg"))
sys.path.insert(0, str(ROOT / "scripts"))

DEFAULT_OUT = ROOT / "Resources" / "Screenshots" / "checks.png"
PROMPTS = "liver, livr, left lung"


def chest_ct() -> Path:
    import slicerio

    return Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd"


def capture() -> list[dict]:
    """The two states, each as ``render_panel.fill`` takes it, plus what the checks said."""
    from conftest import mrml_scene

    from biomedseg import slicer_bridge as sb
    from biomedseg.errors import BiomedSegError
    from biomedseg.io import read_volume
    from biomedseg.panel import (PanelController, RunOutcome, button_states, describe_error, notes_line,
                                 prompt_notes, state_for_guess)
    from biomedseg.panel.request import build_request

    volume = read_volume(chest_ct())
    with mrml_scene() as scene:
        node = sb.node_from_volume(scene, volume, volume.name)
        controller = PanelController(scene)
        info = controller.describe_volume(node)
        controller.close()
    runs = []
    deepbet = state_for_guess("deepbet", ["brain"], info["guess"])
    try:
        build_request(deepbet, volume)
        raise RuntimeError("deepbet on a chest CT was not refused")
    except BiomedSegError as exc:
        message = describe_error(exc)
    parse = state_for_guess("biomedparse-v1", [p.strip() for p in PROMPTS.split(",")], info["guess"])
    notes = prompt_notes("biomedparse-v1", PROMPTS, parse.modality)
    idle = button_states(busy=False, can_run=True, can_undo=False, has_result=False)
    for state, extra in ((deepbet, {"message": message}), (parse, {"notes": notes_line(notes), "notes_ok": False})):
        runs.append({"name": volume.name, "slices": info["slices"], "guess": info["guess"], "state": state,
                     "first": RunOutcome("failed"), "progress": None, "segmentation": f"{volume.name} segments",
                     "dicom": info["dicom"], "buttons": {**idle, "segmentButton": "message" not in extra and False},
                     **extra})
    return runs


def fill_checks(panel, run: dict) -> None:
    from PySide6.QtWidgets import QCheckBox, QLabel, QPushButton

    from biomedseg.panel import ACTION_LABELS
    from render_panel import fill

    fill(panel, run)
    panel.findChild(QLabel, "resultLabel").setText("")
    check = panel.findChild(QLabel, "promptCheckLabel")
    check.setText(run.get("notes", ""))
    check.setVisible(bool(run.get("notes")))
    check.setStyleSheet("color: #b00020;")  # BiomedSegLib/prompt_checks.py: red, Segment refuses
    panel.findChild(QCheckBox, "freeTextCheckBox").setVisible(run["state"].model == "biomedparse-v1")
    message = run.get("message")
    label, button = panel.findChild(QLabel, "messageLabel"), panel.findChild(QPushButton, "messageActionButton")
    label.setVisible(message is not None)
    button.setVisible(message is not None)
    if message is not None:
        label.setText(message.text)
        label.setWordWrap(True)
        button.setText(ACTION_LABELS[message.action])


def render(out: Path = DEFAULT_OUT, width: int = 430) -> Path:
    from PIL import Image

    from qt_standins import application, load_ui

    app = application()
    images = []
    for index, run in enumerate(capture()):
        panel, error = load_ui()
        if panel is None:
            raise RuntimeError(f"the .ui does not load: {error}")
        fill_checks(panel, run)
        panel.resize(width, 100)
        panel.adjustSize()
        panel.resize(width, panel.sizeHint().height())
        panel.show()
        app.processEvents()
        path = Path(out).with_suffix(f".{index}.png")
        if not panel.grab().save(str(path)):
            raise RuntimeError(f"could not write {path}")
        panel.close()
        images.append(Image.open(path).convert("RGB"))
        os.remove(path)
    canvas = Image.new("RGB", (sum(i.width for i in images) + 10, max(i.height for i in images)), (255, 255, 255))
    canvas.paste(images[0], (0, 0))
    canvas.paste(images[1], (images[0].width + 10, 0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


if __name__ == "__main__":
    print(render(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT))
