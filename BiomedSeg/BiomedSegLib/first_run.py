"""The panel's first-run installs and downloads as Slicer dialogs: a mixin of the module's widget.

Every decision (what to install where, which questions to ask, what to do when a plan ends) is
``biomedseg.panel.InstallFlow``'s; this only asks the questions with Slicer's dialogs, runs the
plan on the widget's timer and shows what it says.
"""
import slicer

from biomedseg.slicer_bridge import application as app


class FirstRunInstalls:
    """Needs the widget's ``ui``, ``logic``, ``timer``, ``_parameterNode``, ``currentChoice``, ``refreshModels``,
    ``showProgress``, ``showMessage``, ``updateButtons`` and ``_quiet``."""

    def installDependencies(self, engineOnly=False):
        p, choice = self._parameterNode, self.currentChoice()
        self.runOffer(self.logic.installs.dependencies_offer(
            choice.id if choice is not None and p is not None else None, p.workerPython if p else "", engineOnly))

    def downloadWeights(self):
        choice, p = self.currentChoice(), self._parameterNode
        if choice is not None and p is not None:
            self.runOffer(self.logic.installs.download_offer(choice.id, p.workerPython))

    def runOffer(self, offer):
        """Ask the offer's questions; on yes to all, run its plan in the background."""
        if offer is None:
            return
        for question in offer.questions:
            if not slicer.util.confirmOkCancelDisplay(question.text, windowTitle=offer.title):
                return self.logic.installs.declined(question)
        if offer.nothing_to_do:
            slicer.util.infoDisplay(offer.nothing_to_do)
            return self.refreshModels()
        self.logic.installs.start(offer)
        self.ui.progressBar.setRange(0, 0)
        self.timer.start()
        self.updateButtons()

    def onTaskTimer(self):
        result = self.logic.installs.poll(run_special=lambda step: app.install_torch_with_extension())
        self.showProgress(result.progress)
        end = result.finish
        if end is None:
            return
        self.timer.stop()
        if end.worker_python:  # the model now runs in the new environment
            self._parameterNode.workerPython = end.worker_python
            with self._quiet():
                self.ui.workerPythonPathLineEdit.currentPath = end.worker_python
        if end.refresh_models:
            self.refreshModels()
            self.ui.statusLabel.text = end.status
        choice = self.currentChoice()
        if end.pending is not None and choice is not None and choice.ready:
            end.pending()
        if end.message is not None:
            self.showMessage(end.message)
            print(end.log)
        self.updateButtons()
