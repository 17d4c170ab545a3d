"""The Correct section in Slicer: markups place modes in the slice views, keyboard shortcuts and the
hint under the mouse; a mixin of the module's widget.

Every decision (sessions, prompts, what a click will do, where a result may be written, undo) is
``biomedseg.panel.CorrectionController``'s; this only turns Slicer events into its calls. Runs go
through the module's one ``PanelController`` run, so the module's timer, progress bar and Cancel
serve them unchanged.
"""
import qt
import slicer

from biomedseg import panel, slicer_bridge
from biomedseg.errors import BiomedSegError
from biomedseg.panel.correction import SHORTCUTS, is_interactive

TOOL_BUTTONS = {"box": "boxToolButton", "include": "includeToolButton", "exclude": "excludeToolButton"}
COLOURS = {"box": (0.95, 0.8, 0.2), "include": (0.2, 0.85, 0.3), "exclude": (0.95, 0.25, 0.2)}
NODE_NAMES = {"box": "BiomedSeg box", "include": "BiomedSeg include", "exclude": "BiomedSeg exclude"}


class CorrectSection:
    """Needs the widget's ``ui``, ``logic`` (``corrections``, ``controller``), ``timer``, ``_parameterNode``,
    ``_slices``, ``currentChoice``, ``panelState``, ``showMessage``, ``updateButtons`` and VTK observations."""

    def setupCorrectSection(self):
        self._correctShortcuts = []
        self._correctNodes = {}
        self._toolsQuiet = False
        for tool, name in TOOL_BUTTONS.items():
            getattr(self.ui, name).connect("toggled(bool)", lambda on, t=tool: self.onCorrectTool(t, on))
        self.ui.propagateButton.connect("clicked(bool)", lambda _=None: self.onPropagate())
        self.ui.refineButton.connect("clicked(bool)", lambda _=None: self.onRefine())
        self.ui.correctUndoButton.connect("clicked(bool)", lambda _=None: self.onCorrectUndo())
        self.ui.clearPromptsButton.connect("clicked(bool)", lambda _=None: self.onClearPrompts())
        self.ui.correctSegmentComboBox.connect("activated(int)", lambda _: self.onCorrectTargetChanged())
        crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        if crosshair is not None:
            self.addObserver(crosshair, slicer.vtkMRMLCrosshairNode.CursorPositionModifiedEvent, self.onCursorMoved)
        self.ui.correctCollapsibleButton.visible = False

    # ---- shown for interactive models; keys while shown ----
    def updateCorrectSection(self):
        choice = self.currentChoice()
        shown = choice is not None and is_interactive(choice.id)
        self.ui.correctCollapsibleButton.visible = shown
        if shown and self.parent.isEntered:
            self.installCorrectShortcuts()
        else:
            self.removeCorrectShortcuts()
        if shown:
            self.fillCorrectSegments()
            self.updateCorrectRange()
            self.updateCorrectButtons()

    def installCorrectShortcuts(self):
        if self._correctShortcuts:
            return
        for action, keys in SHORTCUTS.items():
            for key in keys:
                shortcut = qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())
                shortcut.connect("activated()", lambda a=action: self.onCorrectShortcut(a))
                self._correctShortcuts.append(shortcut)

    def removeCorrectShortcuts(self):
        for shortcut in self._correctShortcuts:
            shortcut.setEnabled(False)
            shortcut.deleteLater()
        self._correctShortcuts = []

    def onCorrectShortcut(self, action):
        if action in TOOL_BUTTONS:
            button = getattr(self.ui, TOOL_BUTTONS[action])
            button.checked = not button.checked
        elif action == "propagate":
            self.onPropagate()
        elif action == "refine":
            self.onRefine()
        elif action == "undo":
            self.onCorrectUndo()

    # ---- which segment, which slices ----
    def fillCorrectSegments(self, select=None):
        combo, p = self.ui.correctSegmentComboBox, self._parameterNode
        current = select if select is not None else combo.currentData
        combo.blockSignals(True)
        combo.clear()
        combo.addItem("New segment", "")
        node = p.outputSegmentation if p is not None else None
        for segment in (slicer_bridge.segments_of(node) if node is not None else []):
            combo.addItem(segment["name"], segment["id"])
        index = combo.findData(current or "")
        combo.setCurrentIndex(index if index >= 0 else 0)
        combo.blockSignals(False)

    def updateCorrectRange(self):
        slices, p = self._slices, self._parameterNode
        if not slices or p is None:
            return
        last = slices.get(p.sliceAxis, 1) - 1
        for spin in (self.ui.correctFirstSpinBox, self.ui.correctLastSpinBox):
            spin.setRange(0, max(0, last))
        if self.ui.correctLastSpinBox.value == 0:
            self.ui.correctLastSpinBox.setValue(last)

    def correctRange(self):
        return self.ui.correctFirstSpinBox.value, self.ui.correctLastSpinBox.value

    def beginCorrection(self):
        p = self._parameterNode
        segmentId = self.ui.correctSegmentComboBox.currentData or None
        return self.logic.corrections.begin(self.panelState(), p.inputVolume, p.outputSegmentation, segmentId,
                                            slice_range=self.correctRange())

    def onCorrectTargetChanged(self):
        self.stopPlacing()
        try:
            self.beginCorrection()
        except BiomedSegError as exc:
            self.showMessage(panel.describe_error(exc))
        self.updateCorrectButtons()

    # ---- tools: markups place mode ----
    def onCorrectTool(self, tool, on):
        if self._toolsQuiet:
            return
        corrections = self.logic.corrections
        if not on:
            if corrections.tool == tool:
                self.stopPlacing()
            return
        self.setToolButtons(tool)
        try:
            self.beginCorrection()
        except BiomedSegError as exc:
            self.setToolButtons(None)
            return self.showMessage(panel.describe_error(exc))
        corrections.set_tool(tool)
        node = self.correctMarkupsNode(tool)
        selection = slicer.app.applicationLogic().GetSelectionNode()
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        selection.SetReferenceActivePlaceNodeClassName(node.GetClassName())
        selection.SetActivePlaceNodeID(node.GetID())
        interaction.SetPlaceModePersistence(0 if tool == "box" else 1)
        interaction.SetCurrentInteractionMode(interaction.Place)
        self.updateCorrectButtons()

    def setToolButtons(self, tool):
        self._toolsQuiet = True
        try:
            for name, buttonName in TOOL_BUTTONS.items():
                getattr(self.ui, buttonName).setChecked(name == tool)
        finally:
            self._toolsQuiet = False

    def stopPlacing(self):
        self.logic.corrections.set_tool(None)
        self.setToolButtons(None)
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        if interaction.GetCurrentInteractionMode() == interaction.Place:
            interaction.SetCurrentInteractionMode(interaction.ViewTransform)
        self.updateCorrectButtons()

    def correctMarkupsNode(self, tool):
        """The point list of include or exclude clicks (one each), or a new ROI for each box."""
        node = self._correctNodes.get(tool)
        if tool != "box" and node is not None and node.GetScene() is not None:
            return node
        className = "vtkMRMLMarkupsROINode" if tool == "box" else "vtkMRMLMarkupsFiducialNode"
        node = slicer.mrmlScene.AddNewNodeByClass(className, slicer.mrmlScene.GenerateUniqueName(NODE_NAMES[tool]))
        node.CreateDefaultDisplayNodes()
        node.GetDisplayNode().SetSelectedColor(*COLOURS[tool])
        node.GetDisplayNode().SetColor(*COLOURS[tool])
        node.SetAttribute("BiomedSeg.Tool", tool)
        self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onCorrectMarkupPlaced)
        self._correctNodes[tool] = node
        return node

    def onCorrectMarkupPlaced(self, caller, event):
        tool = caller.GetAttribute("BiomedSeg.Tool")
        corrections = self.logic.corrections
        try:
            if tool == "box":
                if not caller.GetControlPointPlacementComplete():
                    return  # the first corner of the box
                now = corrections.add_box(caller)
                self.stopPlacing()
            else:
                now = corrections.add_point(caller, caller.GetNumberOfControlPoints() - 1, tool == "include")
        except BiomedSegError as exc:
            slicer_bridge.remove_markup(caller, None if tool == "box" else
                                        slicer_bridge.control_point_id(caller, caller.GetNumberOfControlPoints() - 1))
            return self.showMessage(panel.describe_error(exc))
        if now:  # a result exists: the click corrects it at once
            self.runCorrection(lambda state: corrections.update(state))
        self.updateCorrectButtons()

    def onCursorMoved(self, caller, event):
        if self.logic.corrections.tool is None or not self.ui.correctCollapsibleButton.visible:
            return
        ras = [0.0, 0.0, 0.0]
        if caller.GetCursorPositionRAS(ras):
            self.ui.nextClickLabel.text = self.logic.corrections.hint(ras)

    # ---- runs ----
    def runCorrection(self, call):
        self.showMessage(None)
        try:
            call(self.panelState())
        except BiomedSegError as exc:
            return self.showMessage(panel.describe_error(exc))
        self.ui.progressBar.setRange(0, 0)
        self.ui.statusLabel.text = "Starting\u2026"
        self.timer.start()
        self.updateButtons()

    def onPropagate(self):
        try:
            self.beginCorrection()
        except BiomedSegError as exc:
            return self.showMessage(panel.describe_error(exc))
        self.runCorrection(lambda state: self.logic.corrections.propagate(state, self.correctRange()))

    def onRefine(self):
        p = self._parameterNode
        segmentId = self.ui.correctSegmentComboBox.currentData
        self.runCorrection(lambda state: self.logic.corrections.refine(state, p.inputVolume, p.outputSegmentation,
                                                                       segmentId, self.correctRange()))

    def onCorrectionFinished(self, outcome):
        """Called by the module's timer when a run ends; a correction's clicks made meanwhile run next."""
        if not isinstance(outcome, panel.CorrectionOutcome):
            return self.updateCorrectSection()
        self.ui.correctStatusLabel.text = outcome.summary
        current = self.logic.corrections.current
        self.fillCorrectSegments(select=current.segment_id if current is not None else None)
        if self.logic.corrections.needs_update:
            self.runCorrection(lambda state: self.logic.corrections.update(state))
        self.updateCorrectButtons()

    def onCorrectUndo(self):
        try:
            self.ui.correctStatusLabel.text = self.logic.corrections.undo()
        except BiomedSegError as exc:
            self.showMessage(panel.describe_error(exc))
        self.fillCorrectSegments()
        self.updateCorrectButtons()

    def onClearPrompts(self):
        self.stopPlacing()
        self.logic.corrections.clear()
        self.ui.correctStatusLabel.text = "Started over: the boxes and clicks are gone; the segments are as they are."
        self.updateCorrectButtons()

    def forgetCorrections(self):
        self.logic.corrections.forget()
        self._correctNodes = {}

    def updateCorrectButtons(self):
        if not self.ui.correctCollapsibleButton.visible or self.logic is None:
            return
        p, corrections = self._parameterNode, self.logic.corrections
        idle = not self.logic.controller.running and not self.logic.installs.busy
        ready = idle and p is not None and p.inputVolume is not None
        self.ui.propagateButton.enabled = ready
        self.ui.refineButton.enabled = ready and bool(self.ui.correctSegmentComboBox.currentData)
        self.ui.correctUndoButton.enabled = idle and corrections.can_undo
        self.ui.clearPromptsButton.enabled = idle and corrections.current is not None
        for buttonName in TOOL_BUTTONS.values():
            getattr(self.ui, buttonName).enabled = p is not None and p.inputVolume is not None
        self.ui.nextClickLabel.text = corrections.hint()
        try:
            rules = slicer_bridge.editor_rules(slicer.mrmlScene)
            self.ui.correctRulesLabel.text = slicer_bridge.describe_rules(rules, p.outputSegmentation if p else None)
        except BiomedSegError as exc:
            self.ui.correctRulesLabel.text = str(exc)
