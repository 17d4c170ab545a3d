"""3D Slicer module: BiomedSeg.

A thin view over the ``biomedseg`` engine (bundled next to this file). The panel reads its
widgets into a ``PanelState`` and hands it to ``biomedseg.panel_logic.PanelController``,
which sends the job to a background worker process; a QTimer polls the controller every
100 ms, so Slicer stays usable while the model runs, and Cancel stops it. Results become
named, coloured segments with standard terminology; "Undo last result" restores every
segment the run touched. No model code and no torch are imported in Slicer's process.
"""
import os
import sys
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # the engine ships inside the module folder
    sys.path.insert(0, _HERE)

from biomedseg import panel_logic, slicer_bridge  # noqa: E402
from biomedseg.errors import BiomedSegError  # noqa: E402

POLL_INTERVAL_MS = 100


def _translate(text):
    try:
        from slicer.i18n import tr
        return tr(text)
    except ImportError:  # Slicer before 5.4
        return text


#
# Module
#

class BiomedSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _translate("BiomedSeg")
        self.parent.categories = [_translate("Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["BiomedSeg developers"]
        self.parent.helpText = _translate(
            "Segment images with biomedical foundation models from a text prompt (BiomedParse, Hermes, deepbet, "
            "...). Choose a volume, a model and one or more prompts, press Segment and keep working: the model "
            "runs in a background process with a progress bar and Cancel. Each prompt becomes a named, coloured "
            "segment with standard terminology that you can correct in the Segment Editor, undo in one click, "
            "and export as a labelmap, NIfTI, NRRD, .seg.nrrd or DICOM SEG.")
        self.parent.acknowledgementText = _translate(
            "Models are the work of their authors (see `biomedseg models` for references and licences). "
            "deepbet: Fisch et al. 2024 (MIT).")


#
# Parameter node: the panel state, saved with the scene
#

@parameterNodeWrapper
class BiomedSegParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    model: str = "deepbet"
    modality: str = ""
    site: str = ""
    prompts: str = "brain"
    useSliceRange: bool = False
    sliceFirst: int = 0
    sliceLast: int = 0
    roi: vtkMRMLMarkupsROINode
    outputSegmentation: vtkMRMLSegmentationNode
    sliceAxis: Annotated[str, Choice(panel_logic.SLICE_AXES)] = "axial"
    threshold: Annotated[float, WithinRange(0.01, 0.99)] = 0.5
    postprocess: Annotated[str, Choice(list(panel_logic.POSTPROCESS))] = "model default"
    writeMode: Annotated[str, Choice(list(panel_logic.WRITE_MODES))] = "add as new segments"
    device: Annotated[str, Choice(panel_logic.DEVICES)] = "auto"
    workerPython: str = ""
    weightsPath: str = ""
    show3D: bool = True


def slicerPython():
    """Slicer's own Python launcher: the worker's default interpreter."""
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    path = os.path.join(slicer.app.slicerHome, "bin", name)
    return path if os.path.exists(path) else ""


def slicerTerminology(name):
    """Terminology and colour of a target from Slicer's own terminology lists, or None.

    Slicer's lists know its standard colours; targets they do not know keep the
    catalogue's entry (set by the engine).
    """
    try:
        logic = slicer.modules.terminologies.logic()
        entry = slicer.vtkSlicerTerminologyEntry()
        contexts = ["Segmentation category and type - 3D Slicer General Anatomy list",
                    "Segmentation category and type - DICOM master list"]
        for context in contexts:
            if logic.FindTypeInTerminologyBy3dSlicerLabel(context, name, entry):
                tag = logic.SerializeTerminologyEntry(entry)
                colorSource = entry.GetTypeObject()
                modifier = entry.GetTypeModifierObject()
                if modifier is not None and modifier.GetCodeValue():  # 'left kidney': the side's own colour
                    colorSource = modifier
                rgb = colorSource.GetRecommendedDisplayRGBValue()
                terminology = slicer_bridge.terminology_from_tag(tag)
                if terminology:
                    return terminology, tuple(c / 255.0 for c in rgb)
    except Exception:  # an older Slicer without these calls: the catalogue's entry is used
        return None
    return None


#
# Widget: a thin view
#

class BiomedSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updating = False
        self._choices = []
        self._states = None
        self._task = None
        self._lastSegmentation = None
        self._pendingAction = None
        self._messageAction = None
        self._slices = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/BiomedSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        for selector in (self.ui.inputVolumeSelector, self.ui.roiSelector, self.ui.outputSegmentationSelector):
            selector.setMRMLScene(slicer.mrmlScene)
        self.ui.workerPythonPathLineEdit.filters = ctkFilters("Files", "Executable")
        self.ui.weightsPathLineEdit.filters = ctkFilters("Files", "Dirs", "Readable")
        self.ui.workerPythonPathLineEdit.setToolTip(
            self.ui.workerPythonPathLineEdit.toolTip + f" Default: {slicerPython() or 'PythonSlicer'}.")

        self.logic = BiomedSegLogic()
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.modalityComboBox.connect("currentTextChanged(QString)", self.onModalityChanged)
        self.ui.siteComboBox.connect("currentTextChanged(QString)", self.onSiteChanged)
        self.ui.suggestionsListWidget.connect("itemClicked(QListWidgetItem*)", self.onSuggestionClicked)
        self.ui.promptsLineEdit.connect("textChanged(QString)", self.onPromptsChanged)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputVolumeChanged)
        self.ui.sliceAxisComboBox.connect("currentIndexChanged(int)", lambda _: self.updateSliceRange())
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", lambda _: self.refreshModels())
        self.ui.workerPythonPathLineEdit.connect("currentPathChanged(QString)", self.onWorkerPythonChanged)
        self.ui.weightsPathLineEdit.connect("currentPathChanged(QString)", self.onWeightsPathChanged)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.modelActionButton.connect("clicked(bool)", self.onModelAction)
        self.ui.messageActionButton.connect("clicked(bool)", self.onMessageAction)
        self.ui.installDependenciesButton.connect("clicked(bool)", lambda: self.installDependencies())
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.editButton.connect("clicked(bool)", self.onEditInSegmentEditor)
        self.ui.exportFileButton.connect("clicked(bool)", self.onExportFile)
        self.ui.exportLabelmapButton.connect("clicked(bool)", self.onExportLabelmap)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                                   lambda _: self.updateButtons())

        self.showMessage(None)
        self.ui.absentLabel.visible = False
        self.ui.progressBar.setValue(0)
        self.initializeParameterNode()
        missing = panel_logic.missing_engine_packages()
        if missing:  # a fresh Slicer: offer to add what the panel needs, pinned
            self.showMessage(panel_logic.PanelMessage(
                f"BiomedSeg needs {', '.join(missing)} in Slicer's Python.", "dependency_missing", "install_engine"))
            return
        self.refreshModels()

    def cleanup(self):
        self.timer.stop()
        if self._task is not None:
            self._task.cancel()
        if self.logic is not None:
            self.logic.controller.close()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:  # a running job keeps being polled; only the GUI binding stops
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        if self.logic.controller.running:
            self.logic.controller.cancel()
        self.logic.controller.undo_stack.clear()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()
        self.updateButtons()

    # ---- parameter node ----
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.updateGuiFromParameterNode()

    def onParameterNodeModified(self, caller=None, event=None):
        self.updateButtons()

    def updateGuiFromParameterNode(self):
        """The widgets the parameter node cannot drive itself (lists that depend on the model)."""
        p = self._parameterNode
        if p is None:
            return
        self._updating = True
        try:
            self.ui.workerPythonPathLineEdit.currentPath = p.workerPython
            self.ui.weightsPathLineEdit.currentPath = p.weightsPath
            index = self.ui.modelComboBox.findData(p.model)
            if index >= 0:
                self.ui.modelComboBox.setCurrentIndex(index)
        finally:
            self._updating = False
        self.updateModelDependentWidgets()
        self.updateSliceRange()
        self.updateButtons()

    def panelState(self):
        return self.logic.panelState(self._parameterNode)

    # ---- models, modality, site, prompts ----
    def refreshModels(self):
        """Fill the model list with each model's state (asks the worker's Python if it is another one)."""
        p = self._parameterNode
        workerPython = p.workerPython if p else ""
        # the widget, not the parameter node: this slot may run before the node is updated
        device = self.ui.deviceComboBox.currentText or "auto"
        try:
            with slicer.util.tryWithErrorDisplay("Cannot read the model catalogue.", waitCursor=True):
                self._states = panel_logic.model_states(workerPython or None, env=self.logic.isolatedEnvironment())
                self._choices = panel_logic.model_choices(device, self._states)
        except Exception:
            return
        combo = self.ui.modelComboBox
        self._updating = True
        try:
            combo.clear()
            for i, choice in enumerate(self._choices):
                combo.addItem(choice.label, choice.id)
                combo.setItemData(i, choice.tooltip, qt.Qt.ToolTipRole)
                if not choice.enabled:
                    combo.setItemData(i, 0, qt.Qt.UserRole - 1)  # greyed out, not selectable
            wanted = p.model if p else panel_logic.default_model_id()
            index = combo.findData(wanted)
            combo.setCurrentIndex(index if index >= 0 else 0)
        finally:
            self._updating = False
        self.updateModelDependentWidgets()

    def currentChoice(self):
        modelId = self.ui.modelComboBox.currentData
        return next((c for c in self._choices if c.id == modelId), None)

    def onModelChanged(self, index):
        if self._updating or self._parameterNode is None:
            return
        self._parameterNode.model = self.ui.modelComboBox.itemData(index) or panel_logic.default_model_id()
        self.updateModelDependentWidgets()

    def updateModelDependentWidgets(self):
        choice = self.currentChoice()
        p = self._parameterNode
        if choice is None or p is None:
            return
        icon = "\u2714" if choice.ready else "\u26a0"
        self.ui.modelStateLabel.text = f"{icon} {choice.state}: {choice.detail}"
        self.ui.modelStateLabel.toolTip = choice.tooltip
        labels = {"install_dependencies": "Install\u2026", "download_weights": "Download\u2026",
                  "choose_weights": "Choose file\u2026"}
        self.ui.modelActionButton.visible = choice.action is not None
        self.ui.modelActionButton.text = labels.get(choice.action, "")
        self._updating = True
        try:
            self.ui.modalityComboBox.clear()
            self.ui.modalityComboBox.addItems(panel_logic.modalities_for(choice.id))
            modality = panel_logic.match_modality(p.modality, panel_logic.modalities_for(choice.id))
            self.ui.modalityComboBox.setCurrentText(modality)
            site = self._fillSites(choice.id, modality, p.site)
            p.modality, p.site = modality, site  # in the model's own words, as the request needs them
        finally:
            self._updating = False
        self.updateSuggestions()
        self.updateButtons()

    def _fillSites(self, modelId, modality, site):
        sites = panel_logic.sites_for(modelId, modality)
        self.ui.siteComboBox.clear()
        self.ui.siteComboBox.addItems(sites)
        site = panel_logic.match_site(site, sites)
        self.ui.siteComboBox.setCurrentText(site)
        return site

    def onModalityChanged(self, text):
        if self._updating or self._parameterNode is None:
            return
        self._parameterNode.modality = text
        choice = self.currentChoice()
        if choice is not None:
            self._updating = True
            try:
                self._parameterNode.site = self._fillSites(choice.id, text, self._parameterNode.site)
            finally:
                self._updating = False
        self.updateSuggestions()

    def onSiteChanged(self, text):
        if self._updating or self._parameterNode is None:
            return
        self._parameterNode.site = text
        self.updateSuggestions()

    def updateSuggestions(self):
        choice = self.currentChoice()
        widget = self.ui.suggestionsListWidget
        widget.clear()
        if choice is None:
            return
        chosen = {t.lower() for t in panel_logic.parse_prompts(self.ui.promptsLineEdit.text)}
        for target in panel_logic.suggestions(choice.id, self.ui.modalityComboBox.currentText,
                                              self.ui.siteComboBox.currentText):
            item = qt.QListWidgetItem(target)
            item.setCheckState(qt.Qt.Checked if target.lower() in chosen else qt.Qt.Unchecked)
            widget.addItem(item)

    def onSuggestionClicked(self, item):
        prompts = panel_logic.parse_prompts(self.ui.promptsLineEdit.text)
        target = item.text()
        if target.lower() in {p.lower() for p in prompts}:
            prompts = [p for p in prompts if p.lower() != target.lower()]
        else:
            prompts.append(target)
        self.ui.promptsLineEdit.text = panel_logic.join_prompts(prompts)

    def onPromptsChanged(self, text):
        chosen = {t.lower() for t in panel_logic.parse_prompts(text)}
        widget = self.ui.suggestionsListWidget
        for row in range(widget.count):
            item = widget.item(row)
            item.setCheckState(qt.Qt.Checked if item.text().lower() in chosen else qt.Qt.Unchecked)
        self.updateButtons()

    def onInputVolumeChanged(self, node):
        self.ui.guessLabel.text = ""
        if node is None or self._parameterNode is None:
            self.updateButtons()
            return
        try:
            info = self.logic.controller.describe_volume(node)
        except BiomedSegError as exc:
            self.showMessage(panel_logic.describe_error(exc))
            return
        self._slices = info["slices"]
        guess = info["guess"]
        self._parameterNode.modality = guess.modality
        self._parameterNode.site = guess.site
        self.ui.guessLabel.text = guess.reason
        self.updateModelDependentWidgets()
        self.updateSliceRange()
        self.refreshExportFormats(node)

    def updateSliceRange(self):
        slices = self._slices
        p = self._parameterNode
        if not slices or p is None:
            return
        n = slices.get(self.ui.sliceAxisComboBox.currentText, 1)  # the widget may be ahead of the node
        for spin in (self.ui.sliceFirstSpinBox, self.ui.sliceLastSpinBox):
            spin.setRange(0, max(0, n - 1))
        if p.sliceLast <= 0 or p.sliceLast >= n:
            p.sliceLast = n - 1

    def onWorkerPythonChanged(self, path):
        if self._updating or self._parameterNode is None:
            return
        self._parameterNode.workerPython = path
        self.refreshModels()

    def onWeightsPathChanged(self, path):
        if not self._updating and self._parameterNode is not None:
            self._parameterNode.weightsPath = path

    # ---- run ----
    def onSegment(self):
        choice = self.currentChoice()
        p = self._parameterNode
        if choice is not None and choice.action == "install_dependencies":
            self._pendingAction = self.onSegment
            return self.installDependencies()
        if choice is not None and choice.action == "download_weights" and not p.weightsPath:
            self._pendingAction = self.onSegment
            return self.downloadWeights()
        self.showMessage(None)
        try:
            self.logic.start(p)
        except BiomedSegError as exc:
            self.showMessage(panel_logic.describe_error(exc))
            return
        slicer.util.setSliceViewerLayers(background=p.inputVolume, fit=False)
        self.ui.progressBar.setRange(0, 0)
        self.ui.statusLabel.text = "Starting\u2026"
        self.timer.start()
        self.updateButtons()

    def onCancel(self):
        if self._task is not None:
            self._task.cancel()
        else:
            self.logic.controller.cancel()
        self.ui.statusLabel.text = "Cancelling\u2026"

    def onTimer(self):
        if self._task is not None:
            return self.onTaskTimer()
        result = self.logic.controller.poll()
        self.showProgress(result.progress)
        if result.finished:
            self.timer.stop()
            self.showOutcome(result.outcome)
            self.updateButtons()

    def showProgress(self, progress):
        if progress.percent is None:
            self.ui.progressBar.setRange(0, 0)  # busy
        else:
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.setValue(progress.percent)
        self.ui.statusLabel.text = progress.text

    def showOutcome(self, outcome):
        self.ui.resultLabel.text = outcome.summary
        self.ui.absentLabel.text = ("Not found (not written): " + ", ".join(outcome.absent)) if outcome.absent else ""
        self.ui.absentLabel.visible = bool(outcome.absent)
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.setValue(100 if outcome.state == "done" else 0)
        if outcome.message is not None and outcome.state == "failed":
            self.showMessage(outcome.message)
        if outcome.segmentation_node is not None:
            self._lastSegmentation = outcome.segmentation_node
            if self._parameterNode is not None:
                self._parameterNode.outputSegmentation = outcome.segmentation_node
            if self.panelState().show_3d:
                self._reset3DView()

    def _reset3DView(self):
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None and layoutManager.threeDViewCount > 0:
            layoutManager.threeDWidget(0).threeDView().resetFocalPoint()

    def showMessage(self, message):
        """An error as one sentence with what to do, and a button when the panel can do it."""
        if message is None:
            self.ui.messageLabel.text = ""
            self.ui.messageLabel.visible = False
            self.ui.messageActionButton.visible = False
            self._messageAction = None
            return
        self.ui.messageLabel.text = message.text
        self.ui.messageLabel.styleSheet = "color: #b00020;" if message.kind not in ("cancelled", "absent") else ""
        self.ui.messageLabel.visible = True
        labels = {"install_dependencies": "Install\u2026", "install_engine": "Install\u2026",
                  "download_weights": "Download\u2026", "choose_weights": "Choose file\u2026", "retry": "Try again"}
        self._messageAction = message.action
        self.ui.messageActionButton.visible = message.action in labels
        self.ui.messageActionButton.text = labels.get(message.action, "")

    def onMessageAction(self):
        action = self._messageAction
        self.showMessage(None)
        if action == "retry":
            self.onSegment()
        elif action is not None:
            self.runModelAction(action)

    def onModelAction(self):
        choice = self.currentChoice()
        if choice is not None and choice.action:
            self.runModelAction(choice.action)

    def runModelAction(self, action):
        if action == "install_dependencies":
            self.installDependencies()
        elif action == "install_engine":
            self.installDependencies(engineOnly=True)
        elif action == "download_weights":
            self.downloadWeights()
        elif action == "choose_weights":
            path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), "Choose the model's weights file")
            if path:
                self.ui.weightsPathLineEdit.currentPath = path

    def updateButtons(self):
        p = self._parameterNode
        busy = self.logic is not None and (self.logic.controller.running or self._task is not None)
        choice = self.currentChoice()
        canRun = (p is not None and p.inputVolume is not None and choice is not None and choice.enabled
                  and bool(panel_logic.parse_prompts(self.ui.promptsLineEdit.text)))
        self.ui.segmentButton.toolTip = ("Run the model on the input volume in the background." if canRun else
                                         "Choose an input volume, a model that can run here and at least one prompt.")
        states = panel_logic.button_states(
            busy=busy, can_run=canRun, can_undo=self.logic is not None and self.logic.controller.can_undo,
            has_result=self._resultSegmentation() is not None)
        for name, enabled in states.items():
            getattr(self.ui, name).enabled = enabled

    def _resultSegmentation(self):
        p = self._parameterNode
        node = p.outputSegmentation if p is not None else None
        if node is None or node.GetSegmentation().GetNumberOfSegments() == 0:
            return None
        return node

    # ---- results ----
    def onUndo(self):
        with slicer.util.tryWithErrorDisplay("Undo failed.", waitCursor=True):
            names = self.logic.controller.undo_last()
            self.ui.resultLabel.text = f"Undone: {', '.join(names)} restored to before the last run."
            self.ui.absentLabel.text = ""
            self.ui.absentLabel.visible = False
        self.updateButtons()

    def onEditInSegmentEditor(self):
        segmentation = self._resultSegmentation()
        volume = self._parameterNode.inputVolume
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentation)
        setSource = getattr(editor, "setSourceVolumeNode", None) or getattr(editor, "setMasterVolumeNode")
        setSource(volume)

    def refreshExportFormats(self, node):
        formats = self.logic.controller.export_formats(node)
        combo = self.ui.exportFormatComboBox
        current = combo.currentData
        combo.clear()
        for suffix, label in formats.items():
            combo.addItem(label, suffix)
        index = combo.findData(current)
        combo.setCurrentIndex(index if index >= 0 else 0)

    def onExportFile(self):
        segmentation = self._resultSegmentation()
        volume = self._parameterNode.inputVolume
        suffix = self.ui.exportFormatComboBox.currentData or ".seg.nrrd"
        name = f"{segmentation.GetName()}{suffix}".replace(" ", "_")
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), "Export segmentation",
                                              os.path.join(qt.QDir.homePath(), name),
                                              f"{self.ui.exportFormatComboBox.currentText} (*{suffix})")
        if not path:
            return
        if not path.lower().endswith(suffix):
            path += suffix
        with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
            written = self.logic.controller.export_file(segmentation, volume, path)
            slicer.util.showStatusMessage(f"Wrote {', '.join(str(w) for w in written)}", 5000)

    def onExportLabelmap(self):
        with slicer.util.tryWithErrorDisplay("Export to labelmap failed.", waitCursor=True):
            node = self.logic.controller.export_labelmap(self._resultSegmentation(), self._parameterNode.inputVolume)
            slicer.util.showStatusMessage(f"Created labelmap '{node.GetName()}'", 5000)

    # ---- first run: dependencies and weights ----
    def installDependencies(self, engineOnly=False):
        p = self._parameterNode
        engine = panel_logic.missing_engine_packages()
        if engineOnly or engine:  # the panel's own packages first (the catalogue needs them)
            plan = self.logic.installPlan(None, engine, "")
            if plan.steps and slicer.util.confirmOkCancelDisplay(
                    plan.summary + "\n\n" + "\n".join(f"\u2022 {step.description}" for step in plan.steps),
                    windowTitle="BiomedSeg: install dependencies"):
                self._pendingAction = self.refreshModels
                self.runTask(plan)
            return
        choice = self.currentChoice()
        if choice is None or p is None:
            return
        workerPython = p.workerPython or slicerPython()
        missing = panel_logic.missing_requirements(choice.id, p.workerPython, env=self.logic.isolatedEnvironment())
        try:
            plan = self.logic.installPlan(choice.id, missing, p.workerPython)
        except BiomedSegError as exc:
            # torch cannot be added safely to Slicer's Python: offer a separate environment.
            envDir = self.logic.separateEnvironmentDir()
            if not slicer.util.confirmOkCancelDisplay(
                    f"{exc.message}\n\nCreate a separate Python environment for the model in {envDir} instead?",
                    windowTitle="BiomedSeg: install dependencies"):
                return
            plan = self.logic.installPlan(choice.id, missing, p.workerPython, envDir=envDir)
        if not plan.steps:
            slicer.util.infoDisplay(f"Nothing to install: '{choice.id}' has what it needs in {workerPython}.")
            return self.refreshModels()
        details = "\n".join(f"\u2022 {step.description}" for step in plan.steps)
        if not slicer.util.confirmOkCancelDisplay(f"{plan.summary}\n\n{details}\n\nContinue?",
                                                  windowTitle="BiomedSeg: install dependencies"):
            self._pendingAction = None
            return
        self.runTask(plan)

    def downloadWeights(self):
        choice = self.currentChoice()
        p = self._parameterNode
        if choice is None or p is None:
            return
        plan = panel_logic.download_plan(choice.id, p.workerPython or slicerPython() or sys.executable,
                                         isolated=bool(p.workerPython))
        if not slicer.util.confirmOkCancelDisplay(plan.summary + "\n\nDownload now?",
                                                  windowTitle="BiomedSeg: download weights"):
            self._pendingAction = None
            return
        self.runTask(plan, progressOf=panel_logic.weights_progress(choice.id))

    def runTask(self, plan, progressOf=None):
        self._task = panel_logic.BackgroundSteps(plan, env=self.logic.workerEnvironment(), progress_of=progressOf,
                                                 isolated_env=self.logic.workerEnvironment(isolated=True))
        self.ui.progressBar.setRange(0, 0)
        self.timer.start()
        self.updateButtons()

    def onTaskTimer(self):
        task = self._task
        if task.pending_special is not None:  # PyTorch through the PyTorch extension (its own dialogs)
            ok, error = self.logic.installTorchWithExtension()
            task.special_done(ok, error)
        self.showProgress(task.poll())
        if not task.finished:
            return
        self.timer.stop()
        self._task = None
        if task.state == "done":
            if task.plan.worker_python:  # the model now runs in the new environment
                self._parameterNode.workerPython = task.plan.worker_python
                self._updating = True
                try:
                    self.ui.workerPythonPathLineEdit.currentPath = task.plan.worker_python
                finally:
                    self._updating = False
            self.refreshModels()
            self.ui.statusLabel.text = "Done. " + task.plan.summary.split(". ")[0] + "."
            pending, self._pendingAction = self._pendingAction, None
            if pending == self.refreshModels:
                pass  # done above
            elif pending is not None and self.currentChoice() is not None and self.currentChoice().ready:
                pending()
        elif task.state == "failed":
            self.showMessage(panel_logic.PanelMessage(
                task.error + " Nothing else was changed; see the Python console for the full output, or choose "
                "another worker Python under Advanced.", "error", None))
            print("\n".join(task.lines))
        self.updateButtons()


def ctkFilters(*names):
    import ctk

    value = 0
    for name in names:
        value |= getattr(ctk.ctkPathLineEdit, name)
    return value


#
# Logic: glue between MRML and the engine's controller
#

class BiomedSegLogic(ScriptedLoadableModuleLogic):
    """Owns the ``PanelController``; no model code is imported at start-up."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.controller = panel_logic.PanelController(slicer.mrmlScene, terminology_lookup=slicerTerminology,
                                                      default_python=slicerPython(),
                                                      isolated_env=self.isolatedEnvironment())

    def getParameterNode(self):
        return BiomedSegParameterNode(super().getParameterNode())

    @staticmethod
    def panelState(p):
        return panel_logic.state_from_parameters(p)

    def start(self, p):
        """Submit the panel's request to the worker; returns the job at once."""
        return self.controller.start(self.panelState(p), p.inputVolume, p.outputSegmentation, p.roi)

    def segment(self, volumeNode, state=None, segmentationNode=None, roiNode=None, timeout=None):
        """Run and wait, keeping Slicer responsive (scripts and the self-test; the panel uses its timer)."""
        import time

        state = state or panel_logic.PanelState()
        self.controller.start(state, volumeNode, segmentationNode, roiNode)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            result = self.controller.poll()
            if result.finished:
                return result.outcome
            if deadline is not None and time.monotonic() > deadline:
                self.controller.cancel()
            slicer.app.processEvents()
            time.sleep(POLL_INTERVAL_MS / 1000.0)

    # ---- installs ----
    @staticmethod
    def separateEnvironmentDir():
        from biomedseg.weights import cache_dir

        return str(cache_dir() / "worker-env")

    def installPlan(self, modelId, missing, workerPython, envDir=None):
        import tempfile

        if envDir is not None:
            return panel_logic.install_plan(modelId, missing, python=workerPython or slicerPython(), env_dir=envDir,
                                            base_python=self.basePythonForEnvironment())
        constraints = os.path.join(tempfile.mkdtemp(prefix="biomedseg-"), "slicer-constraints.txt")
        with open(constraints, "w") as f:
            f.write(panel_logic.constraints_for_installed())
        return panel_logic.install_plan(modelId, missing, python=workerPython or slicerPython(),
                                        pytorch_utils=self.hasPyTorchExtension(), constraints_file=constraints)

    def basePythonForEnvironment(self):
        """A Python to create the separate environment from: the system's python3, else Slicer's."""
        import shutil

        found = shutil.which("python3", path=self.isolatedEnvironment().get("PATH"))
        return found or slicerPython() or sys.executable

    @staticmethod
    def hasPyTorchExtension():
        try:
            import PyTorchUtils  # noqa: F401
            return True
        except ImportError:
            return False

    @staticmethod
    def installTorchWithExtension():
        """PyTorch through the PyTorch extension's installer (it picks the CUDA build for this GPU)."""
        try:
            import PyTorchUtils

            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                                  torchVersionRequirement=">=2.1")
            return torch is not None, "" if torch is not None else "The PyTorch extension did not install torch."
        except Exception as exc:
            return False, f"The PyTorch extension could not install torch ({exc})."

    @staticmethod
    def isolatedEnvironment():
        """Environment for a Python other than Slicer's: Slicer's startup environment without the
        variables (PYTHONHOME, PYTHONPATH, library paths of the launcher) that point at Slicer's Python."""
        startup = getattr(slicer.util, "startupEnvironment", None)
        return panel_logic.isolated_environment(startup() if startup else None)

    def workerEnvironment(self, isolated=False):
        """Environment for background steps: Slicer's (or the isolated one) with the engine importable."""
        env = self.isolatedEnvironment() if isolated else dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_HERE, env.get("PYTHONPATH")]))
        return env


#
# Self-test
#

class BiomedSegTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_deepbet_on_sample()

    def test_deepbet_on_sample(self):
        """The offline default model on Slicer's MRHead sample gives a brain segment; undo removes it."""
        import numpy as np
        import SampleData

        self.delayDisplay("Loading MRHead")
        volumeNode = SampleData.downloadSample("MRHead")
        logic = BiomedSegLogic()
        state = panel_logic.PanelState(model="deepbet", prompts=["brain"], show_3d=False)
        self.delayDisplay("Segmenting the brain with deepbet in the background worker")
        outcome = logic.segment(volumeNode, state, timeout=900)
        self.assertEqual(outcome.state, "done", outcome.summary)
        segmentationNode = outcome.segmentation_node
        segments = slicer_bridge.segments_of(segmentationNode)
        self.assertEqual([s["name"] for s in segments], ["brain"])
        self.assertEqual(segments[0]["terminology"]["type"][1], "12738006")  # SNOMED CT: Brain
        mask = slicer_bridge.segment_mask(segmentationNode, segments[0]["id"], volumeNode)
        spacing = np.array(volumeNode.GetSpacing())
        millilitres = mask.sum() * spacing.prod() / 1000.0
        self.assertTrue(800 < millilitres < 2200, f"brain volume {millilitres:.0f} mL")
        self.assertEqual(outcome.absent, [])
        logic.controller.undo_last()
        self.assertEqual(segmentationNode.GetSegmentation().GetNumberOfSegments(), 0)
        logic.controller.close()
        self.delayDisplay("Test passed")
