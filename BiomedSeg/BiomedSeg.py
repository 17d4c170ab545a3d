"""3D Slicer module: BiomedSeg.

A thin view over the ``biomedseg`` engine (bundled next to this file). This release
registers the module and offers the engine's model list and a one-click run of the
offline default model; the full panel (prompts, background worker, cancel, undo,
export) builds on the same Logic.
"""
import os
import sys

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # the engine ships inside the module folder
    sys.path.insert(0, _HERE)


class BiomedSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "BiomedSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["BiomedSeg developers"]
        self.parent.helpText = (
            "Segment images with biomedical foundation models from a text prompt "
            "(BiomedParse, Hermes, deepbet, ...). Results become named, coloured segments "
            "that can be corrected in the Segment Editor and exported as labelmaps or DICOM SEG.")
        self.parent.acknowledgementText = (
            "Models are the work of their authors (see `biomedseg models` for references and licences). "
            "deepbet: Fisch et al. 2024 (MIT).")


class BiomedSegWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        import qt
        import slicer.qMRMLNodeComboBox  # noqa: F401  (available in Slicer)

        self.logic = BiomedSegLogic()
        form = qt.QFormLayout()
        self.layout.addLayout(form)
        self.volumeSelector = slicer.qMRMLNodeComboBox()
        self.volumeSelector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        self.volumeSelector.setMRMLScene(slicer.mrmlScene)
        form.addRow("Input volume:", self.volumeSelector)
        self.modelLabel = qt.QLabel(self.logic.modelSummary())
        self.modelLabel.wordWrap = True
        form.addRow("Models:", self.modelLabel)
        self.runButton = qt.QPushButton("Segment brain (deepbet, offline)")
        form.addRow(self.runButton)
        self.runButton.connect("clicked(bool)", self.onRun)
        self.layout.addStretch(1)

    def onRun(self):
        volume = self.volumeSelector.currentNode()
        if volume is None:
            slicer.util.errorDisplay("Select an input volume first.")
            return
        with slicer.util.tryWithErrorDisplay("Segmentation failed.", waitCursor=True):
            self.logic.segment(volume, "deepbet", ["brain"])


class BiomedSegLogic(ScriptedLoadableModuleLogic):
    """Glue between MRML nodes and the engine; no model code is imported at start-up."""

    def modelSummary(self):
        from biomedseg.catalog import load_catalog

        return "\n".join(f"{e.id}: {e.state()['state']}" for e in load_catalog())

    def segment(self, volumeNode, modelId, prompts, segmentationNode=None, mode="add"):
        from biomedseg import slicer_bridge
        from biomedseg.inference.runner import segment

        volume = slicer_bridge.volume_from_node(volumeNode)
        result = segment(volume, modelId, prompts)
        if segmentationNode is None:
            segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                                  f"{volumeNode.GetName()} {modelId}")
            segmentationNode.CreateDefaultDisplayNodes()
        slicer_bridge.write_segments(segmentationNode, volumeNode, result.segments, mode=mode)
        return segmentationNode, result


class BiomedSegTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_deepbet_on_sample()

    def test_deepbet_on_sample(self):
        import SampleData

        volumeNode = SampleData.downloadSample("MRHead")
        segmentationNode, result = BiomedSegLogic().segment(volumeNode, "deepbet", ["brain"])
        self.assertEqual(segmentationNode.GetSegmentation().GetNumberOfSegments(), 1)
        self.assertEqual(result.segments[0].name, "brain")
        self.assertGreater(int(result.segments[0].mask.sum()), 100000)
