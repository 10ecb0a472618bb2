"""Thresholded heatmap -> ranked regions -> segmentation node that the Segment Editor can refine.

Regions are the connected components (face connectivity) of ``heatmap > threshold``, ranked by
peak value, as the core defines them; the threshold is whatever the reviewer has set (the
calibrated one by default). ``vtkMRMLSegmentationNode`` and the label-map import exist in both the
Slicer application and the slicer-core wheel, so this is tested here.
"""
from __future__ import annotations

import numpy as np
from cradl.colormap import region_rgb

from . import nodes as N
from .errors import BridgeError
from .geometry import ijkToRasArray, arrayToMatrix

MAX_SEGMENTS = 50


def rankedRegionLabels(heatmapArray: np.ndarray, threshold: float, minVoxels: int = 1,
                       maxRegions: int = MAX_SEGMENTS):
    """Label array (0 = none, k = rank k by peak) and the peaks, from a heatmap array: connected
    components of ``heatmap > threshold`` (strictly above, as the core's regions).

    Uses SimpleITK (shipped with Slicer) rather than scipy."""
    import SimpleITK as sitk

    mask = sitk.GetImageFromArray((np.asarray(heatmapArray) > float(threshold)).astype(np.uint8))
    components = sitk.ConnectedComponent(mask, False)  # face connectivity
    labels = sitk.GetArrayFromImage(components)
    count = int(labels.max())
    if count == 0:
        return np.zeros(labels.shape, np.uint16), []
    flat = labels.ravel()
    values = np.asarray(heatmapArray, dtype=float).ravel()
    sizes = np.bincount(flat, minlength=count + 1)
    peaks = np.full(count + 1, -np.inf)
    np.maximum.at(peaks, flat, values)
    candidates = [k for k in range(1, count + 1) if sizes[k] >= minVoxels]
    order = sorted(candidates, key=lambda k: (-peaks[k], -sizes[k]))[:maxRegions]
    lut = np.zeros(count + 1, np.uint16)
    for rank, k in enumerate(order, start=1):
        lut[k] = rank
    return lut[labels], [float(peaks[k]) for k in order]


def createSegmentation(scene, inputNode, heatmapNode, threshold: float, minVolumeMm3: float = 0.0, created=None):
    """Replace this input's anomaly segmentation with the regions of ``heatmap > threshold``.

    Returns the segmentation node (with no segment when nothing exceeds the threshold)."""
    import slicer

    heatmap = slicer.util.arrayFromVolume(heatmapNode)
    spacing = np.linalg.norm(ijkToRasArray(heatmapNode, world=False)[:3, :3], axis=0)
    minVoxels = max(1, int(np.ceil(float(minVolumeMm3) / float(np.prod(spacing))))) if minVolumeMm3 > 0 else 1
    labels, peaks = rankedRegionLabels(heatmap, threshold, minVoxels=minVoxels)

    segmentationNode = N.getOrCreateResultNode(scene, inputNode, N.SEGMENTATION, "vtkMRMLSegmentationNode", created)
    segmentationNode.GetSegmentation().RemoveAllSegments()
    if segmentationNode.GetDisplayNode() is None:
        segmentationNode.CreateDefaultDisplayNodes()
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(inputNode)
    segmentationNode.SetAndObserveTransformNodeID(heatmapNode.GetTransformNodeID())
    if not peaks:
        return segmentationNode

    with N.temporaryNodes(scene):
        labelNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__CRADL_temp_regions__")
        slicer.util.updateVolumeFromArray(labelNode, labels)
        labelNode.SetIJKToRASMatrix(arrayToMatrix(ijkToRasArray(heatmapNode, world=False)))
        labelNode.SetAndObserveTransformNodeID(heatmapNode.GetTransformNodeID())
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelNode, segmentationNode):
            raise BridgeError("Could not convert the anomaly regions into a segmentation.")

    segmentation = segmentationNode.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        rank = segment.GetLabelValue() if segment.GetLabelValue() > 0 else i + 1
        segment.SetName(f"Anomaly region {rank}")
        segment.SetColor(*region_rgb(rank))
        segment.SetTag("CRADL.Peak", f"{peaks[rank - 1]:.6g}")
    return segmentationNode


def labelImageFromSegmentation(segmentationNode, referenceVolumeNode, scene):
    """SimpleITK uint16 label image (world geometry) of a segmentation on the reference grid."""
    import slicer

    from .geometry import imageFromVolumeNode

    with N.temporaryNodes(scene):
        temp = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__CRADL_temp_export__")
        slicer.vtkSlicerSegmentationsModuleLogic.ExportAllSegmentsToLabelmapNode(
            segmentationNode, temp, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        temp.SetAndObserveTransformNodeID(segmentationNode.GetTransformNodeID())
        image = imageFromVolumeNode(temp)
    import SimpleITK as sitk
    return sitk.Cast(image, sitk.sitkUInt16)
