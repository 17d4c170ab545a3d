"""3D Slicer module: BiomedSeg.

A thin view over the ``biomedseg`` engine (bundled next to this file). The panel reads its
widgets into a ``PanelState`` and hands it to ``biomedseg.panel.PanelController``,
which sends the job to a background worker process; a QTimer polls the controller every
100 ms, so Slicer stays usable while the model runs, and Cancel stops it. Results become
named, coloured segments with standard terminology; "Undo last result" restores every
segment the run touched. Installs and downloads follow ``biomedseg.panel.InstallFlow``;
only its dialogs and the timer are here (what needs the running Slicer application is in
``biomedseg.slicer_bridge.application``). No model code and no torch are imported in
Slicer's process.
"""
import os
import sys
from contextlib import contextmanager
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # the engine ships inside the module folder
    sys.path.insert(0, _HERE)

from biomedseg import panel, slicer_bridge  # noqa: E402
from biomedseg.catalog import default_model_id  # noqa: E402
from biomedseg.errors import BiomedSegError  # noqa: E402
from biomedseg.slicer_bridge import application as app  # noqa: E402
from BiomedSegLib.correct import CorrectSection  # noqa: E402
from BiomedSegLib.first_run import FirstRunInstalls  # noqa: E402
from BiomedSegLib.prompt_checks import PromptCheckSection  # noqa: E402
from BiomedSegLib.recognize import RecognizeSection  # noqa: E402

POLL_INTERVAL_MS = 100


# ---- Module ----

class BiomedSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = app.translate("BiomedSeg")
        self.parent.categories = [app.translate("Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["BiomedSeg developers"]
        self.parent.helpText = app.translate(
            "Segment images with biomedical foundation models from a text prompt (BiomedParse, Hermes, deepbet, "
            "...). Choose a volume, a model and one or more prompts, press Segment and keep working: the model "
            "runs in a background process with a progress bar and Cancel. Each prompt becomes a named, coloured "
            "segment with standard terminology that you can correct in the Segment Editor, undo in one click, "
            "and export as a labelmap, NIfTI, NRRD, .seg.nrrd or DICOM SEG.")
        self.parent.acknowledgementText = app.translate(
            "Models are the work of their authors (see `biomedseg models` for references and licences). "
            "deepbet: Fisch et al. 2024 (MIT).")


# ---- Parameter node: the panel state, saved with the scene ----

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
    promptMarkups: vtkMRMLMarkupsNode
    outputSegmentation: vtkMRMLSegmentationNode
    sliceAxis: Annotated[str, Choice(panel.SLICE_AXES)] = "axial"
    threshold: Annotated[float, WithinRange(0.01, 0.99)] = 0.5
    postprocess: Annotated[str, Choice(list(panel.POSTPROCESS))] = "model default"
    writeMode: Annotated[str, Choice(list(panel.WRITE_MODES))] = "add as new segments"
    device: Annotated[str, Choice(panel.DEVICES)] = "auto"
    workerPython: str = ""
    weightsPath: str = ""
    show3D: bool = True
    showProbabilities: bool = False
    freeText: bool = False
    serverUrl: str = ""  # a `biomedseg serve` address ('' = the local worker); never the token (scenes are shared)
    fallbackLocal: bool = False


# ---- Widget: a thin view ----

class BiomedSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin, FirstRunInstalls, CorrectSection,
                      RecognizeSection, PromptCheckSection):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updating = False
        self._choices = []
        self._messageAction = None
        self._slices = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/BiomedSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        for selector in (self.ui.inputVolumeSelector, self.ui.roiSelector, self.ui.promptMarkupsSelector,
                         self.ui.outputSegmentationSelector):
            selector.setMRMLScene(slicer.mrmlScene)
        self.ui.workerPythonPathLineEdit.filters = app.ctk_path_filters("Files", "Executable")
        self.ui.weightsPathLineEdit.filters = app.ctk_path_filters("Files", "Dirs", "Readable")
        self.ui.workerPythonPathLineEdit.setToolTip(
            self.ui.workerPythonPathLineEdit.toolTip + f" Default: {app.slicer_python() or 'PythonSlicer'}.")

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
        for selector in (self.ui.outputSegmentationSelector, self.ui.promptMarkupsSelector):
            selector.connect("currentNodeChanged(vtkMRMLNode*)", lambda _: self.updateButtons())

        self.setupCorrectSection()
        self.setupRecognizeSection()  # BiomedCLIP: recognised line, prompt warning, Find slices, key slice
        self.setupPromptChecks()  # each prompt checked live: typo, not trained for this modality, free text
        self.showMessage(None)
        self.ui.absentLabel.visible = False
        self.ui.progressBar.setValue(0)
        self.initializeParameterNode()
        engineMissing = self.logic.installs.engine_message()
        if engineMissing is not None:  # a fresh Slicer: offer to add what the panel needs, pinned
            return self.showMessage(engineMissing)
        self.refreshModels()

    def cleanup(self):
        self.timer.stop()
        self.removeCorrectShortcuts()
        if self.logic is not None:
            self.closeRecognition()
            self.logic.installs.cancel()
            self.logic.controller.close()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()
        self.updateCorrectSection()  # its keys work while the module is shown

    def exit(self):
        self.removeCorrectShortcuts()
        if self._parameterNode:  # a running job keeps being polled; only the GUI binding stops
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        self.logic.controller.forget_scene()
        self.forgetCorrections()
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

    @contextmanager
    def _quiet(self):
        """Widgets set by the code, not the person: their change signals must not write back."""
        self._updating = True
        try:
            yield
        finally:
            self._updating = False

    def updateGuiFromParameterNode(self):
        """The widgets the parameter node cannot drive itself (lists that depend on the model)."""
        p = self._parameterNode
        if p is None:
            return
        with self._quiet():
            self.ui.workerPythonPathLineEdit.currentPath = p.workerPython
            self.ui.weightsPathLineEdit.currentPath = p.weightsPath
            index = self.ui.modelComboBox.findData(p.model)
            if index >= 0:
                self.ui.modelComboBox.setCurrentIndex(index)
        self.updateModelDependentWidgets()
        self.updateSliceRange()
        self.updateButtons()

    def panelState(self):
        return self.logic.panelState(self._parameterNode)

    # ---- models, modality, site, prompts ----
    def refreshModels(self):
        """Fill the model list with each model's state (asks the worker's Python if it is another one)."""
        p = self._parameterNode
        device = self.ui.deviceComboBox.currentText or "auto"  # the widget: the node may not be updated yet
        try:
            with slicer.util.tryWithErrorDisplay("Cannot read the model catalogue.", waitCursor=True):
                states = panel.model_states(p.workerPython if p and p.workerPython else None,
                                            env=self.logic.installs.isolated_env())
                self._choices = panel.model_choices(device, states)
        except Exception:
            return
        combo = self.ui.modelComboBox
        with self._quiet():
            combo.clear()
            for i, choice in enumerate(self._choices):
                combo.addItem(choice.label, choice.id)
                combo.setItemData(i, choice.tooltip, qt.Qt.ToolTipRole)
                if not choice.enabled:
                    combo.setItemData(i, 0, qt.Qt.UserRole - 1)  # greyed out, not selectable
            index = combo.findData(p.model if p else default_model_id())
            combo.setCurrentIndex(index if index >= 0 else 0)
        self.updateModelDependentWidgets()

    def currentChoice(self):
        modelId = self.ui.modelComboBox.currentData
        return next((c for c in self._choices if c.id == modelId), None)

    def onModelChanged(self, index):
        if self._updating or self._parameterNode is None:
            return
        self._parameterNode.model = self.ui.modelComboBox.itemData(index) or default_model_id()
        self.updateModelDependentWidgets()

    def updateModelDependentWidgets(self):
        choice, p = self.currentChoice(), self._parameterNode
        if choice is None or p is None:
            return
        self.ui.modelStateLabel.text = choice.status_line
        self.ui.modelStateLabel.toolTip = choice.tooltip
        self.ui.modelActionButton.visible = choice.action is not None
        self.ui.modelActionButton.text = panel.ACTION_LABELS.get(choice.action, "")
        for widget in (self.ui.promptMarkupsLabel, self.ui.promptMarkupsSelector):
            widget.visible = choice.takes_markups
        self.showModelView(modalities=True)
        self.updateCorrectSection()
        self.updateButtons()

    def showModelView(self, modalities=False):
        """Modality and site lists in the model's words, and its suggestions with ticks (``panel.model_view``)."""
        choice, p = self.currentChoice(), self._parameterNode
        view = panel.model_view(choice.id, p.modality, p.site, self.ui.promptsLineEdit.text)
        with self._quiet():
            if modalities:
                self.ui.modalityComboBox.clear()
                self.ui.modalityComboBox.addItems(view.modalities)
                self.ui.modalityComboBox.setCurrentText(view.modality)
            self.ui.siteComboBox.clear()
            self.ui.siteComboBox.addItems(view.sites)
            self.ui.siteComboBox.setCurrentText(view.site)
            p.modality, p.site = view.modality, view.site  # in the model's own words, as the request needs them
        self.ui.suggestionsListWidget.clear()
        for target, ticked in view.suggestions:
            item = qt.QListWidgetItem(target)
            item.setCheckState(qt.Qt.Checked if ticked else qt.Qt.Unchecked)
            self.ui.suggestionsListWidget.addItem(item)

    def onModalityChanged(self, text, field="modality"):
        if not self._updating and self._parameterNode is not None and self.currentChoice() is not None:
            setattr(self._parameterNode, field, text)
            self.showModelView()

    def onSiteChanged(self, text):
        self.onModalityChanged(text, "site")

    def onSuggestionClicked(self, item):
        self.ui.promptsLineEdit.text = panel.toggle_prompt(self.ui.promptsLineEdit.text, item.text())

    def onPromptsChanged(self, text):
        chosen = panel.chosen_prompts(text)
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
            self.showMessage(panel.describe_error(exc))
            return
        self._slices = info["slices"]
        guess = info["guess"]
        self._parameterNode.modality = guess.modality
        self._parameterNode.site = guess.site
        self.ui.guessLabel.text = guess.reason
        self.updateModelDependentWidgets()
        self.updateSliceRange()
        self.refreshExportFormats(node)
        self.recognizeVolume(node, guess)

    def updateSliceRange(self):
        slices, p = self._slices, self._parameterNode
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
    def onSegment(self, force=False):
        choice = self.currentChoice()
        p = self._parameterNode
        first = choice.action_before_run(p.weightsPath) if choice is not None else None
        if first is not None:  # install or download first, then segment
            self.logic.installs.pending = self.onSegment
            return self.runModelAction(first)
        self.showMessage(None)
        try:
            self.logic.start(p, force=force)
        except BiomedSegError as exc:
            self.showMessage(panel.describe_error(exc))
            return
        slicer.util.setSliceViewerLayers(background=p.inputVolume, fit=False)
        self.ui.progressBar.setRange(0, 0)
        self.ui.statusLabel.text = "Starting\u2026"
        self.timer.start()
        self.updateButtons()

    def onCancel(self):
        if self.logic.installs.busy:
            self.logic.installs.cancel()
        else:
            self.logic.controller.cancel()
        self.ui.statusLabel.text = "Cancelling\u2026"

    def onTimer(self):
        if self.logic.installs.busy:
            return self.onTaskTimer()
        result = self.logic.controller.poll()
        self.showProgress(result.progress)
        if result.finished:
            self.timer.stop()
            self.showOutcome(result.outcome)
            self.updateButtons()
            self.onCorrectionFinished(result.outcome)

    def showProgress(self, progress):
        if progress.percent is None:
            self.ui.progressBar.setRange(0, 0)  # busy
        else:
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.setValue(progress.percent)
        self.ui.statusLabel.text = progress.text

    def showOutcome(self, outcome):
        self.ui.resultLabel.text = outcome.summary
        self.ui.absentLabel.text = outcome.absent_line
        self.ui.absentLabel.visible = bool(outcome.absent)
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.setValue(100 if outcome.state == "done" else 0)
        if outcome.message is not None and outcome.state == "failed":
            self.showMessage(outcome.message)
        if outcome.segmentation_node is not None:
            if self._parameterNode is not None:
                self._parameterNode.outputSegmentation = outcome.segmentation_node
            if self.panelState().show_3d:
                app.reset_3d_view()

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
        self._messageAction = message.action
        self.ui.messageActionButton.visible = message.action in panel.ACTION_LABELS
        self.ui.messageActionButton.text = panel.ACTION_LABELS.get(message.action, "")

    def onMessageAction(self):
        action = self._messageAction
        self.showMessage(None)
        if action in ("retry", "use_anyway"):
            self.onSegment(force=action == "use_anyway")
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
        p, choice = self._parameterNode, self.currentChoice()
        busy = self.logic is not None and (self.logic.controller.running or self.logic.installs.busy)
        canRun = (p is not None and p.inputVolume is not None and choice is not None and choice.enabled
                  and (bool(panel.parse_prompts(self.ui.promptsLineEdit.text)) and choice.takes_text
                       or p.promptMarkups is not None and choice.takes_markups) and self.promptsOk())
        self.ui.segmentButton.toolTip = ("Run the model on the input volume in the background." if canRun else
                                         "Choose an input volume, a model that can run here and at least one prompt.")
        states = panel.button_states(
            busy=busy, can_run=canRun, can_undo=self.logic is not None and self.logic.controller.can_undo,
            has_result=self._resultSegmentation() is not None)
        for name, enabled in states.items():
            getattr(self.ui, name).enabled = enabled
        self.updateCorrectButtons()

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
        app.open_in_segment_editor(self._resultSegmentation(), self._parameterNode.inputVolume)

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


# ---- Logic: glue between MRML, Slicer and the engine's controller and install flow ----

class BiomedSegLogic(ScriptedLoadableModuleLogic):
    """Owns the ``PanelController`` and the ``InstallFlow``; no model code is imported at start-up."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.installs = panel.InstallFlow(app.slicer_python(), _HERE, pytorch_extension=app.has_pytorch_extension,
                                          startup_env=app.startup_environment())
        self.controller = panel.PanelController(slicer.mrmlScene, terminology_lookup=app.slicer_terminology,
                                                default_python=app.slicer_python(),
                                                isolated_env=self.installs.isolated_env())
        self.corrections = panel.CorrectionController(self.controller)  # the Correct section (interactive models)

    def getParameterNode(self):
        return BiomedSegParameterNode(super().getParameterNode())

    panelState = staticmethod(panel.state_from_parameters)  # the token comes from $BIOMEDSEG_TOKEN or its file

    def start(self, p, force=False):
        """Submit the panel's request to the worker (``force``: 'Use anyway' on another modality); returns at once."""
        markups, state = [p.promptMarkups] if p.promptMarkups is not None else None, self.panelState(p)
        state.force = force
        return self.controller.start(state, p.inputVolume, p.outputSegmentation, p.roi, markups)

    def segment(self, volumeNode, state=None, segmentationNode=None, roiNode=None, timeout=None):
        """Run and wait, keeping Slicer responsive (scripts and the self-test; the panel uses its timer)."""
        return self.controller.run_to_end(state or panel.PanelState(), volumeNode, segmentationNode, roiNode, timeout,
                                          idle=slicer.app.processEvents, interval=POLL_INTERVAL_MS / 1000.0)


# ---- Self-test ----

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
        state = panel.PanelState(model="deepbet", prompts=["brain"], show_3d=False)
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
