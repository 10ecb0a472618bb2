"""How the heatmap is shown: its display node, and the foreground layer of every slice view."""
from __future__ import annotations

import numpy as np

from .colors import getOrCreateHeatColorNode
from .nodes import nodesByClass

DEFAULT_OPACITY = 0.6
ATTR_DISPLAY_MAX = "CRADL.DisplayMax"
ATTR_CALIBRATED_THRESHOLD = "CRADL.CalibratedThreshold"


def displayRange(heatmapArray: np.ndarray, threshold: float) -> float:
    """Upper end of the colour scale: the heatmap's near-maximum, never below 1.25x the threshold
    (so the calibrated threshold sits in the lower part of the scale on a normal scan too)."""
    values = heatmapArray[heatmapArray > 0]
    top = float(np.percentile(values, 99.95)) if values.size else 0.0
    top = max(top, 1.25 * float(threshold), 1e-6)
    return top


def setupHeatmapDisplay(heatmapNode, threshold: float, displayMax: float | None = None):
    """Display node with the heat colour table, a fixed colour range [0, displayMax] (so colours mean
    the same score at any threshold) and voxels below ``threshold`` hidden."""
    import slicer

    scene = heatmapNode.GetScene()
    display = heatmapNode.GetDisplayNode()
    if display is None:
        display = slicer.vtkMRMLScalarVolumeDisplayNode()
        scene.AddNode(display)
        heatmapNode.SetAndObserveDisplayNodeID(display.GetID())
    colorNode = getOrCreateHeatColorNode(scene)
    if displayMax is None:
        displayMax = displayRange(slicer.util.arrayFromVolume(heatmapNode), threshold)
    wasModifying = display.StartModify()
    display.SetAndObserveColorNodeID(colorNode.GetID())
    display.SetAutoWindowLevel(0)
    display.SetWindowLevelMinMax(0.0, float(displayMax))
    display.SetAutoThreshold(0)
    display.SetApplyThreshold(1)
    display.SetThreshold(float(threshold), float(np.finfo(np.float32).max))
    display.SetInterpolate(1)
    display.EndModify(wasModifying)
    heatmapNode.SetAttribute(ATTR_DISPLAY_MAX, repr(float(displayMax)))
    heatmapNode.SetAttribute(ATTR_CALIBRATED_THRESHOLD, repr(float(threshold)))
    return display


def heatmapDisplayMax(heatmapNode) -> float:
    value = heatmapNode.GetAttribute(ATTR_DISPLAY_MAX)
    if value:
        return float(value)
    display = heatmapNode.GetDisplayNode()
    return float(display.GetWindowLevelMax()) if display else 1.0


def calibratedThreshold(heatmapNode) -> float | None:
    value = heatmapNode.GetAttribute(ATTR_CALIBRATED_THRESHOLD)
    return float(value) if value else None


def setHeatmapThreshold(heatmapNode, threshold: float):
    """Hide voxels below ``threshold`` (the colour scale stays)."""
    display = heatmapNode.GetDisplayNode()
    if display is not None:
        display.SetApplyThreshold(1)
        display.SetLowerThreshold(float(threshold))


def heatmapThreshold(heatmapNode) -> float:
    display = heatmapNode.GetDisplayNode()
    return float(display.GetLowerThreshold()) if display is not None else 0.0


def sliceCompositeNodes(scene) -> list:
    return nodesByClass(scene, "vtkMRMLSliceCompositeNode")


def showOverlay(scene, backgroundNode, heatmapNode, opacity: float = DEFAULT_OPACITY):
    """Input as background, heatmap as foreground with ``opacity``, in every slice view.

    The label layer is left as the user had it."""
    for composite in sliceCompositeNodes(scene):
        wasModifying = composite.StartModify()
        if backgroundNode is not None:
            composite.SetBackgroundVolumeID(backgroundNode.GetID())
        composite.SetForegroundVolumeID(heatmapNode.GetID() if heatmapNode is not None else None)
        composite.SetForegroundOpacity(float(opacity))
        composite.EndModify(wasModifying)


def setOverlayOpacity(scene, opacity: float, heatmapNode=None):
    """Foreground opacity in the views that show ``heatmapNode`` (all views when None)."""
    for composite in sliceCompositeNodes(scene):
        if heatmapNode is None or composite.GetForegroundVolumeID() == heatmapNode.GetID():
            composite.SetForegroundOpacity(float(opacity))


def addColorLegend(heatmapNode):
    """The application's colour legend in the slice views (Slicer >= 4.13; skipped where missing)."""
    import slicer

    scene = heatmapNode.GetScene()
    if scene is None or not scene.IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):
        return None
    try:
        legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(heatmapNode)
        if legend is None:
            legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(heatmapNode)
    except (AttributeError, TypeError):
        return None
    if legend is not None:
        legend.SetTitleText("Anomaly")
        legend.SetLabelFormat("%.2g")
        legend.SetVisibility(True)
    return legend
