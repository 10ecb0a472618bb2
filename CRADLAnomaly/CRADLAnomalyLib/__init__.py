"""CRADL Anomaly scene bridge: MRML nodes <-> the ``cradl`` core, and the review nodes.

No Qt here: only MRML, VTK, SimpleITK and the ``slicer.util`` helpers that exist in both the Slicer
application and the ``slicer-core`` wheel, so all of it is tested against a real vtkMRMLScene.
Functions take the scene explicitly (the wheel has no ``slicer.mrmlScene``).
"""
from .errors import BridgeError, userMessage
from .geometry import (imageFromVolumeNode, updateVolumeNodeFromImage, ijkToRasArray, ijkToRasFromImage,
                       maskImageFromNode, placeOnInputGrid, parentTransformToWorld)
from .colors import getOrCreateHeatColorNode, heatRGBA, legendImage, COLOR_TABLE_NAME
from .display import (setupHeatmapDisplay, showOverlay, setOverlayOpacity, setHeatmapThreshold,
                      heatmapThreshold, heatmapDisplayMax, calibratedThreshold, addColorLegend, DEFAULT_OPACITY)
from .nodes import findResultNode, findResultNodes, removeResultNodes, nodesByClass, isResultNode, resultNodeIDs
from . import nodes
from .review import (fillSliceScoreTable, fillRegionTable, setupSliceScorePlot, jumpSlicesToRAS, sliceCentre,
                     regionCentre, nextRegionRow, summarize, percentileWords, verdict, sliceRowFromPlotSelection,
                     NORMAL_Z_LIMIT)
from .segmentation import createSegmentation, rankedRegionLabels
from .saving import saveFileResults, safeBaseName
from .pipeline import (SceneResult, SceneDetection, applyResult, detectVolumeNode, inputImages, processFiles,
                       reportOf, saveSceneResults)
from .worker import DetectionJob, ModelInfoJob, WorkerError, RUNNING, DONE, FAILED, CANCELLED
from . import dependencies

__all__ = [  # the bridge's public names, re-exported
    "BridgeError", "userMessage", "imageFromVolumeNode", "updateVolumeNodeFromImage", "ijkToRasArray",
    "ijkToRasFromImage", "maskImageFromNode", "placeOnInputGrid", "parentTransformToWorld",
    "getOrCreateHeatColorNode", "heatRGBA", "legendImage", "COLOR_TABLE_NAME", "setupHeatmapDisplay", "showOverlay",
    "setOverlayOpacity", "setHeatmapThreshold", "heatmapThreshold", "heatmapDisplayMax", "calibratedThreshold",
    "addColorLegend", "DEFAULT_OPACITY", "findResultNode", "findResultNodes", "removeResultNodes", "nodesByClass",
    "isResultNode", "resultNodeIDs", "nodes", "fillSliceScoreTable", "fillRegionTable", "setupSliceScorePlot",
    "jumpSlicesToRAS", "sliceCentre", "regionCentre", "nextRegionRow", "summarize", "percentileWords", "verdict",
    "sliceRowFromPlotSelection", "NORMAL_Z_LIMIT", "createSegmentation", "rankedRegionLabels", "saveFileResults",
    "safeBaseName", "SceneResult", "SceneDetection", "applyResult", "detectVolumeNode", "inputImages",
    "processFiles", "reportOf", "saveSceneResults", "DetectionJob", "ModelInfoJob", "WorkerError", "RUNNING",
    "DONE", "FAILED", "CANCELLED", "dependencies"
]
