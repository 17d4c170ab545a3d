"""BiomedCLIP in Slicer: the "Recognised: ..." line, the prompt warning, Find slices and Suggest key slice;
a mixin of the module's widget.

Every decision (when BiomedCLIP is ready, what is sent, the one worker session per volume, how its
answer merges with the DICOM tags, the warning text, the best slice and its centre) is
``biomedseg.panel.RecognitionController``'s; this only calls it from the widgets' signals, polls it
on its own timer (the module's timer and progress bar stay the Segment run's) and moves the slice
views to the slice it names.
"""
from dataclasses import replace

import qt
import slicer

from biomedseg import panel
from biomedseg.errors import BiomedSegError

POLL_MS = 150
WARNING_STYLE = "color: #c25e00;"  # orange: a warning, not an error
RECOGNIZED_STYLE = "color: palette(mid);"


class RecognizeSection:
    """Needs the widget's ``ui``, ``logic`` (``controller``), ``_parameterNode``, ``_choices``, ``panelState``,
    ``showModelView``, ``showMessage`` and VTK observations."""

    def setupRecognizeSection(self):
        self.recognizer = panel.RecognitionController(self.logic.controller)
        self._recognizedFrom = None  # (volume ID, modality, site) when the recognition was asked for
        self._volumeGuess = None  # (input volume, its tag and rule guess)
        self._recognizeTimer = qt.QTimer()
        self._recognizeTimer.setInterval(POLL_MS)
        self._recognizeTimer.connect("timeout()", self.onRecognizeTimer)
        self.ui.findSlicesButton.connect("clicked(bool)", lambda _=None: self.onFindSlices())
        self.ui.suggestKeySliceButton.connect("clicked(bool)", lambda _=None: self.onSuggestKeySlice())
        self.ui.promptsLineEdit.connect("textChanged(QString)", lambda _: self.scheduleCheck())
        for combo in (self.ui.modalityComboBox, self.ui.siteComboBox):
            combo.connect("currentTextChanged(QString)", lambda _: self.scheduleCheck())
        self.ui.modelComboBox.connect("currentIndexChanged(int)", lambda _: self.scheduleCheck())
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                            lambda node: node is None and self.recognizeVolume(None, None))
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onRecognizeSceneClose)
        self.ui.recognizedLabel.styleSheet = RECOGNIZED_STYLE
        self.ui.promptWarningLabel.styleSheet = WARNING_STYLE
        self.showRecognized("")
        self.showPromptWarning()

    def closeRecognition(self):
        self._recognizeTimer.stop()
        self.recognizer.close()

    def onRecognizeSceneClose(self, caller=None, event=None):
        self._recognizeTimer.stop()
        self.recognizer.forget()
        self.showRecognized("")
        self.showPromptWarning()

    # ---- state ----
    def clipState(self):
        """The panel state as the widgets show it now (the parameter node may lag behind a signal)."""
        return replace(self.panelState(), prompts=panel.parse_prompts(self.ui.promptsLineEdit.text),
                       modality=self.ui.modalityComboBox.currentText, site=self.ui.siteComboBox.currentText)

    def updateRecognizeWidgets(self):
        if self._parameterNode is None:
            return
        self.recognizer.set_choices(self._choices)
        state = self.clipState()
        ready = self.recognizer.is_ready(state) and self._parameterNode.inputVolume is not None
        why = self.recognizer.why_not_ready() or "Choose an input volume first."
        self.ui.findSlicesButton.enabled = ready and bool(state.prompts)
        self.ui.findSlicesButton.toolTip = ("Go to the slice most likely to show the first prompt (BiomedCLIP)."
                                            if ready else why)
        self.ui.suggestKeySliceButton.enabled = ready
        self.ui.suggestKeySliceButton.toolTip = ("Go to the slice most likely to show this segment (BiomedCLIP): "
                                                 "draw the box there." if ready else why)
        self.maybeRecognize()

    def startRecognizeTimer(self):
        if not self._recognizeTimer.isActive():
            self._recognizeTimer.start()

    # ---- recognise, check ----
    def recognizeVolume(self, node, guess):
        """Called when the input volume changes, after the tag and rule guess is shown."""
        self._volumeGuess = (node, guess) if node is not None else None
        self._recognizedFrom = None
        self.showRecognized("")
        self.updateRecognizeWidgets()  # recognises it when BiomedCLIP is ready
        self.scheduleCheck()

    def maybeRecognize(self):
        """Recognise the input volume once, as soon as BiomedCLIP is ready (the model list may come later)."""
        p, found = self._parameterNode, getattr(self, "_volumeGuess", None)
        if p is None or found is None or found[0] is not p.inputVolume or self._recognizedFrom is not None:
            return
        node, guess = found
        if self.recognizer.recognize(self.clipState(), node, guess):
            self._recognizedFrom = (node.GetID(), p.modality, p.site)
            self.showRecognized("Recognising the image with BiomedCLIP\u2026")
            self.startRecognizeTimer()

    def scheduleCheck(self):
        p = self._parameterNode
        if p is None:
            return
        self.recognizer.set_choices(self._choices)
        if self.recognizer.check(self.clipState(), p.inputVolume):
            self.startRecognizeTimer()
        self.showPromptWarning()
        self.updateRecognizeWidgets()

    def showRecognized(self, text, tooltip=""):
        self.ui.recognizedLabel.text = text
        self.ui.recognizedLabel.toolTip = tooltip
        self.ui.recognizedLabel.visible = bool(text)

    def showPromptWarning(self):
        text = self.recognizer.warning
        self.ui.promptWarningLabel.text = "\u26a0 " + text if text else ""
        self.ui.promptWarningLabel.visible = bool(text)

    # ---- rank ----
    def onFindSlices(self):
        p = self._parameterNode
        try:
            self.recognizer.rank(self.clipState(), p.inputVolume if p else None)
        except BiomedSegError as exc:
            return self.showMessage(panel.describe_error(exc))
        slicer.util.showStatusMessage("Ranking the slices with BiomedCLIP\u2026", 3000)
        self.startRecognizeTimer()

    def onSuggestKeySlice(self):
        p, combo = self._parameterNode, self.ui.correctSegmentComboBox
        name = combo.currentText if combo.currentData else ""  # a new segment: the first prompt
        try:
            self.recognizer.suggest_key_slice(self.clipState(), p.inputVolume if p else None, name)
        except BiomedSegError as exc:
            return self.showMessage(panel.describe_error(exc))
        self.ui.correctStatusLabel.text = "Finding the key slice with BiomedCLIP\u2026"
        self.startRecognizeTimer()

    def jumpToSlice(self, outcome):
        """All slice views through the slice's centre (the views of the ranked plane show that slice)."""
        slicer.util.setSliceViewerLayers(background=outcome.volume_node, fit=False)
        slicer.modules.markups.logic().JumpSlicesToLocation(*outcome.ras, True)

    # ---- results ----
    def onRecognizeTimer(self):
        outcome = self.recognizer.poll()
        if outcome is not None:
            self.showClipOutcome(outcome)
        if not self.recognizer.busy:
            self._recognizeTimer.stop()
        return outcome

    def showClipOutcome(self, outcome):
        p = self._parameterNode
        current = p is not None and outcome.volume_node is p.inputVolume
        if outcome.kind == "recognize" and current:
            if outcome.state != "done":
                return self.showRecognized(outcome.summary)
            rec = outcome.recognition
            self.showRecognized(outcome.guess.line, "; ".join(
                f"{family}: " + ", ".join(f"{name} {score:.0%}" for name, score in ranked[:3])
                for family, ranked in rec.scores.items()))
            if self._recognizedFrom == (outcome.volume_node.GetID(), p.modality, p.site):  # not changed meanwhile
                p.modality, p.site = outcome.panel_state.modality, outcome.panel_state.site
                self.showModelView(modalities=True)
            self.scheduleCheck()  # the alternatives follow the modality and site
        elif outcome.kind == "check":
            self.showPromptWarning()
            if outcome.state == "failed":
                print(outcome.summary)  # a background check that failed blocks nothing
        elif outcome.kind == "rank":
            if outcome.state != "done":
                return self.showMessage(outcome.message) if outcome.message is not None else None
            if current:
                self.jumpToSlice(outcome)
            if outcome.purpose == "key slice":
                self.ui.correctStatusLabel.text = outcome.summary + " Draw the box there (D)."
            else:
                slicer.util.showStatusMessage(outcome.summary, 8000)
                if not self.logic.controller.running:
                    self.ui.statusLabel.text = outcome.summary
