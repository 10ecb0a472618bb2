"""Volume node -> core -> result nodes; saving; batch over files. No Qt: runs in the app and here.

``detectVolumeNode`` is the whole flow for one volume node: geometry out of the scene, the core's
``detect``, then ``applyResult`` builds (or updates in place) this input's result nodes. The scene
is only touched after the core has finished, so an error or a cancel leaves it as it was.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from cradl.errors import DetectionCancelled, scan_failure
from cradl.io import plain_json
from cradl.outputs import batch_plan, protected_files, write_outputs

from . import display as D
from . import nodes as N
from . import review as R
from .errors import BridgeError
from .geometry import imageFromVolumeNode, maskImageFromNode, placeOnInputGrid
from .saving import outputFolder, saveFileResults
from .segmentation import createSegmentation


@dataclass
class SceneResult:
    """The nodes made for one input, and the JSON-able report."""
    inputNode: object
    heatmapNode: object
    reportNode: object
    sliceTableNode: object
    chartNode: object
    regionTableNode: object
    report: dict = field(default_factory=dict)


def _report(result) -> dict:
    return plain_json(result.to_report() if hasattr(result, "to_report") else {})  # the core's should be already


def applyResult(scene, inputNode, result, inputImage=None, show: bool = True,
                opacity: float = D.DEFAULT_OPACITY) -> SceneResult:
    """Build or refresh this input's result nodes from a core result.

    ``result`` needs ``heatmap`` (SimpleITK image on the input's world grid), ``threshold``,
    ``slice_scores``, ``regions`` and ``to_report()``. Nodes of an earlier run for the same input
    are updated in place (same node IDs), a now stale segmentation is removed; on error every node
    created here is removed again.
    """
    import slicer

    if inputImage is None:
        inputImage = imageFromVolumeNode(inputNode)
    created: list = []
    try:
        heatmapNode = N.getOrCreateResultNode(scene, inputNode, N.HEATMAP, "vtkMRMLScalarVolumeNode", created)
        placeOnInputGrid(heatmapNode, inputNode, result.heatmap, inputImage)
        threshold = float(result.threshold)
        displayMax = D.displayRange(slicer.util.arrayFromVolume(heatmapNode), threshold)
        D.setupHeatmapDisplay(heatmapNode, threshold, displayMax)

        report = _report(result)
        report.setdefault("threshold", threshold)
        report["display_max"] = displayMax
        report["input"] = {"name": inputNode.GetName(),
                           "size": [int(v) for v in inputImage.GetSize()],
                           "spacing": [float(v) for v in inputImage.GetSpacing()]}

        sliceTable = N.getOrCreateResultNode(scene, inputNode, N.SLICE_TABLE, "vtkMRMLTableNode", created)
        R.fillSliceScoreTable(sliceTable, result.slice_scores)
        chart = R.setupSliceScorePlot(scene, inputNode, sliceTable, R.sliceReferenceLevel(sliceTable), created)

        regionTable = N.getOrCreateResultNode(scene, inputNode, N.REGION_TABLE, "vtkMRMLTableNode", created)
        R.fillRegionTable(regionTable, result.regions)

        reportNode = N.getOrCreateResultNode(scene, inputNode, N.REPORT, "vtkMRMLTextNode", created)
        reportNode.SetText(json.dumps(report, indent=2))

        # The old segmentation belongs to the old heatmap.
        N.removeResultNodes(scene, inputNode, roles=(N.SEGMENTATION,))
    except Exception:
        for node in reversed(created):
            N.removeNodeAndDisplay(scene, node)
        raise
    if show:
        D.showOverlay(scene, inputNode, heatmapNode, opacity)
    return SceneResult(inputNode, heatmapNode, reportNode, sliceTable, chart, regionTable, report)


def inputImages(scene, inputNode, maskNode=None):
    """The input volume (and optional brain mask) as SimpleITK images on the input's world grid,
    after checking the input is a scan. Reads the scene: call it on the main thread."""
    if inputNode is None or not inputNode.IsA("vtkMRMLScalarVolumeNode"):
        raise BridgeError("Select a scalar MRI volume as input.")
    if inputNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise BridgeError(f'"{inputNode.GetName()}" is a label map, not an MRI scan.')
    if N.isResultNode(inputNode):
        raise BridgeError(f'"{inputNode.GetName()}" is a CRADL result, not an MRI scan: select the scan itself.')
    image = imageFromVolumeNode(inputNode)
    mask = maskImageFromNode(maskNode, inputNode, scene) if maskNode is not None else None
    return image, mask


def detectVolumeNode(scene, detector, inputNode, maskNode=None, progress=None, cancel=None,
                     show: bool = True, opacity: float = D.DEFAULT_OPACITY) -> SceneResult:
    """Run the core on a volume node and show the result, all in this thread (console and batch
    use; the panel runs the core in a worker process, see ``worker``). The input is never modified."""
    image, mask = inputImages(scene, inputNode, maskNode)
    start = time.time()
    result = detector.detect(image, mask=mask, heatmap=True, progress=progress, cancel=cancel)
    logging.info("CRADL: detection on %s took %.1f s", inputNode.GetName(), time.time() - start)
    return applyResult(scene, inputNode, result, image, show=show, opacity=opacity)


class SceneDetection:
    """A detection the panel runs in a worker process: started on the main thread (the scene is
    read there), polled from a timer, finished on the main thread (the scene is written there)."""

    def __init__(self, scene, inputNode, maskNode=None, modelPath=None, device: str = "auto", python=None):
        from .worker import DetectionJob

        self.scene = scene
        self.inputNodeID = inputNode.GetID() if inputNode is not None else None
        self.inputImage, mask = inputImages(scene, inputNode, maskNode)
        self.job = DetectionJob(self.inputImage, mask, modelPath=modelPath, device=device, python=python)

    def poll(self) -> str:
        return self.job.poll()

    @property
    def fraction(self) -> float:
        return self.job.fraction

    @property
    def message(self) -> str:
        return self.job.message

    def cancel(self) -> None:
        self.job.cancel()

    def finish(self, show: bool = True, opacity: float = D.DEFAULT_OPACITY) -> SceneResult:
        """Build this input's result nodes from the worker's output. Raises WorkerError if the worker
        failed or was cancelled, BridgeError if the input left the scene meanwhile."""
        result = self.job.result()
        inputNode = self.scene.GetNodeByID(self.inputNodeID) if self.inputNodeID else None
        if inputNode is None:
            raise BridgeError("The input volume was removed from the scene during detection.")
        return applyResult(self.scene, inputNode, result, self.inputImage, show=show, opacity=opacity)


def reportOf(scene, inputNode) -> dict | None:
    node = N.findResultNode(scene, inputNode, N.REPORT)
    if node is None or not node.GetText():
        return None
    return json.loads(node.GetText())


def saveSceneResults(scene, inputNode, outputDir: str, createSegmentationIfMissing: bool = True) -> dict:
    """Heatmap, segmentation (.seg.nrrd, made at the current threshold when missing) and report of
    this input to ``outputDir``, atomically. Returns the written paths."""
    heatmapNode = N.findResultNode(scene, inputNode, N.HEATMAP)
    report = reportOf(scene, inputNode)
    if heatmapNode is None or report is None:
        raise BridgeError(f'There is no anomaly result for "{inputNode.GetName()}" yet: run detection first.')
    segmentationNode = N.findResultNode(scene, inputNode, N.SEGMENTATION)
    if segmentationNode is None and createSegmentationIfMissing:
        segmentationNode = createSegmentation(scene, inputNode, heatmapNode, D.heatmapThreshold(heatmapNode),
                                              minVolumeMm3=float(report.get("min_region_mm3", 0.0)))
    report = dict(report)
    report["display_threshold"] = D.heatmapThreshold(heatmapNode)
    heatmapImage = imageFromVolumeNode(heatmapNode)
    hasSegments = segmentationNode is not None and segmentationNode.GetSegmentation().GetNumberOfSegments() > 0
    labelImage = None
    if not hasSegments:
        # An empty segmentation cannot be written as .seg.nrrd; an all-zero label map says the same.
        import SimpleITK as sitk
        labelImage = sitk.Image(heatmapImage.GetSize(), sitk.sitkUInt16)
        labelImage.CopyInformation(heatmapImage)
    return saveFileResults(outputDir, inputNode.GetName(), heatmapImage, report, labelImage=labelImage,
                           segmentationNode=segmentationNode if hasSegments else None)


BATCH_KINDS = ("heatmap", "regions", "report")  # what processFiles writes per input


def processFiles(detector, paths, outputDir: str, progress=None, cancel=None, log=None) -> list[dict]:
    """Batch mode without the scene: detect on each file (or DICOM folder) and write heatmap,
    region label map and report per input into ``outputDir``, named and written by the core as the
    CLI's batch is (``cradl.outputs``). A failing input is reported and skipped; the others still
    run; the core's cancel stops the batch. Returns one entry per input: {input, ok, files | error}."""
    log = log or logging.info
    paths = [str(p) for p in paths]
    inputs = [Path(p) for p in paths]
    folder = Path(outputFolder(outputDir))
    plan = batch_plan(inputs, folder, BATCH_KINDS, protected_files([("input", p) for p in inputs]))
    summary = []
    for n, (path, outputs) in enumerate(zip(paths, plan)):
        try:
            entry = _processFile(detector, path, outputs, _batchProgress(progress, n, len(paths), path), cancel)
            log(f"CRADL: {path}: {R.verdict(entry)}")
        except DetectionCancelled:  # cancel stops the batch
            raise
        except Exception as error:  # noqa: BLE001 - batch keeps going
            entry = {"input": path, "ok": False, "error": scan_failure(error)}
            log(f"CRADL: {path}: FAILED: {entry['error']}")
        summary.append(entry)
    return summary


def _batchProgress(progress, n: int, total: int, path: str):
    """The core's progress on input ``n`` as a fraction of the whole batch."""
    def fileProgress(fraction, message=""):
        if progress is not None:
            progress((n + float(fraction)) / total, f"{os.path.basename(path)}: {message}")
    return fileProgress


def _processFile(detector, path: str, outputs: dict, progress, cancel) -> dict:
    result = detector.detect(path, heatmap=True, progress=progress, cancel=cancel)
    report = _report(result)
    report["input"] = {"path": os.path.abspath(path)}
    report["files"] = {kind: final.name for kind, final in outputs.items() if kind != "report"}
    written = write_outputs(result, outputs, report=report)
    return {"input": path, "ok": True, "files": {kind: str(final) for kind, final in written.items()},
            "volume_percentile": report.get("volume_percentile"), "interpretation": report.get("interpretation")}
