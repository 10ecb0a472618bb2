"""Review nodes: slice-score table + plot, ranked-region table, jumping the views, plain words.

Everything here is fed with plain numbers (the result's ``slice_scores`` and ``regions``, or
dicts from its JSON report), so it is testable without a model.
"""
from __future__ import annotations

import numpy as np
import vtk

from . import nodes as N

_REGION_UNITS = {"R": "mm", "A": "mm", "S": "mm", "Volume": "mm3"}
_REGION_DESCRIPTIONS = {
    "Rank": "Rank by peak anomaly score (1 = most anomalous)",
    "R": "Centre, right (+) / left (-) coordinate", "A": "Centre, anterior (+) / posterior (-)",
    "S": "Centre, superior (+) / inferior (-)", "Volume": "Region volume",
    "Peak": "Highest heatmap value in the region", "Mean": "Mean heatmap value in the region",
    "Voxels": "Number of voxels of the input scan in the region",
}


def _get(item, name, default=None):
    """Attribute of a core dataclass or key of its JSON dict."""
    if isinstance(item, dict):
        return item.get(name, default)
    return getattr(item, name, default)


def _fillTable(tableNode, columns: dict, types: dict, units: dict | None = None, descriptions: dict | None = None):
    table = tableNode.GetTable()
    wasModifying = tableNode.StartModify()
    table.Initialize()
    for name, values in columns.items():
        array = vtk.vtkIntArray() if types.get(name) == "int" else vtk.vtkDoubleArray()
        array.SetName(name)
        array.SetNumberOfValues(len(values))
        for i, v in enumerate(values):
            array.SetValue(i, int(v) if types.get(name) == "int" else float(v))
        table.AddColumn(array)
    for name in columns:
        tableNode.SetColumnType(name, vtk.VTK_INT if types.get(name) == "int" else vtk.VTK_DOUBLE)
        if units and name in units:
            tableNode.SetColumnUnitLabel(name, units[name])
        if descriptions and name in descriptions:
            tableNode.SetColumnDescription(name, descriptions[name])
    tableNode.SetLocked(True)
    # A new table node shows its column names as a first data row unless told otherwise; the
    # region table's row i must be region i + 1 for selection and jumping to agree.
    tableNode.SetUseColumnTitleAsColumnHeader(True)
    table.Modified()
    tableNode.Modified()
    tableNode.EndModify(wasModifying)
    return tableNode


def tableColumn(tableNode, name) -> np.ndarray:
    array = tableNode.GetTable().GetColumnByName(name)
    if array is None:
        raise KeyError(name)
    return np.array([array.GetValue(i) for i in range(array.GetNumberOfTuples())])


def fillSliceScoreTable(tableNode, sliceScores):
    rows = sorted(sliceScores, key=lambda s: _get(s, "index"))
    centres = np.array([_get(s, "centre_ras") for s in rows], dtype=float).reshape(-1, 3)
    columns = {
        "Slice": [_get(s, "index") for s in rows],
        "Score": [_get(s, "score") for s in rows],
    }
    if rows and all(_get(s, "z") is not None for s in rows):
        columns["z"] = [_get(s, "z") for s in rows]
    columns.update({"R": centres[:, 0], "A": centres[:, 1], "S": centres[:, 2]})
    return _fillTable(tableNode, columns, {"Slice": "int"}, units={"R": "mm", "A": "mm", "S": "mm"},
                      descriptions={"Slice": "Axial slice of the model's reference space (inferior to superior)",
                                    "Score": "Slice anomaly score: negative log-likelihood under the normal model",
                                    "z": "Slice score in standard deviations above normal scans at this position"})


def plottedColumn(tableNode) -> str:
    """The plot shows the position-standardised score (z) when the model provides it."""
    return "z" if tableNode.GetTable().GetColumnByName("z") is not None else "Score"


def fillRegionTable(tableNode, regions):
    rows = sorted(regions, key=lambda r: _get(r, "rank"))
    centres = np.array([_get(r, "centre_ras") for r in rows], dtype=float).reshape(-1, 3)
    return _fillTable(tableNode, {
        "Rank": [_get(r, "rank") for r in rows],
        "R": centres[:, 0], "A": centres[:, 1], "S": centres[:, 2],
        "Volume": [_get(r, "volume_mm3") for r in rows],
        "Peak": [_get(r, "peak") for r in rows],
        "Mean": [_get(r, "mean") for r in rows],
        "Voxels": [_get(r, "voxel_count") for r in rows],
    }, {"Rank": "int", "Voxels": "int"}, units=_REGION_UNITS, descriptions=_REGION_DESCRIPTIONS)


# The dashed reference line of the slice-score plot. The plot shows each slice's score standardised
# against normal calibration scans at the same slice position (z, in SD); 2 SD above their mean is
# where a normal slice rarely reaches (about 1 in 40 if normal scores were Gaussian). Raw scores
# (a model without per-position statistics) have no such scale, so they get no line.
NORMAL_Z_LIMIT = 2.0
NORMAL_LIMIT_COLUMN = "Normal limit"


def sliceReferenceLevel(tableNode) -> float | None:
    """The level of the plot's normal-limit line for this slice table, or None for no line."""
    return NORMAL_Z_LIMIT if plottedColumn(tableNode) == "z" else None


def setupSliceScorePlot(scene, inputNode, tableNode, referenceScore: float | None = None, created=None):
    """Plot series (score against slice) and chart; with ``referenceScore`` a dashed line marks it
    (``sliceReferenceLevel``: 2 SD above normal scans when z-scores are plotted). Returns the chart node."""
    import slicer

    series = N.getOrCreateResultNode(scene, inputNode, N.SLICE_SERIES, "vtkMRMLPlotSeriesNode", created)
    series.SetAndObserveTableNodeID(tableNode.GetID())
    series.SetXColumnName("Slice")
    yColumn = plottedColumn(tableNode)
    series.SetYColumnName(yColumn)
    series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
    series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
    series.SetMarkerSize(7)
    series.SetLineWidth(2)
    series.SetColor(0.90, 0.36, 0.18)

    chart = N.getOrCreateResultNode(scene, inputNode, N.SLICE_CHART, "vtkMRMLPlotChartNode", created)
    chart.RemoveAllPlotSeriesNodeIDs()
    chart.AddAndObservePlotSeriesNodeID(series.GetID())
    referenceSeries = N.findResultNode(scene, inputNode, N.SLICE_THRESHOLD_SERIES)
    if referenceScore is not None:
        referenceTable = tableNode  # add a constant column next to the scores
        column = vtk.vtkDoubleArray()
        column.SetName(NORMAL_LIMIT_COLUMN)
        column.SetNumberOfValues(tableNode.GetTable().GetNumberOfRows())
        column.Fill(float(referenceScore))
        tableNode.GetTable().AddColumn(column)
        tableNode.SetColumnType(NORMAL_LIMIT_COLUMN, vtk.VTK_DOUBLE)
        referenceSeries = N.getOrCreateResultNode(scene, inputNode, N.SLICE_THRESHOLD_SERIES,
                                                  "vtkMRMLPlotSeriesNode", created)
        referenceSeries.SetAndObserveTableNodeID(referenceTable.GetID())
        referenceSeries.SetXColumnName("Slice")
        referenceSeries.SetYColumnName(NORMAL_LIMIT_COLUMN)
        referenceSeries.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeLine)
        referenceSeries.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleDash)
        referenceSeries.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        referenceSeries.SetColor(0.45, 0.45, 0.45)
        chart.AddAndObservePlotSeriesNodeID(referenceSeries.GetID())
    elif referenceSeries is not None:
        N.removeNodeAndDisplay(scene, referenceSeries)
    chart.SetTitle(f"Slice anomaly scores: {inputNode.GetName()}")
    chart.SetXAxisTitle("Axial slice (inferior \u2192 superior)")
    chart.SetYAxisTitle("Anomaly (SD above normal scans)" if yColumn == "z" else "Anomaly score")
    chart.SetLegendVisibility(False)
    return chart


def sliceCentre(tableNode, row: int) -> tuple[float, float, float]:
    """RAS centre of the slice in ``row`` of the slice-score table (for click-to-jump)."""
    return tuple(float(tableColumn(tableNode, c)[row]) for c in ("R", "A", "S"))


def sliceRowFromPlotSelection(scene, inputNode, seriesIds, selections) -> int | None:
    """Row of the slice-score table a click in a plot view selected, or None.

    ``seriesIds`` (vtkStringArray) and ``selections`` (vtkCollection of vtkIdTypeArray, one per
    series) are what qMRMLPlotView's ``dataSelected`` signal passes. Only a point of this input's
    slice-score series counts: a click on the normal-limit line or in another chart is ignored."""
    series = N.findResultNode(scene, inputNode, N.SLICE_SERIES)
    if series is None or seriesIds is None or selections is None:
        return None
    for i in range(min(seriesIds.GetNumberOfValues(), selections.GetNumberOfItems())):
        if seriesIds.GetValue(i) != series.GetID():
            continue
        selection = selections.GetItemAsObject(i)
        if selection is not None and selection.GetNumberOfTuples() > 0:
            return int(selection.GetValue(0))
    return None


def regionCentre(tableNode, row: int) -> tuple[float, float, float]:
    return tuple(float(tableColumn(tableNode, c)[row]) for c in ("R", "A", "S"))


def nextRegionRow(tableNode, currentRow: int | None) -> int | None:
    """Row after ``currentRow`` (wrapping), the first row when none is selected; None when empty."""
    n = tableNode.GetTable().GetNumberOfRows()
    if n == 0:
        return None
    if currentRow is None or currentRow < 0:
        return 0
    return (currentRow + 1) % n


def jumpSlicesToRAS(scene, ras, centered: bool = True):
    """Move every slice view to ``ras`` (world RAS mm); centred views keep it in the middle."""
    sliceNodes = N.nodesByClass(scene, "vtkMRMLSliceNode")
    for sliceNode in sliceNodes:
        if centered:
            sliceNode.JumpSliceByCentering(*[float(v) for v in ras])
        else:
            sliceNode.JumpSliceByOffsetting(*[float(v) for v in ras])
    return len(sliceNodes)


# --- words a radiologist understands -------------------------------------------------------------

def percentileWords(percentile: float) -> str:
    """The core's wording, so the panel, the console and the JSON report say the same."""
    from cradl.calibration import describe_percentile

    return describe_percentile(percentile)


def verdict(report: dict) -> str:
    """What the whole scan's score means: the core's own words where the report has them (for a scan unlike
    the model's normals they say "not comparable", not "highly unusual"), else the percentile's."""
    return report.get("interpretation") or percentileWords(float(report.get("volume_percentile") or 0.0))


def _fmt_volume(mm3: float) -> str:
    return f"{mm3 / 1000.0:.1f} cm\u00b3" if mm3 >= 1000 else f"{mm3:.0f} mm\u00b3"


def summarize(report: dict) -> str:
    """Two or three plain sentences for the panel (and the console)."""
    score = float(report.get("volume_score", 0.0))
    regions = report.get("regions") or []
    lines = [f"Whole scan: {verdict(report)} (score {score:.3g})."]
    if not regions:
        lines.append("No region exceeds the anomaly threshold.")
    else:
        top = sorted(regions, key=lambda r: _get(r, "rank"))[0]
        total = sum(float(_get(r, "volume_mm3", 0.0)) for r in regions)
        c = [float(v) for v in _get(top, "centre_ras")]
        plural = "region exceeds" if len(regions) == 1 else "regions exceed"
        lines.append(f"{len(regions)} {plural} the anomaly threshold ({_fmt_volume(total)} in total); "
                     f"the strongest, {_fmt_volume(float(_get(top, 'volume_mm3', 0.0)))}, is centred at "
                     f"R {c[0]:.0f}, A {c[1]:.0f}, S {c[2]:.0f} mm.")
    for warning in _reportWarnings(report):
        lines.append(f"Warning: {warning}")
    lines.append("Research tool: it flags what differs from the normal scans it learned, not a diagnosis.")
    return " ".join(lines)


def _reportWarnings(report: dict) -> list:
    """The core's `warnings` (contrast the model does not know, a scan unlike every normal one);
    older reports have none."""
    return [str(w) for w in (report.get("warnings") or []) if w]
