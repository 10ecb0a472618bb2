"""CRADL Anomaly: unsupervised anomaly detection and localization in brain MRI, as a Slicer module.

Thin by design: the widget binds controls to a parameter node and calls the logic; the logic is a
shell over ``CRADLAnomalyLib`` (scene bridge, tested against a real MRML scene) and ``cradl``
(the core). Nothing here computes.
"""
import enum
import os
import pathlib
import shutil
import sys
import time
from typing import Annotated, Optional, Union
from unittest import SkipTest

import qt
import vtk

import slicer
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

# Supported: Slicer 5.8 and later (Python 3.9 in 5.8, 3.12 in 5.10). PyTorch comes from the PyTorch
# extension (EXTENSION_DEPENDS); numpy, scipy and SimpleITK are Slicer's own. See
# CRADLAnomalyLib/dependencies.py for the versions each supported Slicer ships.
SAMPLE_NAME = "MRHead"
POLL_INTERVAL_MS = 100

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
heatmap is the gradient of the anomaly score with respect to the image, times each voxel's difference
from the mean of the model's normal scans).</p>
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
# CRADLAnomalyParameterNode
#

class Device(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self):
        return {"auto": "Auto (GPU if available)", "cpu": "CPU", "cuda": "GPU (CUDA)"}[self.value]


@parameterNodeWrapper
class CRADLAnomalyParameterNode:
    """The panel's settings, saved with the scene. Each is bound to the widget whose
    "SlicerParameterName" property names it in the .ui (connectGui). The model path is kept here
    too but bound by hand: an empty path means the bundled model, which a Path cannot say."""

    inputVolume: vtkMRMLScalarVolumeNode
    maskNode: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode]
    modelPath: str = ""
    device: Device = Device.AUTO
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
    outputDirectory: pathlib.Path = pathlib.Path.home()


#
# CRADLAnomalyWidget
#

class CRADLAnomalyWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the controls to the parameter node and calls the logic; computes nothing.

    Detection runs in a worker process: a timer polls it, and the scene is updated here, on the
    main thread, when it ends. While it runs, every control that could change the scene is
    disabled; Cancel stops the worker at once."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._busy = False
        self._task = None
        self._infoJob = None
        self._plotView = None
        self._timer = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CRADLAnomaly.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = CRADLAnomalyLogic()

        self.ui.progressBar.setVisible(False)
        self.ui.regionTableView.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        self._drawLegend()

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._poll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self._hideResultsFromInputSelector)

        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.inputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._updateResultSection)
        self.ui.thresholdSlider.connect("valueChanged(double)", self.onThresholdChanged)

        self.ui.detectButton.connect("clicked(bool)", self.onDetectButton)
        self.ui.trySampleButton.connect("clicked(bool)", self.onTrySample)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.resetThresholdButton.connect("clicked(bool)", self.onResetThreshold)
        self.ui.showPlotButton.connect("clicked(bool)", self.onShowPlot)
        self.ui.nextRegionButton.connect("clicked(bool)", self.onNextRegion)
        self.ui.createSegmentationButton.connect("clicked(bool)", self.onCreateSegmentation)
        self.ui.saveButton.connect("clicked(bool)", self.onSaveResults)
        self.ui.regionTableView.connect("selectionChanged()", self.onRegionSelected)

        self.initializeParameterNode()
        self._showModelInfo()

    def cleanup(self):
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._infoJob is not None:
            self._infoJob.cancel()
            self._infoJob = None
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()
        self._disconnectPlotView()

    def enter(self):
        self.initializeParameterNode()
        self._hideResultsFromInputSelector()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        if self._task is not None:
            self.onCancelButton()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ---------------------------------------------------------------- parameter node
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = self.logic.firstInputCandidate()

    def setParameterNode(self, inputParameterNode: Optional[CRADLAnomalyParameterNode]):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            if self.ui.modelPathLineEdit.currentPath != self._parameterNode.modelPath:
                self.ui.modelPathLineEdit.currentPath = self._parameterNode.modelPath
        self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None):
        p = self._parameterNode
        inputNode = p.inputVolume if p else None
        self.ui.detectButton.enabled = inputNode is not None and not self._busy
        self.ui.detectButton.toolTip = ("Find what differs from normal brains in the input volume."
                                        if inputNode else "Select an input volume first.")
        if p and inputNode is not None:
            heatmapNode = self.logic.heatmapNode(inputNode)
            if heatmapNode is not None:
                self.logic.setOpacity(heatmapNode, p.opacity)
        self._updateResultSection()

    # ---------------------------------------------------------------- result section
    def _currentResult(self):
        inputNode = self._parameterNode.inputVolume if self._parameterNode else None
        heatmapNode = self.logic.heatmapNode(inputNode) if inputNode is not None else None
        return inputNode, heatmapNode

    def _updateResultSection(self, *unused):
        import CRADLAnomalyLib as lib

        inputNode, heatmapNode = self._currentResult()
        report = self.logic.report(inputNode) if heatmapNode is not None else None
        hasResult = report is not None
        self.ui.resultsCollapsibleButton.enabled = hasResult and not self._busy
        self.ui.reviewCollapsibleButton.enabled = hasResult and not self._busy
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
            # PythonQt wraps QColor but not the free function qRgb.
            image.setPixel(x, 0, qt.QColor(int(r), int(g), int(b)).rgb())
        self.ui.legendLabel.setPixmap(qt.QPixmap.fromImage(image))

    def _hideResultsFromInputSelector(self, *unused):
        """CRADL's own volumes (heatmaps) are results, not scans to check."""
        self.ui.inputSelector.sortFilterProxyModel().hiddenNodeIDs = self.logic.resultVolumeIDs()

    # ---------------------------------------------------------------- model
    def onModelPathChanged(self, path):
        if self._parameterNode is not None and self._parameterNode.modelPath != path:
            self._parameterNode.modelPath = path
        self._showModelInfo()

    def _showModelInfo(self):
        """The model's name and version, read in a worker process: opening the panel never waits."""
        if self._infoJob is not None:
            self._infoJob.cancel()
            self._infoJob = None
        if self.logic.missingRequirements():
            self.ui.modelInfoLabel.text = "Bundled default model (details appear once PyTorch is installed)."
            return
        try:
            self._infoJob = self.logic.startModelInfo(self.ui.modelPathLineEdit.currentPath or None)
        except Exception as error:  # noqa: BLE001 - shown, not raised
            self.ui.modelInfoLabel.text = f"<span style='color:#c0392b'>{_userMessage(error)}</span>"
            return
        self.ui.modelInfoLabel.text = "Reading the model..."
        self._timer.start()

    def _pollModelInfo(self):
        import CRADLAnomalyLib as lib

        job = self._infoJob
        if job is None or job.poll() == lib.RUNNING:
            return
        self._infoJob = None
        if job.state != lib.DONE:
            message = job.error or "Could not read the model."
            self.ui.modelInfoLabel.text = f"<span style='color:#c0392b'>{message}</span>"
            return
        info = job.result()
        training = info.get("training") or {}
        trainingText = training if isinstance(training, str) else ", ".join(
            f"{k}: {v}" for k, v in list(training.items())[:6] if not isinstance(v, (dict, list)))
        self.ui.modelInfoLabel.text = (f"<b>{info.get('name', '?')}</b> v{info.get('version', '?')}<br>"
                                       f"{info.get('description', '')}<br><small>{trainingText}</small>")
        if self.ui.modelPathLineEdit.currentPath:
            self.ui.modelPathLineEdit.addCurrentPathToHistory()  # the setting key keeps it for next time

    # ---------------------------------------------------------------- detection
    def onDetectButton(self):
        if self._busy or self._parameterNode is None or self._parameterNode.inputVolume is None:
            return
        self._startDetection(self._parameterNode.inputVolume)

    def onTrySample(self):
        if self._busy:
            return
        self._setBusy(True, f"Loading Slicer's {SAMPLE_NAME} sample...")
        try:
            with slicer.util.tryWithErrorDisplay(f"Could not load the {SAMPLE_NAME} sample.", waitCursor=True):
                sampleNode = self.logic.loadSample()
                self._parameterNode.inputVolume = sampleNode
                self._parameterNode.maskNode = None
        finally:
            self._setBusy(False)
        if self._parameterNode.inputVolume is not None:
            self._startDetection(self._parameterNode.inputVolume)

    def _startDetection(self, inputNode):
        # Busy first: the install below runs pip, whose log output processes events, so a second
        # click could otherwise start a second install.
        self._setBusy(True, "Checking the Python packages...")
        try:
            if not self.logic.setupPythonRequirements(askConfirmation=True):
                self._setBusy(False, "PyTorch is needed to detect anomalies.")
                return
            self._task = self.logic.startDetection(inputNode, maskNode=self._parameterNode.maskNode,
                                                   modelPath=self._parameterNode.modelPath or None,
                                                   device=self._parameterNode.device.value)
        except Exception as error:  # noqa: BLE001 - shown to the user
            self._setBusy(False, "")
            slicer.util.errorDisplay(f"Could not start detection:\n{_userMessage(error)}", detailedText=_traceback())
            return
        self._detectionStarted = time.monotonic()
        self._timer.start()

    def _poll(self):
        self._pollModelInfo()
        task = self._task
        if task is None:
            if self._infoJob is None:
                self._timer.stop()
            return
        import CRADLAnomalyLib as lib

        state = task.poll()
        self.ui.progressBar.value = int(round(100 * task.fraction))
        self.ui.statusLabel.text = task.message
        if state == lib.RUNNING:
            return
        self._task = None
        if self._infoJob is None:
            self._timer.stop()
        if state == lib.DONE:
            try:
                with slicer.util.WaitCursor():
                    self.logic.finishDetection(task, opacity=self._parameterNode.opacity)
                seconds = time.monotonic() - self._detectionStarted
                self._setBusy(False, f"Done in {seconds:.0f} s.")
                if self._parameterNode.modelPath:
                    self.ui.modelPathLineEdit.addCurrentPathToHistory()
            except Exception as error:  # noqa: BLE001
                self._setBusy(False, "Failed.")
                slicer.util.errorDisplay(f"Could not show the result:\n{_userMessage(error)}",
                                         detailedText=_traceback())
        elif state == lib.FAILED:
            self._setBusy(False, "Failed.")
            slicer.util.errorDisplay(f"Anomaly detection failed:\n{task.job.error}",
                                     detailedText=getattr(task.job, "details", None))
        self._hideResultsFromInputSelector()
        self._onParameterNodeModified()

    def _setBusy(self, busy, message=None):
        """While busy, nothing that changes the scene can be clicked; Cancel can."""
        self._busy = busy
        self.ui.progressBar.setVisible(busy)
        self.ui.progressBar.value = 0
        self.ui.cancelButton.enabled = busy
        self.ui.trySampleButton.enabled = not busy
        self.ui.inputsCollapsibleButton.enabled = not busy
        if message is not None:
            self.ui.statusLabel.text = message
        self._onParameterNodeModified()

    def onCancelButton(self):
        if self._task is not None:
            self._task.cancel()  # terminates the worker: returns at once
            self._task = None
        self._setBusy(False, "Cancelled.")

    # ---------------------------------------------------------------- review
    def onThresholdChanged(self, value):
        _, heatmapNode = self._currentResult()
        if heatmapNode is not None:
            self.logic.setThreshold(heatmapNode, value)

    def onResetThreshold(self):
        _, heatmapNode = self._currentResult()
        if heatmapNode is not None:
            self.logic.resetThreshold(heatmapNode)
            self._updateResultSection()

    def onShowPlot(self):
        inputNode, heatmapNode = self._currentResult()
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
            plotView.connect("dataSelected(vtkStringArray*,vtkCollection*)", self.onPlotDataSelected)
            self._plotView = plotView

    def _disconnectPlotView(self):
        if self._plotView is not None:
            self._plotView.disconnect("dataSelected(vtkStringArray*,vtkCollection*)", self.onPlotDataSelected)
            self._plotView = None

    def onPlotDataSelected(self, seriesIds, selectionCollection):
        """A click on a point of this input's slice-score series jumps every view to that slice."""
        inputNode, _ = self._currentResult()
        if inputNode is not None:
            self.logic.jumpToPlotSelection(inputNode, seriesIds, selectionCollection)

    def onRegionSelected(self):
        inputNode, _ = self._currentResult()
        row = self.ui.regionTableView.currentIndex().row()
        if inputNode is not None and row >= 0:
            self.logic.jumpToRegion(inputNode, row)

    def onNextRegion(self):
        inputNode, _ = self._currentResult()
        if inputNode is None:
            return
        current = self.ui.regionTableView.currentIndex().row()
        row = self.logic.nextRegionRow(inputNode, current if current >= 0 else None)
        if row is not None:
            self.ui.regionTableView.selectRow(row)  # triggers onRegionSelected
            self.logic.jumpToRegion(inputNode, row)

    def onCreateSegmentation(self):
        inputNode, _ = self._currentResult()
        with slicer.util.tryWithErrorDisplay("Could not create the segmentation.", waitCursor=True):
            segmentationNode = self.logic.createSegmentation(inputNode, threshold=self.ui.thresholdSlider.value)
            count = segmentationNode.GetSegmentation().GetNumberOfSegments()
            self.ui.statusLabel.text = (f"Segmentation \"{segmentationNode.GetName()}\" with {count} region(s); "
                                        "refine it in Segment Editor.")

    def onSaveResults(self):
        inputNode, _ = self._currentResult()
        outputDir = str(self._parameterNode.outputDirectory)
        with slicer.util.tryWithErrorDisplay("Could not save the results.", waitCursor=True):
            paths = self.logic.saveResults(inputNode, outputDir)
            self.ui.statusLabel.text = "Saved: " + ", ".join(os.path.basename(p) for p in paths.values())


def _traceback():
    import traceback
    return traceback.format_exc()


def _userMessage(error):
    """The words shown for an error: CRADLAnomalyLib.userMessage (plain for the core's and the bridge's own
    errors, with the type for others)."""
    try:
        import CRADLAnomalyLib as lib
    except Exception:  # noqa: BLE001 - the bridge itself cannot load: the core's words (plain Python)
        from cradl.errors import user_message

        return user_message(error)
    return lib.userMessage(error)


#
# CRADLAnomalyLogic
#

class CRADLAnomalyLogic(ScriptedLoadableModuleLogic):
    """Batch-usable logic (see the module help for a console example). A shell over CRADLAnomalyLib:
    the scene code lives there, where it is tested against a real MRML scene."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        import CRADLAnomalyLib as lib

        self._detectors = {}
        self._installer = lib.dependencies.Installer()

    def getParameterNode(self):
        return CRADLAnomalyParameterNode(super().getParameterNode())

    def firstInputCandidate(self):
        """The first scalar volume that is a scan (not a label map, not a CRADL result), or None."""
        import CRADLAnomalyLib as lib

        for node in lib.nodesByClass(slicer.mrmlScene, "vtkMRMLScalarVolumeNode"):
            if not node.IsA("vtkMRMLLabelMapVolumeNode") and not lib.isResultNode(node):
                return node
        return None

    def resultVolumeIDs(self):
        import CRADLAnomalyLib as lib
        return lib.resultNodeIDs(slicer.mrmlScene, "vtkMRMLScalarVolumeNode")

    # ---------------------------------------------------------------- dependencies
    @staticmethod
    def missingRequirements():
        import CRADLAnomalyLib as lib
        return lib.dependencies.missingPackages()

    @staticmethod
    def _pyTorchUtilsLogic():
        try:
            import PyTorchUtils  # the PyTorch extension (EXTENSION_DEPENDS) picks the right build
        except ModuleNotFoundError:
            return None
        return PyTorchUtils.PyTorchUtilsLogic()

    def setupPythonRequirements(self, askConfirmation=True):
        """Install what is missing after saying what and how big. False if the user declined."""
        import CRADLAnomalyLib as lib

        missing = self.missingRequirements()
        if not missing:
            return True
        torchUtils = self._pyTorchUtilsLogic()
        plan = lib.dependencies.installPlan(missing, pyTorchExtension=torchUtils is not None)
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                lib.dependencies.confirmationText(plan), windowTitle="CRADL Anomaly: install dependencies"):
            return False

        def installTorch(versionRequirement):
            return torchUtils.installTorch(askConfirmation=False, torchVersionRequirement=versionRequirement)

        with slicer.util.WaitCursor():
            self._installer.install(plan, slicer.util.pip_install, installTorch if torchUtils else None)
        return True

    # ---------------------------------------------------------------- model
    @staticmethod
    def defaultModelPath():
        from cradl.bundle import DEFAULT_MODEL  # no torch: the bundle module imports it only to build a network

        return str(DEFAULT_MODEL)

    @staticmethod
    def workerPython():
        """Slicer's Python launcher for worker processes (same packages as the application)."""
        return shutil.which("PythonSlicer") or sys.executable

    def loadDetector(self, modelPath=None, device="auto"):
        """The core's detector in this process (console and batch use), cached per model and device."""
        from cradl import AnomalyDetector

        path = os.path.abspath(modelPath) if modelPath else self.defaultModelPath()
        key = (path, device, os.path.getmtime(path) if os.path.exists(path) else None)
        if key not in self._detectors:
            self._detectors = {key: AnomalyDetector.load(path, device=device)}  # keep one model in memory
        return self._detectors[key]

    def startModelInfo(self, modelPath=None):
        """Name, version and recipe of a model, read in a worker process (poll the returned job)."""
        import CRADLAnomalyLib as lib
        return lib.ModelInfoJob(modelPath or self.defaultModelPath(), python=self.workerPython())

    # ---------------------------------------------------------------- processing
    def startDetection(self, volumeNode, maskNode=None, modelPath=None, device="auto"):
        """Start detection in a worker process; the scene is read now. Poll the returned task
        (``poll()``, ``fraction``, ``message``, ``cancel()``) and call ``finishDetection`` when done."""
        import CRADLAnomalyLib as lib
        return lib.SceneDetection(slicer.mrmlScene, volumeNode, maskNode,
                                  modelPath=modelPath or self.defaultModelPath(), device=device,
                                  python=self.workerPython())

    def finishDetection(self, task, showResult=True, opacity=None):
        """Build the result nodes from a finished task, on the main thread. Returns (heatmap node, report)."""
        import CRADLAnomalyLib as lib

        result = task.finish(show=showResult, opacity=lib.DEFAULT_OPACITY if opacity is None else opacity)
        if showResult:
            lib.addColorLegend(result.heatmapNode)
        return result.heatmapNode, result.report

    def process(self, volumeNode, maskNode=None, modelPath=None, device="auto", progress=None, cancel=None,
                showResult=True, opacity=None):
        """Detect anomalies in ``volumeNode`` in this process (console and batch use; waits).
        Returns (heatmap volume node, report dict).

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

    def loadSample(self):
        """Slicer's MRHead sample (a real T1 head with skull), downloaded once by Sample Data."""
        import SampleData
        return SampleData.downloadSample(SAMPLE_NAME)

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

    def jumpToPlotSelection(self, volumeNode, seriesIds, selections):
        """Jump to the slice clicked in the plot, if the click was on this input's score series."""
        import CRADLAnomalyLib as lib
        row = lib.sliceRowFromPlotSelection(slicer.mrmlScene, volumeNode, seriesIds, selections)
        if row is not None:
            self.jumpToSlice(volumeNode, row)
        return row

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
    """The whole flow inside Slicer, as a user goes through it: the panel opens without waiting,
    Slicer's MRHead sample is loaded and checked in a worker process, the result nodes are checked
    (table rows = regions, header not a row), a segmentation is made and saved, and a second run is
    cancelled mid-way. Skipped, and said so, when PyTorch is not installed or the sample cannot be
    downloaded."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_panelOpensWithoutFreezing, self.test_CRADLAnomaly_fullFlow):
            self.setUp()
            try:
                test()
            except SkipTest as reason:
                self.delayDisplay(f"Skipped {test.__name__}: {reason}")

    def _requireDependencies(self):
        missing = CRADLAnomalyLogic.missingRequirements()
        if missing:
            self.skipTest(f"missing Python packages {missing}: install them from the module panel first")

    def test_panelOpensWithoutFreezing(self):
        started = time.monotonic()
        slicer.util.selectModule("CRADLAnomaly")
        widget = slicer.modules.cradlanomaly.widgetRepresentation().self()
        self.assertLess(time.monotonic() - started, 5.0)
        self.assertTrue(widget.ui.trySampleButton.enabled)
        self.assertFalse(widget.ui.cancelButton.enabled)

    def test_CRADLAnomaly_fullFlow(self):
        import tempfile

        import numpy as np

        import CRADLAnomalyLib as lib

        self._requireDependencies()
        logic = CRADLAnomalyLogic()
        self.delayDisplay(f"Loading the {SAMPLE_NAME} sample")
        try:
            volumeNode = logic.loadSample()
        except Exception as error:  # noqa: BLE001 - offline
            self.skipTest(f"the {SAMPLE_NAME} sample could not be downloaded: {error}")
        before = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)

        self.delayDisplay("Detecting in a worker process")
        task = logic.startDetection(volumeNode, device="cpu")
        fractions = []
        while task.poll() == lib.RUNNING:
            fractions.append(task.fraction)
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertEqual(task.poll(), lib.DONE, task.job.error)
        heatmapNode, report = logic.finishDetection(task)
        self.assertTrue(fractions == sorted(fractions))
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
        self.assertTrue(regionTable.GetUseColumnTitleAsColumnHeader())
        self.assertIn(heatmapNode.GetID(), logic.resultVolumeIDs())

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

        self.delayDisplay("A second run, cancelled mid-way, leaves the scene as it was")
        count = slicer.mrmlScene.GetNumberOfNodes()
        task = logic.startDetection(volumeNode, device="cpu")
        time.sleep(1.0)
        started = time.monotonic()
        task.cancel()
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(task.poll(), lib.CANCELLED)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.delayDisplay("Test passed")

