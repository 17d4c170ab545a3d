"""The Slicer panel's .ui against the code that uses it, with PySide6 offscreen (no Slicer).

- the .ui loads with QUiLoader and stand-ins for Slicer's qMRML/ctk widgets;
- every ``self.ui.<name>`` that BiomedSeg.py uses exists in the .ui with a class that
  has the methods and signals the code relies on (by name: *Button, *ComboBox, *Selector...);
- every widget tagged with SlicerParameterName names a field of the parameter node, with a
  widget class Slicer's parameterNodeWrapper can connect to that field's type, and every
  Choice default is one of its choices;
- node selectors accept the node class the parameter node declares;
- signal handlers named in connect() calls exist;
- scripts/render_panel.py renders the panel to a PNG.
"""
from __future__ import annotations

import ast
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
try:
    import PySide6.QtUiTools  # noqa: F401
except ImportError:
    if os.environ.get("CI"):
        raise  # CI installs the test extras, PySide6-Essentials among them
    pytest.skip("PySide6 is not installed (pip install PySide6-Essentials)", allow_module_level=True)

from qt_standins import UI_FILE, load_ui  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "BiomedSeg" / "BiomedSeg.py"

#: Name endings -> .ui classes a widget with that name may have.
CLASS_BY_SUFFIX = {
    "CollapsibleButton": {"ctkCollapsibleButton"},
    "Button": {"QPushButton", "QToolButton"},
    "ComboBox": {"QComboBox"},
    "Selector": {"qMRMLNodeComboBox"},
    "Label": {"QLabel"},
    "SpinBox": {"QSpinBox", "QDoubleSpinBox"},
    "CheckBox": {"QCheckBox"},
    "PathLineEdit": {"ctkPathLineEdit"},
    "LineEdit": {"QLineEdit"},
    "ListWidget": {"QListWidget"},
    "ProgressBar": {"QProgressBar"},
    "progressBar": {"QProgressBar"},
}


@pytest.fixture(scope="module")
def ui_classes() -> dict[str, str]:
    """objectName -> class as the .ui declares it (for every widget)."""
    tree = ET.parse(UI_FILE)
    names = {}
    for w in tree.iter("widget"):
        assert w.get("name") not in names, f"widget name {w.get('name')} is used twice in the .ui"
        names[w.get("name")] = w.get("class")
    return names


@pytest.fixture(scope="module")
def module_tree() -> ast.Module:
    """BiomedSeg.py and its Slicer-side helpers (BiomedSegLib/, e.g. the widget's install mixin) as one tree."""
    trees = [ast.parse(path.read_text()) for path in [MODULE, *sorted((MODULE.parent / "BiomedSegLib").glob("*.py"))]]
    return ast.Module(body=[node for tree in trees for node in tree.body], type_ignores=[])


@pytest.fixture(scope="module")
def panel():
    widget, error = load_ui()
    assert widget is not None and not error, error
    yield widget
    widget.deleteLater()


def used_ui_names(tree: ast.Module) -> set[str]:
    """Every X in ``self.ui.X`` in BiomedSeg.py."""
    out = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            out.add(node.attr)
    return out


def parameter_fields(tree: ast.Module) -> dict[str, ast.AnnAssign]:
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "BiomedSegParameterNode")
    assert any(isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in cls.decorator_list)
    return {n.target.id: n for n in cls.body if isinstance(n, ast.AnnAssign)}


class _Annotated:
    def __class_getitem__(cls, items):
        return ("Annotated", items[0], items[1:])


def evaluate_annotation(node: ast.AnnAssign):
    """(base type name, choices or None, range or None) of a parameter node field."""
    sys.path.insert(0, str(ROOT / "BiomedSeg"))
    from biomedseg import panel

    namespace = {"Annotated": _Annotated, "panel": panel, "str": "str", "int": "int", "float": "float",
                 "bool": "bool", "Choice": lambda c: ("Choice", list(c)), "WithinRange": lambda a, b: ("Range", a, b)}
    source = ast.unparse(node.annotation)
    if source.startswith("vtkMRML"):
        return source, None, None
    value = eval(source, namespace)  # our own module's annotation, with stand-ins for Slicer's helpers
    if isinstance(value, str):
        return value, None, None
    _, base, extras = value
    choices = next((e[1] for e in extras if e[0] == "Choice"), None)
    bounds = next((e[1:] for e in extras if e[0] == "Range"), None)
    return base, choices, bounds


def test_ui_loads_offscreen_with_standins(panel):
    from PySide6.QtWidgets import QWidget

    assert panel.objectName() == "BiomedSeg"
    assert len(panel.findChildren(QWidget)) > 50


def test_every_widget_the_module_uses_exists_with_a_sensible_class(module_tree, ui_classes, panel):
    from PySide6.QtWidgets import QWidget

    used = used_ui_names(module_tree)
    assert len(used) > 30, used
    missing = sorted(n for n in used if n not in ui_classes)
    assert not missing, f"BiomedSeg.py uses widgets the .ui lacks: {missing}"
    for name in sorted(used):
        suffix = next((s for s in sorted(CLASS_BY_SUFFIX, key=len, reverse=True) if name.endswith(s)), None)
        assert suffix is not None, f"{name}: name does not say what kind of widget it is"
        assert ui_classes[name] in CLASS_BY_SUFFIX[suffix], f"{name} is a {ui_classes[name]}"
        assert panel.findChild(QWidget, name) is not None, f"{name} was not created by QUiLoader"


def test_buttons_switched_by_name_are_push_buttons_in_the_ui(ui_classes):
    """updateButtons sets ``getattr(self.ui, name).enabled`` for every name button_states returns."""
    from biomedseg.panel.messages import button_states

    names = button_states(busy=False, can_run=True, can_undo=True, has_result=True)
    assert names and all(ui_classes.get(n) == "QPushButton" for n in names), {n: ui_classes.get(n) for n in names}


def test_methods_called_on_widgets_exist_on_their_qt_classes(module_tree, ui_classes):
    """``self.ui.x.method(...)`` calls name methods the real Qt class has (stand-ins checked for ctk/qMRML)."""
    from PySide6 import QtWidgets

    import qt_standins

    slicer_only = {"qMRMLNodeComboBox": {"setMRMLScene", "currentNode", "setCurrentNode"},
                   "ctkPathLineEdit": {"currentPath", "filters"}}
    for node in ast.walk(module_tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        target = node.func.value
        if not (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Attribute)
                and target.value.attr == "ui"):
            continue
        name, method = target.attr, node.func.attr
        cls_name = ui_classes[name]
        if method == "connect":
            continue
        cls = getattr(QtWidgets, cls_name, None) or getattr(qt_standins, cls_name)
        assert hasattr(cls, method) or method in slicer_only.get(cls_name, ()), f"{name}.{method}() on {cls_name}"


def test_properties_set_on_widgets_are_qt_properties(module_tree, ui_classes):
    """``self.ui.x.prop = value`` must name a real Qt property: in Slicer (PythonQt) a wrong name
    would silently become a plain Python attribute and change nothing on screen."""
    from PySide6 import QtWidgets

    import qt_standins

    slicer_only = {"ctkPathLineEdit": {"filters"}}
    assigned = 0
    for node in ast.walk(module_tree):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            if not (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Attribute)
                    and isinstance(target.value.value, ast.Attribute) and target.value.value.attr == "ui"):
                continue
            name, prop = target.value.attr, target.attr
            cls_name = ui_classes[name]
            cls = getattr(QtWidgets, cls_name, None) or getattr(qt_standins, cls_name)
            assigned += 1
            assert cls.staticMetaObject.indexOfProperty(prop) >= 0 or prop in slicer_only.get(cls_name, ()), \
                f"{name}.{prop} is not a property of {cls_name}"
    assert assigned > 20


def test_connected_signals_exist_and_handlers_are_defined(module_tree, ui_classes):
    from PySide6 import QtWidgets

    widget_cls = next(n for n in module_tree.body if isinstance(n, ast.ClassDef) and n.name == "BiomedSegWidget")
    methods = {n.name for n in widget_cls.body if isinstance(n, ast.FunctionDef)}
    for node in ast.walk(widget_cls):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"):
            continue
        target = node.func.value
        if not (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Attribute)
                and target.value.attr == "ui"):
            continue
        signal = node.args[0].value.split("(")[0]
        handler = node.args[1]
        cls_name = ui_classes[target.attr]
        if cls_name in ("qMRMLNodeComboBox",):
            assert signal == "currentNodeChanged", signal
        elif cls_name == "ctkPathLineEdit":
            assert signal == "currentPathChanged", signal
        else:
            assert hasattr(getattr(QtWidgets, cls_name), signal), f"{target.attr} has no signal {signal}"
        if isinstance(handler, ast.Attribute) and isinstance(handler.value, ast.Name) and handler.value.id == "self":
            assert handler.attr in methods, f"handler {handler.attr} is not defined"


def test_parameter_node_fields_match_tagged_widgets(module_tree, panel):
    from PySide6.QtWidgets import QWidget

    fields = parameter_fields(module_tree)
    connectable = {"str": {"QLineEdit", "QTextEdit"}, "int": {"QSpinBox", "QSlider"},
                   "float": {"QDoubleSpinBox", "ctkSliderWidget"}, "bool": {"QCheckBox", "QPushButton"}}
    tagged = {}
    for widget in panel.findChildren(QWidget):
        name = widget.property("SlicerParameterName")
        if name:
            assert name not in tagged, f"parameter {name} is tagged on two widgets"
            tagged[name] = widget
    assert {"inputVolume", "prompts", "outputSegmentation", "threshold", "device", "writeMode"} <= set(tagged)
    for name, widget in tagged.items():
        assert name in fields, f"{widget.objectName()} is tagged '{name}', which the parameter node lacks"
        base, choices, bounds = evaluate_annotation(fields[name])
        cls = type(widget).__name__
        if base.startswith("vtkMRML"):
            import slicer

            assert cls == "qMRMLNodeComboBox", (name, cls)
            types = widget.property("nodeTypes")  # the field's class, or classes derived from it
            assert types and all(issubclass(getattr(slicer, t), getattr(slicer, base)) for t in types), (name, types)
        elif choices is not None:
            assert cls == "QComboBox", (name, cls)
        else:
            assert cls in connectable[base], (name, base, cls)
            if cls in ("QSlider", "ctkSliderWidget"):
                assert bounds is not None, f"{name}: sliders need WithinRange"


def test_parameter_defaults_are_valid(module_tree):
    from biomedseg.catalog import default_model_id

    fields = parameter_fields(module_tree)
    for name, node in fields.items():
        base, choices, bounds = evaluate_annotation(node)
        if node.value is None:
            assert base.startswith("vtkMRML"), f"{name} has no default"
            continue
        default = ast.literal_eval(node.value)
        if choices is not None:
            assert default in choices, (name, default, choices)
        if bounds is not None:
            assert bounds[0] <= default <= bounds[1], (name, default, bounds)
    assert ast.literal_eval(fields["model"].value) == default_model_id()


def test_parameter_node_becomes_the_run_request(module_tree):
    """The module's parameter node (its declared fields and defaults, then edited values) turns into
    the PanelState and the worker request the Logic submits."""
    from types import SimpleNamespace

    import numpy as np

    from biomedseg.catalog import default_model_id
    from biomedseg.panel.request import build_request
    from biomedseg.panel.state import state_from_parameters
    from biomedseg.volume import Volume

    fields = parameter_fields(module_tree)
    values = {name: (None if node.value is None else ast.literal_eval(node.value)) for name, node in fields.items()}
    defaults = state_from_parameters(SimpleNamespace(**values))
    assert defaults.model == default_model_id() and defaults.slice_range is None
    assert defaults.threshold == values["threshold"] and defaults.write_mode == values["writeMode"]

    values.update(model="biomedparse-v1", prompts="liver, left kidney", useSliceRange=True, sliceFirst=2, sliceLast=5,
                  threshold=0.3, writeMode="overwrite segments of the same name", device="cpu", sliceAxis="coronal",
                  serverUrl="https://gpu.example:8765", fallbackLocal=True)
    state = state_from_parameters(SimpleNamespace(**values))
    assert (state.server_url, state.fallback_local, state.server_token) == ("https://gpu.example:8765", True, "")
    assert (defaults.server_url, defaults.fallback_local) == ("", False)  # the local worker unless one is named
    assert state.prompts == ["liver", "left kidney"] and state.slice_range == (2, 5)
    assert (state.threshold, state.device, state.slice_axis) == (0.3, "cpu", "coronal")
    unknown = set(vars(SimpleNamespace(**values))) - set(fields)
    assert not unknown, f"the test set fields the parameter node does not declare: {unknown}"
    from biomedseg.geometry import Region, region_box
    from biomedseg.prompts import TextPrompt

    volume = Volume(np.zeros((8, 9, 10), np.int16), np.eye(4))
    request = build_request(state, volume)
    assert request.model == "biomedparse-v1" and request.prompts == [TextPrompt("liver"), TextPrompt("left kidney")]
    assert request.kwargs["device"] == "cpu" and request.kwargs["threshold"] == 0.3
    # the whole volume goes to the worker with its region: coronal slices 2..5 (identity-oriented: j = A)
    assert request.volume is volume and request.region == request.kwargs["region"] == Region("coronal", (2, 5))
    assert region_box(volume, request.region).shape == (8, 4, 10)
    # only the options the model declares are sent: biomedparse-v1 has modality and site, deepbet neither
    values.update(modality="CT", site="abdomen")
    assert build_request(state_from_parameters(SimpleNamespace(**values)), volume).kwargs["options"] == {
        "modality": "CT", "site": "abdomen"}
    values.update(model="deepbet", prompts="brain")
    assert build_request(state_from_parameters(SimpleNamespace(**values)), volume).kwargs["options"] == {}


def test_module_file_keeps_engine_logic_out_of_slicer_imports():
    """BiomedSeg.py stays a view: it never imports torch, and the panel's logic (biomedseg/panel/, the
    panel_logic compatibility module, io/dicom_files.py) never imports Slicer, Qt, VTK, CTK or torch."""
    source = MODULE.read_text()
    assert "import torch" not in source
    engine = ROOT / "BiomedSeg" / "biomedseg"
    files = sorted((engine / "panel").glob("*.py")) + [engine / "panel_logic.py", engine / "io" / "dicom_files.py"]
    assert len(files) >= 9, files
    for path in files:
        tree = ast.parse(path.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree)
                     if isinstance(n, ast.ImportFrom) and n.level == 0}
        assert not imported & {"slicer", "torch", "qt", "vtk", "ctk", "PySide6"}, (path.name, imported)
        assert len(path.read_text().splitlines()) < 600, f"{path.name} has grown past 600 lines"


def test_panel_package_imports_neither_slicer_nor_torch():
    """The panel's logic must load in any Python: nothing in biomedseg.panel imports Slicer, Qt, VTK, CTK or torch."""
    import subprocess

    code = ("import sys, biomedseg.panel, biomedseg.panel_logic;"
            "print(sorted(m for m in ('slicer', 'qt', 'vtk', 'ctk', 'torch', 'PySide6') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT / "BiomedSeg")
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_render_script_writes_the_panel_png(tmp_path, colin_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import render_panel

    run = render_panel.capture_run(colin_path)
    # what the picture shows is a real run: the first result and the second run caught mid-way
    assert run["first"].state == "done" and run["first"].names == ["brain"]
    assert 0 < run["progress"].percent < 100 and "left" in run["progress"].text
    assert run["buttons"]["cancelButton"] and not any(v for k, v in run["buttons"].items() if k != "cancelButton")
    out = render_panel.render(tmp_path / "panel.png", run=run)
    from PySide6.QtGui import QImage

    image = QImage(str(out))
    assert image.width() >= 400 and image.height() >= 700
    colours = {image.pixel(x, y) for x in range(0, image.width(), 7) for y in range(0, image.height(), 7)}
    assert len(colours) > 20  # drawn widgets, not a blank page


CORRECT_WIDGETS = {"correctCollapsibleButton": "ctkCollapsibleButton", "correctSegmentComboBox": "QComboBox",
                   "boxToolButton": "QPushButton", "includeToolButton": "QPushButton",
                   "excludeToolButton": "QPushButton", "propagateButton": "QPushButton",
                   "correctFirstSpinBox": "QSpinBox", "correctLastSpinBox": "QSpinBox", "refineButton": "QPushButton",
                   "correctUndoButton": "QPushButton", "clearPromptsButton": "QPushButton",
                   "nextClickLabel": "QLabel", "correctRulesLabel": "QLabel", "correctStatusLabel": "QLabel"}


def test_correct_section_has_its_tools_and_each_key_is_wired(ui_classes, panel):
    """The Correct section: box / include / exclude place-mode buttons (checkable), Refine, Propagate with a
    slice range, Undo and the 'next click' line; every key of panel.SHORTCUTS reaches a handler."""
    from PySide6.QtWidgets import QPushButton

    from biomedseg.panel import SHORTCUTS

    for name, cls in CORRECT_WIDGETS.items():
        assert ui_classes.get(name) == cls, (name, ui_classes.get(name))
    for name in ("boxToolButton", "includeToolButton", "excludeToolButton"):
        assert panel.findChild(QPushButton, name).isCheckable(), name
    for name, key in (("boxToolButton", "D"), ("includeToolButton", "I"), ("excludeToolButton", "E"),
                      ("propagateButton", "P"), ("refineButton", "M"), ("correctUndoButton", "Z")):
        assert f"({key})" in panel.findChild(QPushButton, name).text(), name  # the button shows its key
    source = (MODULE.parent / "BiomedSegLib" / "correct.py").read_text()
    tree = ast.parse(source)
    handler = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "onCorrectShortcut")
    handled = {c.value for c in ast.walk(handler) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    assert set(SHORTCUTS) - {"box", "include", "exclude"} <= handled and "TOOL_BUTTONS" in ast.unparse(handler)
    assert "qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())" in source
    # keys live while the module is shown: installed on enter (when the section shows), removed on exit
    widget = next(n for n in ast.parse(MODULE.read_text()).body if isinstance(n, ast.ClassDef)
                  and n.name == "BiomedSegWidget")
    methods = {n.name: ast.unparse(n) for n in widget.body if isinstance(n, ast.FunctionDef)}
    assert "self.updateCorrectSection()" in methods["enter"] and "self.removeCorrectShortcuts()" in methods["exit"]
    assert "self.removeCorrectShortcuts()" in methods["cleanup"]


def test_correct_section_shows_for_interactive_models_only(monkeypatch):
    from biomedseg.catalog import load_catalog
    from biomedseg.panel.correction import is_interactive

    monkeypatch.setenv("BIOMEDSEG_EXTRA_MODELS", str(ROOT / "Testing" / "toy_models"))
    load_catalog.cache_clear()
    try:
        assert is_interactive("toy-click-session") and not is_interactive("deepbet")
        assert not is_interactive("no-such-model")
    finally:
        monkeypatch.delenv("BIOMEDSEG_EXTRA_MODELS")
        load_catalog.cache_clear()


def test_render_script_writes_the_correct_section_png_from_a_real_correction(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import render_correct

    run = render_correct.capture_correction()
    # the picture's figures are a real run's: a propagation, then one click in the same worker session
    assert run["first"].action == "propagated" and run["first"].image_sent
    second = run["second"]
    assert second.action == "corrected" and not second.image_sent and second.recomputed == 9
    assert second.summary.startswith("Corrected 'organ': 9 of 20 slices recomputed")
    assert run["hint"] == "Include point on slice 8 (axial): adds to 'organ' and recomputes slices 5-14."
    out = render_correct.render(tmp_path / "correct.png", run=run)
    from PySide6.QtGui import QImage

    image = QImage(str(out))
    assert image.width() >= 380 and image.height() >= 200
    colours = {image.pixel(x, y) for x in range(0, image.width(), 5) for y in range(0, image.height(), 5)}
    assert len(colours) > 20
    assert (ROOT / "Resources" / "Screenshots" / "correct_section.png").exists()  # the README's picture


RECOGNIZE_WIDGETS = {"recognizedLabel": "QLabel", "promptWarningLabel": "QLabel", "findSlicesButton": "QPushButton",
                     "suggestKeySliceButton": "QPushButton"}


def test_biomedclip_widgets_sit_where_they_are_used(ui_classes, panel):
    """The 'Recognised: ...' line under the modality/site guess, Find slices beside the prompt line with the
    orange warning under it, and Suggest key slice beside the Correct section's segment."""
    from PySide6.QtWidgets import QBoxLayout, QLabel, QPushButton, QWidget

    for name, cls in RECOGNIZE_WIDGETS.items():
        assert ui_classes.get(name) == cls, (name, ui_classes.get(name))
    for layout, names in (("guessLayout", ["guessLabel", "recognizedLabel"]),
                          ("promptsLineLayout", ["promptsLineEdit", "freeTextCheckBox", "findSlicesButton"]),
                          ("promptsLayout", ["promptCheckLabel", "promptWarningLabel"]),
                          ("correctSegmentLayout", ["correctSegmentComboBox", "suggestKeySliceButton"])):
        box = panel.findChild(QBoxLayout, layout)
        assert box is not None, layout
        found = [box.itemAt(i).widget().objectName() for i in range(box.count()) if box.itemAt(i).widget()]
        assert found == names, (layout, found)
    warning = panel.findChild(QLabel, "promptWarningLabel")
    assert "#c25e00" in warning.styleSheet() and warning.wordWrap()  # orange, and long warnings wrap
    correct = panel.findChild(QWidget, "correctCollapsibleButton")
    assert correct.isAncestorOf(panel.findChild(QPushButton, "suggestKeySliceButton"))
    # off until BiomedCLIP is ready and a volume is chosen (the mixin switches them)
    assert not panel.findChild(QPushButton, "findSlicesButton").isEnabled()
    assert not panel.findChild(QPushButton, "suggestKeySliceButton").isEnabled()


def test_biomedclip_mixin_is_wired_into_the_widget():
    """BiomedSegLib/recognize.py: set up with the widget, closed on cleanup, told of each new input volume;
    its signals exist on the widgets' Qt classes, the warning hides when empty, and the slice views move
    only inside Slicer (markups logic), never in the panel logic."""
    from PySide6 import QtWidgets

    ui_classes = {w.get("name"): w.get("class") for w in ET.parse(UI_FILE).iter("widget")}
    source = (MODULE.parent / "BiomedSegLib" / "recognize.py").read_text()
    tree = ast.parse(source)
    mixin = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RecognizeSection")
    methods = {n.name: ast.unparse(n) for n in mixin.body if isinstance(n, ast.FunctionDef)}
    connected = 0
    for node in ast.walk(mixin):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"):
            continue
        signal = node.args[0].value.split("(")[0]
        target = node.func.value
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Attribute) and target.value.attr == "ui":
            cls_name = ui_classes[target.attr]
            if cls_name == "qMRMLNodeComboBox":
                assert signal == "currentNodeChanged"
            else:
                assert hasattr(getattr(QtWidgets, cls_name), signal), (target.attr, signal)
            connected += 1
        handler = node.args[1]
        if isinstance(handler, ast.Attribute):
            assert handler.attr in methods, handler.attr
    assert connected >= 5
    assert "self.ui.promptWarningLabel.visible = bool(text)" in methods["showPromptWarning"]
    assert "JumpSlicesToLocation(*outcome.ras, True)" in methods["jumpToSlice"]
    widget = next(n for n in ast.parse(MODULE.read_text()).body if isinstance(n, ast.ClassDef)
                  and n.name == "BiomedSegWidget")
    assert "RecognizeSection" in [ast.unparse(b) for b in widget.bases]
    body = {n.name: ast.unparse(n) for n in widget.body if isinstance(n, ast.FunctionDef)}
    assert "self.setupRecognizeSection()" in body["setup"] and "self.closeRecognition()" in body["cleanup"]
    assert "self.recognizeVolume(node, guess)" in body["onInputVolumeChanged"]
    logic = (ROOT / "BiomedSeg" / "biomedseg" / "panel" / "recognition.py").read_text()
    assert "slicer.util" not in logic and "JumpSlices" not in logic
