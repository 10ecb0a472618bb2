"""CRADL Anomaly: unsupervised anomaly detection and localization in brain MRI, as a Slicer module.

Thin by design: the widget binds controls to a parameter node and calls the logic; the logic is a
shell over ``CRADLAnomalyLib`` (scene bridge, tested against a real MRML scene) and ``cradl``
(the core). Nothing here computes.
"""
import importlib.util
import json
import logging
import os

import ctk
import qt
import vtk

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

# Python packages the core needs beyond what Slicer ships (numpy, SimpleITK are in Slicer).
# torch is installed through the PyTorchUtils extension when present (it picks the right CUDA/CPU
# build), otherwise with pip at the pinned version.
TORCH_REQUIREMENT = "torch==2.13.0"
PIP_REQUIREMENTS = {"scipy": "scipy==1.17.1"}

BATCH_EXAMPLE = """\
import CRADLAnomaly, glob
logic = CRADLAnomaly.CRADLAnomalyLogic()
# One volume already in the scene: heatmap node (shown over the input) and the report (dict)
heatmapNode, report = logic.process(slicer.util.getNode("MRHead"))
print(report["volume_percentile"], report["regions"][:3])
# Many files without the GUI: heatmap, region label map and JSON report per input
summary = logic.processFiles(glob.glob("/data/scans/*.nii.gz"), "/data/cradl_out")
"""


#
# CRADLAnomaly
#

class CRADLAnomaly(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CRADL Anomaly"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["CRADL Anomaly project contributors"]
        self.parent.helpText = f"""
<p>Finds and localizes anomalies in brain MRI without any annotated abnormal training data, with
<b>CRADL</b> (contrastive representations of normal slices modelled by a Gaussian mixture; the
heatmap is the gradient of the anomaly score with respect to the image).</p>
<p>Select a brain MRI and click <b>Detect anomalies</b>. The heatmap is shown over the scan in all
slice views; the whole-scan score is compared with the model's normal reference scans. Review the
per-slice score plot (click a point to jump there) and the ranked regions (select a row to centre
the views), turn the regions into a segmentation for Segment Editor, and save the results.</p>
<p>Batch mode from the Python console:</p><pre>{BATCH_EXAMPLE}</pre>
<p>This is a research tool, not a medical device: it flags what differs from the normal scans the
model learned, which is not a diagnosis.</p>
<p>See the <a href="https://github.com/cradl-anomaly/SlicerCRADLAnomaly">extension documentation</a>.</p>
"""
        self.parent.acknowledgementText = """
Method: Lüth C. T., Zimmerer D., Koehler G., Jaeger P. F., Isensee F., Petersen J., Maier-Hein K. H.:
"CRADL: Contrastive Representations for Unsupervised Anomaly Detection and Localization",
arXiv:2301.02126 (2023). Please cite it if you use this module in your research.
The default model was trained on synthetic normal brains derived from the MNI152 2009a template.
"""


#
# CRADLAnomalyWidget
#

class CRADLAnomalyWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUIFromParameterNode = False
        self._running = False
        self._cancelRequested = False
        self._plotView = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CRADLAnomaly.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = CRADLAnomalyLogic()

        self.ui.deviceComboBox.addItem("Auto (GPU if available)", "auto")
        self.ui.deviceComboBox.addItem("CPU", "cpu")
        self.ui.deviceComboBox.addItem("GPU (CUDA)", "cuda")
        self.ui.progressBar.setVisible(False)
        self.ui.regionTableView.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        self.ui.outputDirectoryButton.directory = qt.QDir.homePath()
        self._drawLegend()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # GUI -> parameter node
        self.ui.inputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.maskSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.opacitySlider.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.thresholdSlider.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.outputDirectoryButton.connect("directoryChanged(QString)", self.updateParameterNodeFromGUI)

        # Actions
        self.ui.detectButton.connect("clicked(bool)", self.onDetectButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.resetThresholdButton.connect("clicked(bool)", self.onResetThreshold)
        self.ui.showPlotButton.connect("clicked(bool)", self.onShowPlot)
        self.ui.nextRegionButton.connect("clicked(bool)", self.onNextRegion)
        self.ui.createSegmentationButton.connect("clicked(bool)", self.onCreateSegmentation)
        self.ui.saveButton.connect("clicked(bool)", self.onSaveResults)
        self.ui.regionTableView.connect("selectionChanged()", self.onRegionSelected)

        self.initializeParameterNode()
        self.onModelPathChanged(self.ui.modelPathLineEdit.currentPath)

    def cleanup(self):
        self._cancelRequested = True
        self.removeObservers()
        self._disconnectPlotView()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ---------------------------------------------------------------- parameter node
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.GetNodeReference("InputVolume"):
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode") \
                    and not firstVolumeNode.GetAttribute("CRADL.Role"):
                self._parameterNode.SetNodeReferenceID("InputVolume", firstVolumeNode.GetID())

    def setParameterNode(self, inputParameterNode):
        if inputParameterNode:
            self.logic.setDefaultParameters(inputParameterNode)
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode is not None:
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        self._updatingGUIFromParameterNode = True
        try:
            p = self._parameterNode
            inputNode = p.GetNodeReference("InputVolume")
            self.ui.inputSelector.setCurrentNode(inputNode)
            self.ui.maskSelector.setCurrentNode(p.GetNodeReference("MaskNode"))
            if self.ui.modelPathLineEdit.currentPath != p.GetParameter("ModelPath"):
                self.ui.modelPathLineEdit.currentPath = p.GetParameter("ModelPath")
            index = self.ui.deviceComboBox.findData(p.GetParameter("Device"))
            self.ui.deviceComboBox.setCurrentIndex(max(index, 0))
            self.ui.opacitySlider.value = float(p.GetParameter("Opacity"))
            if p.GetParameter("OutputDirectory"):
                self.ui.outputDirectoryButton.directory = p.GetParameter("OutputDirectory")

            self.ui.detectButton.enabled = inputNode is not None and not self._running
            self.ui.detectButton.toolTip = ("Find what differs from normal brains in the input volume."
                                            if inputNode else "Select an input volume first.")
            self._updateResultSection(inputNode)
        finally:
            self._updatingGUIFromParameterNode = False

    def updateParameterNodeFromGUI(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        wasModified = self._parameterNode.StartModify()
        self._parameterNode.SetNodeReferenceID("InputVolume", self.ui.inputSelector.currentNodeID)
        self._parameterNode.SetNodeReferenceID("MaskNode", self.ui.maskSelector.currentNodeID)
        self._parameterNode.SetParameter("ModelPath", self.ui.modelPathLineEdit.currentPath)
        self._parameterNode.SetParameter("Device", self.ui.deviceComboBox.currentData or "auto")
        self._parameterNode.SetParameter("Opacity", str(self.ui.opacitySlider.value))
        self._parameterNode.SetParameter("OutputDirectory", self.ui.outputDirectoryButton.directory)
        self._parameterNode.EndModify(wasModified)

    # ---------------------------------------------------------------- result section
    def _currentResult(self):
        inputNode = self.ui.inputSelector.currentNode()
        if inputNode is None:
            return None, None, None
        heatmapNode = self.logic.heatmapNode(inputNode)
        return inputNode, heatmapNode, self.logic.report(inputNode) if heatmapNode else None

    def _updateResultSection(self, inputNode):
        import CRADLAnomalyLib as lib

        heatmapNode = self.logic.heatmapNode(inputNode) if inputNode else None
        report = self.logic.report(inputNode) if heatmapNode else None
        hasResult = heatmapNode is not None and report is not None
        self.ui.resultsCollapsibleButton.enabled = hasResult
        self.ui.reviewCollapsibleButton.enabled = hasResult
        if not hasResult:
            self.ui.summaryLabel.text = "Run detection to see the result."
            self.ui.regionTableView.setMRMLTableNode(None)
            return
        self.ui.summaryLabel.text = lib.summarize(report)
        displayMax = lib.heatmapDisplayMax(heatmapNode)
        wasBlocked = self.ui.thresholdSlider.blockSignals(True)
        self.ui.thresholdSlider.maximum = displayMax
        self.ui.thresholdSlider.singleStep = displayMax / 200.0
        self.ui.thresholdSlider.value = lib.heatmapThreshold(heatmapNode)
        self.ui.thresholdSlider.blockSignals(wasBlocked)
        self.ui.legendMinLabel.text = "0"
        self.ui.legendMaxLabel.text = f"{displayMax:.3g}"
        regionTable = lib.findResultNode(slicer.mrmlScene, inputNode, lib.nodes.REGION_TABLE)
        if self.ui.regionTableView.mrmlTableNode() is not regionTable:
            self.ui.regionTableView.setMRMLTableNode(regionTable)
        self.ui.nextRegionButton.enabled = regionTable is not None and regionTable.GetNumberOfRows() > 0

    def _drawLegend(self):
        import CRADLAnomalyLib as lib

        bar = lib.legendImage(height=256, width=1, background=(40, 40, 40))[::-1, 0, :]  # low -> high
        image = qt.QImage(bar.shape[0], 1, qt.QImage.Format_RGB32)
        for x, (r, g, b) in enumerate(bar):
            image.setPixel(x, 0, qt.qRgb(int(r), int(g), int(b)))
        self.ui.legendLabel.setPixmap(qt.QPixmap.fromImage(image))

    # ---------------------------------------------------------------- model
    def onModelPathChanged(self, path=None):
        self.updateParameterNodeFromGUI()
        try:
            info = self.logic.modelInfo(self.ui.modelPathLineEdit.currentPath or None)
        except Exception as error:  # noqa: BLE001 - shown, not raised
            self.ui.modelInfoLabel.text = f"<span style='color:#c0392b'>{error}</span>"
            return
        if info is None:
            self.ui.modelInfoLabel.text = "Bundled default model (details appear once PyTorch is installed)."
            return
        training = info.get("training") or {}
        trainingText = training if isinstance(training, str) else ", ".join(
            f"{k}: {v}" for k, v in list(training.items())[:6])
        self.ui.modelInfoLabel.text = (f"<b>{info.get('name', '?')}</b> v{info.get('version', '?')}<br>"
                                       f"{info.get('description', '')}<br><small>{trainingText}</small>")

    # ---------------------------------------------------------------- detection
    def onDetectButton(self):
        inputNode = self.ui.inputSelector.currentNode()
        if inputNode is None or self._running:
            return
        try:
            if not self.logic.setupPythonRequirements(askConfirmation=True):
                return
        except Exception as error:  # noqa: BLE001
            slicer.util.errorDisplay(f"Could not install the required Python packages:\n{error}",
                                     detailedText=_traceback())
            return
        self._setRunning(True)
        try:
            with slicer.util.WaitCursor():
                self.logic.process(inputNode, maskNode=self.ui.maskSelector.currentNode(),
                                   modelPath=self.ui.modelPathLineEdit.currentPath or None,
                                   device=self.ui.deviceComboBox.currentData or "auto",
                                   progress=self._onProgress, cancel=lambda: self._cancelRequested,
                                   opacity=self.ui.opacitySlider.value)
            self.ui.statusLabel.text = "Done."
        except Exception as error:  # noqa: BLE001 - every failure is shown in a dialog
            if type(error).__name__ == "DetectionCancelled":
                self.ui.statusLabel.text = "Cancelled; the scene is as it was before."
            else:
                self.ui.statusLabel.text = "Failed."
                slicer.util.errorDisplay(f"Anomaly detection failed:\n{_userMessage(error)}",
                                         detailedText=_traceback())
        finally:
            self._setRunning(False)
            self.updateGUIFromParameterNode()

    def _setRunning(self, running):
        self._running = running
        self._cancelRequested = False
        self.ui.progressBar.setVisible(running)
        self.ui.progressBar.value = 0
        self.ui.cancelButton.enabled = running
        self.ui.detectButton.enabled = not running
        self.ui.inputsCollapsibleButton.enabled = not running
        if running:
            self.ui.statusLabel.text = "Starting..."

    def _onProgress(self, fraction, message=""):
        """Called by the core between chunks of work: update and keep the GUI responsive."""
        self.ui.progressBar.value = int(round(100 * float(fraction)))
        self.ui.statusLabel.text = message
        slicer.app.processEvents()

    def onCancelButton(self):
        self._cancelRequested = True
        self.ui.statusLabel.text = "Cancelling..."

    # ---------------------------------------------------------------- review
    def onOpacityChanged(self, value):
        self.updateParameterNodeFromGUI()
        inputNode, heatmapNode, _ = self._currentResult()
        if heatmapNode is not None:
            self.logic.setOpacity(heatmapNode, value)

    def onThresholdChanged(self, value):
        inputNode, heatmapNode, _ = self._currentResult()
        if heatmapNode is not None:
            self.logic.setThreshold(heatmapNode, value)

    def onResetThreshold(self):
        inputNode, heatmapNode, _ = self._currentResult()
        if heatmapNode is not None:
            self.logic.resetThreshold(heatmapNode)
            self.updateGUIFromParameterNode()

    def onShowPlot(self):
        inputNode, heatmapNode, _ = self._currentResult()
        if heatmapNode is None:
            return
        self.logic.showSliceScorePlot(inputNode)
        self._connectPlotView()

    def _connectPlotView(self):
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None or layoutManager.plotViewCount == 0:
            return
        plotView = layoutManager.plotWidget(0).plotView()
        if plotView is not self._plotView:
            self._disconnectPlotView()
            plotView.connect("dataSelected(vtkStringArray*, vtkCollection*)", self.onPlotDataSelected)
            self._plotView = plotView

    def _disconnectPlotView(self):
        if self._plotView is not None:
            self._plotView.disconnect("dataSelected(vtkStringArray*, vtkCollection*)", self.onPlotDataSelected)
            self._plotView = None

    def onPlotDataSelected(self, seriesIds, selectionCollection):
        """Clicking a slice in the plot jumps every view to that slice."""
        inputNode = self.ui.inputSelector.currentNode()
        if inputNode is None:
            return
        for i in range(selectionCollection.GetNumberOfItems()):
            selection = selectionCollection.GetItemAsObject(i)
            if selection is not None and selection.GetNumberOfTuples() > 0:
                self.logic.jumpToSlice(inputNode, int(selection.GetValue(0)))
                return

    def onRegionSelected(self):
        inputNode = self.ui.inputSelector.currentNode()
        row = self.ui.regionTableView.currentIndex().row()
        if inputNode is not None and row >= 0:
            self.logic.jumpToRegion(inputNode, row)

    def onNextRegion(self):
        inputNode = self.ui.inputSelector.currentNode()
        if inputNode is None:
            return
        current = self.ui.regionTableView.currentIndex().row()
        row = self.logic.nextRegionRow(inputNode, current if current >= 0 else None)
        if row is not None:
            self.ui.regionTableView.selectRow(row)  # triggers onRegionSelected
            self.logic.jumpToRegion(inputNode, row)

    def onCreateSegmentation(self):
        inputNode = self.ui.inputSelector.currentNode()
        with slicer.util.tryWithErrorDisplay("Could not create the segmentation.", waitCursor=True):
            segmentationNode = self.logic.createSegmentation(inputNode, threshold=self.ui.thresholdSlider.value)
            count = segmentationNode.GetSegmentation().GetNumberOfSegments()
            self.ui.statusLabel.text = (f"Segmentation \"{segmentationNode.GetName()}\" with {count} region(s); "
                                        "refine it in Segment Editor.")

    def onSaveResults(self):
        inputNode = self.ui.inputSelector.currentNode()
        outputDir = self.ui.outputDirectoryButton.directory
        with slicer.util.tryWithErrorDisplay("Could not save the results.", waitCursor=True):
            paths = self.logic.saveResults(inputNode, outputDir)
            self.ui.statusLabel.text = "Saved: " + ", ".join(os.path.basename(p) for p in paths.values())


def _traceback():
    import traceback
    return traceback.format_exc()


def _userMessage(error):
    """The core's and the bridge's errors carry a message for the user; others get their type too."""
    names = {cls.__name__ for cls in type(error).__mro__}
    if names & {"CradlError", "BridgeError"}:
        return str(error)
    return f"{type(error).__name__}: {error}"


#
# CRADLAnomalyLogic
#

class CRADLAnomalyLogic(ScriptedLoadableModuleLogic):
    """Batch-usable logic (see the module help for a console example). A shell over CRADLAnomalyLib:
    the scene code lives there, where it is tested against a real MRML scene."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._detectors = {}

    def setDefaultParameters(self, parameterNode):
        defaults = {"ModelPath": "", "Device": "auto", "Opacity": "0.6", "OutputDirectory": ""}
        for name, value in defaults.items():
            if not parameterNode.GetParameter(name):
                parameterNode.SetParameter(name, value)

    # ---------------------------------------------------------------- dependencies
    @staticmethod
    def missingRequirements():
        missing = []
        if importlib.util.find_spec("torch") is None:
            missing.append(TORCH_REQUIREMENT)
        missing += [req for module, req in PIP_REQUIREMENTS.items() if importlib.util.find_spec(module) is None]
        return missing

    def setupPythonRequirements(self, askConfirmation=True):
        """Install missing packages after asking. Returns False if the user declined."""
        missing = self.missingRequirements()
        if not missing:
            return True
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                "CRADL Anomaly needs these Python packages, which are not installed yet:\n\n  "
                + "\n  ".join(missing) + "\n\nInstall them now? This can take several minutes "
                "(PyTorch is large); Slicer may need a restart afterwards.",
                windowTitle="Install dependencies"):
            return False
        if TORCH_REQUIREMENT in missing:
            try:
                import PyTorchUtils  # the PyTorch extension picks the right build for this computer
            except ModuleNotFoundError:
                PyTorchUtils = None
            if PyTorchUtils is not None:
                torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                                      torchVersionRequirement=">=2.0")
                if torch is None:
                    raise RuntimeError("PyTorch could not be installed by the PyTorch extension.")
            else:
                slicer.util.pip_install(TORCH_REQUIREMENT)
            missing.remove(TORCH_REQUIREMENT)
        if missing:
            slicer.util.pip_install(" ".join(missing))
        return True

    # ---------------------------------------------------------------- model
    @staticmethod
    def defaultModelPath():
        return os.path.join(os.path.dirname(__file__), "Resources", "Models", "cradl_default.cradl")

    def loadDetector(self, modelPath=None, device="auto"):
        """The core's detector, cached per (model file, device)."""
        from cradl import AnomalyDetector

        path = os.path.abspath(modelPath) if modelPath else self.defaultModelPath()
        key = (path, device, os.path.getmtime(path) if os.path.exists(path) else None)
        if key not in self._detectors:
            self._detectors = {key: AnomalyDetector.load(path, device=device)}  # keep one model in memory
        return self._detectors[key]

    def modelInfo(self, modelPath=None):
        """Name, version, description and training recipe of a model; None if PyTorch is missing."""
        if self.missingRequirements():
            return None
        return self.loadDetector(modelPath, "cpu").info

    # ---------------------------------------------------------------- processing
    def process(self, volumeNode, maskNode=None, modelPath=None, device="auto", progress=None, cancel=None,
                showResult=True, opacity=None):
        """Detect anomalies in ``volumeNode``. Returns (heatmap volume node, report dict).

        Re-running on the same volume replaces its previous results; the volume itself is never
        modified; on an error or a cancel the scene is left as it was."""
        import CRADLAnomalyLib as lib

        detector = self.loadDetector(modelPath, device)
        result = lib.detectVolumeNode(slicer.mrmlScene, detector, volumeNode, maskNode=maskNode,
                                      progress=progress, cancel=cancel, show=showResult,
                                      opacity=lib.DEFAULT_OPACITY if opacity is None else opacity)
        if showResult:
            lib.addColorLegend(result.heatmapNode)
        return result.heatmapNode, result.report

    def processFiles(self, paths, outputDir, modelPath=None, device="auto", progress=None, cancel=None):
        """Batch mode without the scene: heatmap, region label map and report for each input file
        (NIfTI, NRRD, MHA or a DICOM folder) in ``outputDir``. Returns a summary list."""
        import CRADLAnomalyLib as lib

        detector = self.loadDetector(modelPath, device)
        return lib.processFiles(detector, paths, outputDir, progress=progress, cancel=cancel)

    # ---------------------------------------------------------------- review helpers
    def heatmapNode(self, volumeNode):
        import CRADLAnomalyLib as lib
        return lib.findResultNode(slicer.mrmlScene, volumeNode, lib.nodes.HEATMAP)

    def report(self, volumeNode):
        import CRADLAnomalyLib as lib
        return lib.reportOf(slicer.mrmlScene, volumeNode)

    def setOpacity(self, heatmapNode, opacity):
        import CRADLAnomalyLib as lib
        lib.setOverlayOpacity(slicer.mrmlScene, opacity, heatmapNode)

    def setThreshold(self, heatmapNode, threshold):
        import CRADLAnomalyLib as lib
        lib.setHeatmapThreshold(heatmapNode, threshold)

    def resetThreshold(self, heatmapNode):
        import CRADLAnomalyLib as lib
        calibrated = lib.calibratedThreshold(heatmapNode)
        if calibrated is not None:
            lib.setHeatmapThreshold(heatmapNode, calibrated)

    def showSliceScorePlot(self, volumeNode):
        import CRADLAnomalyLib as lib
        chart = lib.findResultNode(slicer.mrmlScene, volumeNode, lib.nodes.SLICE_CHART)
        if chart is not None:
            slicer.modules.plots.logic().ShowChartInLayout(chart)
        return chart

    def jumpToSlice(self, volumeNode, row):
        import CRADLAnomalyLib as lib
        table = lib.findResultNode(slicer.mrmlScene, volumeNode, lib.nodes.SLICE_TABLE)
        lib.jumpSlicesToRAS(slicer.mrmlScene, lib.sliceCentre(table, row), centered=False)

    def jumpToRegion(self, volumeNode, row):
        import CRADLAnomalyLib as lib
        table = lib.findResultNode(slicer.mrmlScene, volumeNode, lib.nodes.REGION_TABLE)
        if table is not None and 0 <= row < table.GetNumberOfRows():
            lib.jumpSlicesToRAS(slicer.mrmlScene, lib.regionCentre(table, row), centered=True)

    def nextRegionRow(self, volumeNode, currentRow):
        import CRADLAnomalyLib as lib
        table = lib.findResultNode(slicer.mrmlScene, volumeNode, lib.nodes.REGION_TABLE)
        return lib.nextRegionRow(table, currentRow) if table is not None else None

    def createSegmentation(self, volumeNode, threshold=None):
        import CRADLAnomalyLib as lib
        heatmapNode = self.heatmapNode(volumeNode)
        if heatmapNode is None:
            raise lib.BridgeError("Run detection first.")
        threshold = lib.heatmapThreshold(heatmapNode) if threshold is None else threshold
        minVolume = float((self.report(volumeNode) or {}).get("min_region_mm3", 0.0))
        return lib.createSegmentation(slicer.mrmlScene, volumeNode, heatmapNode, threshold, minVolumeMm3=minVolume)

    def saveResults(self, volumeNode, outputDir):
        import CRADLAnomalyLib as lib
        return lib.saveSceneResults(slicer.mrmlScene, volumeNode, outputDir)


#
# CRADLAnomalyTest
#

class CRADLAnomalyTest(ScriptedLoadableModuleTest):
    """The whole flow inside Slicer: generated sample scan, detect, checks on the result nodes,
    re-run, segmentation, saving, batch mode. Needs the bundled model and PyTorch."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_CRADLAnomaly_fullFlow()

    def test_CRADLAnomaly_fullFlow(self):
        import tempfile

        import numpy as np
        import SimpleITK as sitk

        import CRADLAnomalyLib as lib
        from CRADLAnomalyLib.sample import sampleScan

        logic = CRADLAnomalyLogic()
        if logic.missingRequirements():
            self.delayDisplay("Skipped: install the dependencies (PyTorch) from the module panel first.")
            return
        self.delayDisplay("Generating a sample scan (template with an inserted lesion, oblique grid)")
        detector = logic.loadDetector(device="cpu")
        image, _ = sampleScan(detector.space.template)
        volumeNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CRADL sample")
        lib.updateVolumeNodeFromImage(volumeNode, image)
        volumeNode.CreateDefaultDisplayNodes()
        before = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)

        self.delayDisplay("Detecting")
        fractions = []
        heatmapNode, report = logic.process(volumeNode, device="cpu",
                                            progress=lambda f, m: fractions.append(f))
        self.assertTrue(fractions and fractions[-1] == 1.0)
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(volumeNode), before))
        self.assertEqual(heatmapNode.GetImageData().GetDimensions(), volumeNode.GetImageData().GetDimensions())
        self.assertTrue(np.allclose(lib.ijkToRasArray(heatmapNode), lib.ijkToRasArray(volumeNode)))
        for key in ("volume_score", "volume_percentile", "slice_scores", "regions", "model"):
            self.assertIn(key, report)
        composite = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
        self.assertEqual(composite.GetForegroundVolumeID(), heatmapNode.GetID())
        self.assertEqual(composite.GetBackgroundVolumeID(), volumeNode.GetID())
        regionTable = lib.findResultNode(slicer.mrmlScene, volumeNode, lib.nodes.REGION_TABLE)
        self.assertEqual(regionTable.GetNumberOfRows(), len(report["regions"]))

        self.delayDisplay("Re-running replaces the previous result")
        count = slicer.mrmlScene.GetNumberOfNodes()
        heatmapNode2, _ = logic.process(volumeNode, device="cpu")
        self.assertEqual(heatmapNode2.GetID(), heatmapNode.GetID())
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)

        self.delayDisplay("Review: jump, segmentation, save")
        if regionTable.GetNumberOfRows():
            logic.jumpToRegion(volumeNode, 0)
        segmentationNode = logic.createSegmentation(volumeNode)
        self.assertEqual(segmentationNode.GetSegmentation().GetNumberOfSegments() > 0,
                         bool(np.any(slicer.util.arrayFromVolume(heatmapNode) > lib.heatmapThreshold(heatmapNode))))
        outputDir = tempfile.mkdtemp(prefix="cradl_test_")
        paths = logic.saveResults(volumeNode, outputDir)
        for path in paths.values():
            self.assertTrue(os.path.isfile(path))
        with open(paths["report"]) as f:
            self.assertIn("volume_percentile", json.load(f))

        self.delayDisplay("Batch mode")
        scanPath = os.path.join(outputDir, "sample.nii.gz")
        sitk.WriteImage(image, scanPath)
        summary = logic.processFiles([scanPath], os.path.join(outputDir, "batch"), device="cpu")
        self.assertTrue(summary[0]["ok"], summary)
        self.delayDisplay("Test passed")
