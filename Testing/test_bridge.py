"""Scene bridge tests against a real vtkMRMLScene (slicer-core wheel): geometry, display, review
nodes, segmentation, re-run replacement, saving. No model needed: results are fed as plain data."""
from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
sitk = pytest.importorskip("SimpleITK")
import vtk  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "CRADLAnomaly"))

from cradl import space  # noqa: E402
import CRADLAnomalyLib as lib  # noqa: E402
from CRADLAnomalyLib import colors, display, geometry, nodes, pipeline, render, review, saving  # noqa: E402
from CRADLAnomalyLib.errors import BridgeError  # noqa: E402


# ------------------------------------------------------------------------------------------ helpers
def rotation(axis, deg):
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def obliqueFlippedIjkToRas():
    """Flipped I and K axes, rotated about two axes, anisotropic spacing, off-centre origin."""
    direction = rotation(2, 17) @ rotation(0, -9) @ np.diag([-1.0, 1.0, -1.0])
    m = np.eye(4)
    m[:3, :3] = direction * np.array([0.9, 1.3, 2.5])
    m[:3, 3] = [40.5, -72.25, 31.0]
    return m


@pytest.fixture
def rs():
    return render.newReviewScene(96)


def addVolume(scene, array, ijkToRas=None, name="T1"):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, np.asarray(array, dtype=np.float32))
    node.SetIJKToRASMatrix(geometry.arrayToMatrix(np.eye(4) if ijkToRas is None else ijkToRas))
    return node


def blobVolume(shape=(20, 24, 28), centre=(10, 12, 9), radius=4.0):
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    d = np.sqrt((k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2)
    return np.exp(-(d / radius) ** 2).astype(np.float32)


def fakeResult(inputImage, threshold=0.5, peakScale=2.0, seed=0):
    """A core-shaped result: heatmap on the input's grid with two blobs, scores, regions, report."""
    shape = sitk.GetArrayViewFromImage(inputImage).shape
    heat = peakScale * blobVolume(shape, (shape[0] // 2, shape[1] // 2, shape[2] // 3), 3.0)
    heat += 0.8 * peakScale * blobVolume(shape, (shape[0] // 2, shape[1] // 3, 3 * shape[2] // 4), 2.0)
    heatmap = sitk.GetImageFromArray(heat.astype(np.float32))
    heatmap.CopyInformation(inputImage)
    slices = [SimpleNamespace(index=i, score=10.0 + i + 0.1 * seed, z=0.5 * i, centre_ras=(1.0 * i, 2.0, -3.0 + i))
              for i in range(6)]
    regions = [SimpleNamespace(rank=2, centre_ras=(5.0, 6.0, 7.0), volume_mm3=90.0, peak=1.6, mean=0.9, voxel_count=40),
               SimpleNamespace(rank=1, centre_ras=(-10.0, 20.5, 3.25), volume_mm3=350.0, peak=2.0, mean=1.1,
                               voxel_count=120)]

    def to_report():
        return {"volume_score": 42.0 + seed, "volume_percentile": 97.5, "threshold": threshold,
                "slice_scores": [vars(s) for s in slices], "regions": [vars(r) for r in regions],
                "model": {"name": "fake", "version": "0"}}

    return SimpleNamespace(heatmap=heatmap, threshold=threshold, slice_scores=slices, regions=regions,
                           region_labels=None, volume_score=42.0, volume_percentile=97.5, to_report=to_report)


def volumeWithResult(scene, ijkToRas=None, name="T1", opacity=None, **result):
    """A blob volume in the scene with a fake detection applied to it: (node, its image, the SceneResult)."""
    node = addVolume(scene, blobVolume(), ijkToRas, name=name)
    image = geometry.imageFromVolumeNode(node)
    options = {} if opacity is None else {"opacity": opacity}
    return node, image, pipeline.applyResult(scene, node, fakeResult(image, **result), image, **options)


def _nodeIds(scene):
    """Node IDs, without the subject hierarchy singleton (the application always has one)."""
    ids = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    return {i for i in ids if not i.startswith("vtkMRMLSubjectHierarchyNode")}


def voxelRas(node, ijk):
    return geometry.rasOfVoxel(node, ijk)


def imageVoxelRas(image, ijk):
    return space.lps_to_ras(np.array(image.TransformIndexToPhysicalPoint([int(v) for v in ijk])))


CORNERS = [(0, 0, 0), (27, 0, 0), (0, 23, 0), (0, 0, 19), (27, 23, 19), (13, 5, 11)]


# ------------------------------------------------------------------------------------------ geometry
def test_round_trip_flipped_oblique_anisotropic(rs):
    scene = rs.scene
    data = np.random.default_rng(0).random((20, 24, 28)).astype(np.float32)
    node = addVolume(scene, data, obliqueFlippedIjkToRas())
    image = geometry.imageFromVolumeNode(node)
    assert image.GetSize() == (28, 24, 20)
    assert np.allclose(image.GetSpacing(), [0.9, 1.3, 2.5])
    assert np.isclose(np.linalg.det(np.reshape(image.GetDirection(), (3, 3))), 1.0)  # two flips + LPS flip
    for ijk in CORNERS:
        assert np.allclose(voxelRas(node, ijk), imageVoxelRas(image, ijk), atol=1e-6)
        assert image[ijk] == data[ijk[2], ijk[1], ijk[0]]
    back = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "back")
    geometry.updateVolumeNodeFromImage(back, image)
    assert np.allclose(geometry.ijkToRasArray(back), geometry.ijkToRasArray(node), atol=1e-9)
    assert np.array_equal(slicer.util.arrayFromVolume(back), data)
    for ijk in CORNERS:
        assert np.allclose(voxelRas(back, ijk), voxelRas(node, ijk), atol=1e-9)


def test_round_trip_matches_a_file_written_by_simpleitk(rs, tmp_path):
    """The node geometry agrees with what Slicer's own NIfTI reader makes of the same file."""
    image = sitk.GetImageFromArray(np.random.default_rng(1).random((8, 9, 10)).astype(np.float32))
    image.SetSpacing([1.1, 0.7, 3.0])
    image.SetOrigin([12.0, -30.0, 5.5])
    image.SetDirection((rotation(1, 25) @ np.diag([1.0, -1.0, 1.0])).ravel().tolist())
    path = str(tmp_path / "scan.nrrd")  # NRRD keeps an improper (flipped) direction exactly
    sitk.WriteImage(image, path)
    node = rs.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "file")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    assert storage.ReadData(node)
    mine = rs.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "mine")
    geometry.updateVolumeNodeFromImage(mine, image)
    # Slicer's reader may choose an equivalent representation (a reversed axis with the voxels
    # reversed too): compare where each voxel value lands in RAS, not the matrices.
    fileArray, mineArray = slicer.util.arrayFromVolume(node), slicer.util.arrayFromVolume(mine)
    k, j, i = np.meshgrid(*[np.arange(n) for n in fileArray.shape], indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    ras = geometry.ijkToRasArray(node) @ ijk
    mineIjk = np.linalg.inv(geometry.ijkToRasArray(mine)) @ ras
    assert np.allclose(mineIjk, np.round(mineIjk), atol=1e-3)
    mi, mj, mk = np.round(mineIjk[:3]).astype(int)
    assert np.array_equal(mineArray[mk, mj, mi], fileArray.ravel())


def test_sheared_and_empty_volumes_are_refused(rs):
    m = np.eye(4)
    m[0, 1] = 0.4
    node = addVolume(rs.scene, np.ones((3, 4, 5)), m)
    with pytest.raises(BridgeError, match="not orthogonal"):
        geometry.imageFromVolumeNode(node)
    empty = rs.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(BridgeError, match="no voxel data"):
        geometry.imageFromVolumeNode(empty)


def test_linear_parent_transform_is_applied_without_modifying_input(rs):
    scene = rs.scene
    node = addVolume(scene, blobVolume(), obliqueFlippedIjkToRas())
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    toParent = np.eye(4)
    toParent[:3, :3] = rotation(2, 30)
    toParent[:3, 3] = [5.0, -7.0, 11.0]
    transform.SetMatrixTransformToParent(geometry.arrayToMatrix(toParent))
    node.SetAndObserveTransformNodeID(transform.GetID())
    localBefore = geometry.ijkToRasArray(node, world=False)

    image = geometry.imageFromVolumeNode(node)
    for ijk in CORNERS:
        local = geometry.rasOfVoxel(node, ijk, world=False)
        assert np.allclose(imageVoxelRas(image, ijk), (toParent @ np.append(local, 1))[:3], atol=1e-6)

    result = pipeline.applyResult(scene, node, fakeResult(image), image)
    # Input untouched: same local geometry, still under its transform.
    assert np.allclose(geometry.ijkToRasArray(node, world=False), localBefore)
    assert node.GetTransformNodeID() == transform.GetID()
    # Heatmap shares the local geometry and the transform, so it stays on the input when the transform is edited.
    assert result.heatmapNode.GetTransformNodeID() == transform.GetID()
    assert np.allclose(geometry.ijkToRasArray(result.heatmapNode, world=False), localBefore)
    assert np.allclose(geometry.ijkToRasArray(result.heatmapNode), geometry.ijkToRasArray(node))


def test_non_linear_parent_transform_is_refused_with_a_clear_message(rs):
    scene = rs.scene
    node = addVolume(scene, blobVolume())
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(BridgeError, match="non-linear transform.*Harden"):
        geometry.imageFromVolumeNode(node)


def test_mask_from_labelmap_and_segmentation(rs):
    scene = rs.scene
    node = addVolume(scene, blobVolume(), obliqueFlippedIjkToRas())
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "brain")
    slicer.util.updateVolumeFromArray(label, (blobVolume() > 0.3).astype(np.uint8))
    label.SetIJKToRASMatrix(geometry.arrayToMatrix(obliqueFlippedIjkToRas()))
    mask = geometry.maskImageFromNode(label, node, scene)
    assert sitk.GetArrayViewFromImage(mask).sum() == int((blobVolume() > 0.3).sum())
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "brain seg")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label, seg)
    nodesBefore = _nodeIds(scene)
    mask2 = geometry.maskImageFromNode(seg, node, scene)
    assert _nodeIds(scene) == nodesBefore  # temporary label map, its display and colour nodes removed
    assert geometry.sameGrid(mask2, geometry.imageFromVolumeNode(node))
    assert sitk.GetArrayViewFromImage(mask2).sum() == int((blobVolume() > 0.3).sum())
    slicer.util.updateVolumeFromArray(label, np.zeros((20, 24, 28), np.uint8))
    with pytest.raises(BridgeError, match="empty"):
        geometry.maskImageFromNode(label, node, scene)


# ------------------------------------------------------------------------------------------ colours
def test_heat_color_table_is_transparent_low_and_ordered(rs):
    node = colors.getOrCreateHeatColorNode(rs.scene)
    assert colors.getOrCreateHeatColorNode(rs.scene) is node  # one per scene
    rgba = colors.colorNodeRGBA(node)
    assert rgba.shape == (256, 4)
    assert rgba[0, 3] == 0.0 and np.all(rgba[: int(0.04 * 255), 3] == 0.0)
    assert np.all(np.diff(rgba[:, 3]) >= -1e-9) and np.all(rgba[int(0.4 * 255) + 1:, 3] == 1.0)
    luminance = rgba[:, :3] @ np.array([0.2126, 0.7152, 0.0722])
    assert np.all(np.diff(luminance) > 0)  # perceptually ordered: brighter = more anomalous
    assert rgba[-1, 0] > 0.9 and rgba[-1, 1] > 0.9  # pale yellow top
    bar = colors.legendImage(100, 10)
    assert bar.shape == (100, 10, 3) and bar[-1].max() == 0 and bar[0][:, :2].min() > 200


# ------------------------------------------------------------------------------------------ display
def test_heatmap_node_geometry_display_and_views(rs):
    scene = rs.scene
    node, image, res = volumeWithResult(scene, obliqueFlippedIjkToRas(), threshold=0.5, opacity=0.7)
    heat = res.heatmapNode
    assert heat.GetImageData().GetDimensions() == node.GetImageData().GetDimensions()
    assert np.allclose(geometry.ijkToRasArray(heat), geometry.ijkToRasArray(node))
    for ijk in CORNERS:
        assert np.allclose(voxelRas(heat, ijk), voxelRas(node, ijk))
    assert np.allclose(slicer.util.arrayFromVolume(heat), sitk.GetArrayViewFromImage(fakeResult(image).heatmap))

    d = heat.GetDisplayNode()
    assert d.GetColorNode().GetName() == colors.COLOR_TABLE_NAME
    assert d.GetApplyThreshold() and d.GetLowerThreshold() == pytest.approx(0.5)
    assert not d.GetAutoWindowLevel()
    assert d.GetWindowLevelMin() == pytest.approx(0.0)
    assert d.GetWindowLevelMax() == pytest.approx(display.heatmapDisplayMax(heat))
    assert display.heatmapDisplayMax(heat) >= 1.25 * 0.5
    composites = display.sliceCompositeNodes(scene)
    assert len(composites) == 3
    for c in composites:
        assert c.GetBackgroundVolumeID() == node.GetID()
        assert c.GetForegroundVolumeID() == heat.GetID()
        assert c.GetForegroundOpacity() == pytest.approx(0.7)

    display.setOverlayOpacity(scene, 0.3, heat)
    display.setHeatmapThreshold(heat, 1.2)
    assert all(c.GetForegroundOpacity() == pytest.approx(0.3) for c in composites)
    assert display.heatmapThreshold(heat) == pytest.approx(1.2)
    assert display.calibratedThreshold(heat) == pytest.approx(0.5)
    assert d.GetWindowLevelMax() == pytest.approx(display.heatmapDisplayMax(heat))  # colour scale unchanged
    legend = display.addColorLegend(heat)
    if scene.IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):  # the application registers it
        assert legend is not None and legend.GetVisibility()
    else:  # the slicer-core wheel does not: skipped quietly, the panel has its own legend
        assert legend is None


def test_input_volume_is_never_modified(rs):
    node = addVolume(rs.scene, blobVolume(), obliqueFlippedIjkToRas())
    before = np.array(slicer.util.arrayFromVolume(node), copy=True)
    mtime = node.GetImageData().GetMTime()
    image = geometry.imageFromVolumeNode(node)
    sitk.GetArrayViewFromImage(image)  # a copy: writing it must not reach the node
    pipeline.applyResult(rs.scene, node, fakeResult(image), image)
    assert np.array_equal(slicer.util.arrayFromVolume(node), before)
    assert node.GetImageData().GetMTime() == mtime


# ------------------------------------------------------------------------------------------ review
def test_slice_score_plot_and_region_table(rs):
    scene = rs.scene
    node, image, res = volumeWithResult(scene)
    table = res.sliceTableNode
    assert list(review.tableColumn(table, "Slice")) == list(range(6))
    assert np.allclose(review.tableColumn(table, "Score"), 10.0 + np.arange(6))
    assert np.allclose(review.tableColumn(table, "z"), 0.5 * np.arange(6))
    assert review.sliceCentre(table, 4) == (4.0, 2.0, 1.0)
    chart = res.chartNode
    assert chart.GetNumberOfPlotSeriesNodes() == 2  # the scores and the normal-limit line
    series = chart.GetNthPlotSeriesNode(0)
    assert series.GetTableNode() is table
    assert series.GetXColumnName() == "Slice" and series.GetYColumnName() == "z"
    assert "slice" in chart.GetXAxisTitle().lower()

    regions = res.regionTableNode
    assert list(review.tableColumn(regions, "Rank")) == [1, 2]  # sorted by rank
    assert np.allclose(review.tableColumn(regions, "Volume"), [350.0, 90.0])
    assert regions.GetColumnUnitLabel("Volume") == "mm3"
    assert review.regionCentre(regions, 0) == (-10.0, 20.5, 3.25)
    assert review.nextRegionRow(regions, None) == 0
    assert review.nextRegionRow(regions, 0) == 1
    assert review.nextRegionRow(regions, 1) == 0

    target = (-10.0, 20.5, 3.25)
    assert review.jumpSlicesToRAS(scene, target) == 3
    for sliceLogic in rs.sliceLogics.values():
        sliceToRas = geometry.matrixToArray(sliceLogic.GetSliceNode().GetSliceToRAS())
        normal, origin = sliceToRas[:3, 2], sliceToRas[:3, 3]
        assert abs(np.dot(np.asarray(target) - origin, normal)) < 1e-6  # plane passes through target
        assert np.allclose(origin, target, atol=1e-6)  # centred

    report = pipeline.reportOf(scene, node)
    assert report["volume_percentile"] == 97.5 and report["threshold"] == 0.5
    assert report["input"]["size"] == [28, 24, 20]


def test_region_table_rows_are_regions_and_its_header_is_not_a_row(rs):
    """Slicer's table view shows a table node's column names as row 0 unless the node says they
    are the header: then selecting row i would jump to region i + 1."""
    scene = rs.scene
    node, image, res = volumeWithResult(scene)
    for table in (res.regionTableNode, res.sliceTableNode):
        assert table.GetUseColumnTitleAsColumnHeader()
    assert res.regionTableNode.GetNumberOfRows() == len(res.report["regions"]) == 2
    assert list(review.tableColumn(res.regionTableNode, "Rank")) == [1, 2]


def test_slice_plot_normal_limit_line_is_two_sd_above_normal_scans(rs):
    """The dashed line needs nothing the core does not write: z-scores are in SD above normal
    scans at the same slice position, and the line sits at 2 SD."""
    scene = rs.scene
    node, image, res = volumeWithResult(scene)
    line = res.chartNode.GetNthPlotSeriesNode(1)
    assert line is nodes.findResultNode(scene, node, nodes.SLICE_THRESHOLD_SERIES)
    assert line.GetYColumnName() == review.NORMAL_LIMIT_COLUMN
    assert np.allclose(review.tableColumn(res.sliceTableNode, review.NORMAL_LIMIT_COLUMN), review.NORMAL_Z_LIMIT)
    assert line.GetLineStyle() == slicer.vtkMRMLPlotSeriesNode.LineStyleDash

    raw = fakeResult(image)  # a model without per-position statistics: raw scores, no line
    for s in raw.slice_scores:
        s.z = None
    res = pipeline.applyResult(scene, node, raw, image)
    assert res.chartNode.GetNumberOfPlotSeriesNodes() == 1
    assert res.chartNode.GetNthPlotSeriesNode(0).GetYColumnName() == "Score"
    assert nodes.findResultNode(scene, node, nodes.SLICE_THRESHOLD_SERIES) is None


def _plotSelection(pairs):
    """What qMRMLPlotView's dataSelected(vtkStringArray*, vtkCollection*) passes: series IDs and,
    per series, the selected point indices."""
    ids, selections = vtk.vtkStringArray(), vtk.vtkCollection()
    for seriesId, points in pairs:
        ids.InsertNextValue(seriesId)
        array = vtk.vtkIdTypeArray()
        for p in points:
            array.InsertNextValue(p)
        selections.AddItem(array)
    return ids, selections


def test_plot_click_jumps_only_for_this_inputs_score_series(rs):
    scene = rs.scene
    node = addVolume(scene, blobVolume(), name="A")
    other = addVolume(scene, blobVolume(), name="B")
    image = geometry.imageFromVolumeNode(node)
    res = pipeline.applyResult(scene, node, fakeResult(image), image)
    otherRes = pipeline.applyResult(scene, other, fakeResult(image), image)
    scores = nodes.findResultNode(scene, node, nodes.SLICE_SERIES).GetID()
    limit = nodes.findResultNode(scene, node, nodes.SLICE_THRESHOLD_SERIES).GetID()
    otherScores = otherRes.chartNode.GetNthPlotSeriesNode(0).GetID()

    assert review.sliceRowFromPlotSelection(scene, node, *_plotSelection([(scores, [4])])) == 4
    assert review.sliceRowFromPlotSelection(scene, node, *_plotSelection([(limit, [2]), (scores, [3])])) == 3
    assert review.sliceRowFromPlotSelection(scene, node, *_plotSelection([(limit, [2])])) is None
    assert review.sliceRowFromPlotSelection(scene, node, *_plotSelection([(otherScores, [1])])) is None
    assert review.sliceRowFromPlotSelection(scene, node, *_plotSelection([(scores, [])])) is None
    assert review.sliceCentre(res.sliceTableNode, 4) == (4.0, 2.0, 1.0)


def test_detections_do_not_leak_references_to_nodes(rs):
    """GetNodesByClass returns a collection its caller owns; left unreleased it holds every node for
    ever (measured before the fix: an input's reference count went from 3 to 43 in two runs)."""
    scene = rs.scene
    node = addVolume(scene, blobVolume())
    image = geometry.imageFromVolumeNode(node)

    def reviewOnce(seed):
        """A detection and what a reviewer does next; returns the input's reference count."""
        res = pipeline.applyResult(scene, node, fakeResult(image, seed=seed), image)
        lib.createSegmentation(scene, node, res.heatmapNode, 0.5)
        review.jumpSlicesToRAS(scene, (0.0, 0.0, 0.0))
        display.setOverlayOpacity(scene, 0.3)
        nodes.findResultNodes(scene, node)
        lib.getOrCreateHeatColorNode(scene)
        gc.collect()
        return node.GetReferenceCount()

    # The result nodes reference their input (node references hold it), so the count after one
    # run is what it is; it must not grow with every run.
    counts = [reviewOnce(seed) for seed in range(4)]
    assert counts == [counts[0]] * 4, counts
    volumes = nodes.nodesByClass(scene, "vtkMRMLScalarVolumeNode")
    before = [v.GetReferenceCount() for v in volumes]
    for _ in range(5):
        nodes.nodesByClass(scene, "vtkMRMLScalarVolumeNode")
    gc.collect()
    assert [v.GetReferenceCount() for v in volumes] == before


def test_cradl_results_are_not_inputs(rs):
    scene = rs.scene
    node, image, res = volumeWithResult(scene)
    assert nodes.resultNodeIDs(scene, "vtkMRMLScalarVolumeNode") == [res.heatmapNode.GetID()]
    assert not nodes.isResultNode(node)
    with pytest.raises(BridgeError, match="CRADL result"):
        pipeline.inputImages(scene, res.heatmapNode)


def test_summary_says_not_comparable_and_shows_the_cores_warnings_for_an_unfamiliar_scan():
    from cradl.detector import DetectionResult

    def report(typical_z):
        result = DetectionResult(9.0, 100.0, [], [], 2.0, 100.0, {"name": "m", "version": "1"},
                                 typicality={"typical_z": typical_z, "limit": 2.5,
                                             "out_of_distribution": typical_z > 2.5})
        result.warnings = ["unlike the model's normal scans"] if result.out_of_distribution else []
        return result.to_report()

    familiar, unfamiliar = review.summarize(report(0.3)), review.summarize(report(6.0))
    assert "highly unusual" in familiar and "Warning" not in familiar
    assert "not comparable" in unfamiliar and "highly unusual" not in unfamiliar
    assert "Warning: unlike the model's normal scans" in unfamiliar


def test_summary_words():
    text = review.summarize({"volume_score": 3.2, "volume_percentile": 99.4,
                             "regions": [{"rank": 1, "centre_ras": [10, -20, 30], "volume_mm3": 4200.0}]})
    assert "highly unusual" in text and "4.2 cm" in text and "R 10, A -20, S 30" in text
    assert "not a diagnosis" in text
    assert "normal range" in review.summarize({"volume_score": 1.0, "volume_percentile": 40.0, "regions": []})
    assert "No region" in review.summarize({"volume_score": 1.0, "volume_percentile": 40.0, "regions": []})
    assert "unusual" in review.percentileWords(96.0) and "upper end" in review.percentileWords(80)


# ------------------------------------------------------------------------------------------ re-run
def _countByClass(scene):
    counts = {}
    for i in range(scene.GetNumberOfNodes()):
        name = scene.GetNthNode(i).GetClassName()
        counts[name] = counts.get(name, 0) + 1
    return counts


def test_rerun_replaces_previous_results(rs):
    scene = rs.scene
    node = addVolume(scene, blobVolume(), name="A")
    other = addVolume(scene, blobVolume(), name="B")
    image = geometry.imageFromVolumeNode(node)
    first = pipeline.applyResult(scene, node, fakeResult(image, seed=0), image)
    pipeline.applyResult(scene, other, fakeResult(image, seed=5), image)
    lib.createSegmentation(scene, node, first.heatmapNode, 0.5)
    assert nodes.findResultNode(scene, node, nodes.SEGMENTATION) is not None
    counts = _countByClass(scene)

    second = pipeline.applyResult(scene, node, fakeResult(image, seed=1), image)
    assert second.heatmapNode.GetID() == first.heatmapNode.GetID()  # updated in place
    assert nodes.findResultNode(scene, node, nodes.SEGMENTATION) is None  # stale segmentation removed
    after = _countByClass(scene)
    assert after.get("vtkMRMLSegmentationNode", 0) == counts.get("vtkMRMLSegmentationNode", 0) - 1
    for cls in ("vtkMRMLScalarVolumeNode", "vtkMRMLTableNode", "vtkMRMLPlotSeriesNode", "vtkMRMLPlotChartNode",
                "vtkMRMLTextNode", "vtkMRMLScalarVolumeDisplayNode", "vtkMRMLColorTableNode"):
        assert after[cls] == counts[cls], cls
    assert pipeline.reportOf(scene, node)["volume_score"] == 43.0
    assert pipeline.reportOf(scene, other)["volume_score"] == 47.0  # the other input's results are kept
    assert {n.GetAttribute(nodes.ATTR_ROLE) for n in nodes.findResultNodes(scene, other)} >= {
        nodes.HEATMAP, nodes.REPORT, nodes.SLICE_TABLE, nodes.SLICE_CHART, nodes.REGION_TABLE}
    assert nodes.removeResultNodes(scene, node) >= 6
    assert nodes.findResultNodes(scene, node) == []


def test_error_while_building_leaves_scene_as_it_was(rs):
    scene = rs.scene
    node = addVolume(scene, blobVolume())
    image = geometry.imageFromVolumeNode(node)
    bad = fakeResult(image)
    bad.heatmap = sitk.Image([5, 5, 5], sitk.sitkFloat32)  # not on the input grid
    before = scene.GetNumberOfNodes()
    with pytest.raises(BridgeError):
        pipeline.applyResult(scene, node, bad, image)
    assert scene.GetNumberOfNodes() == before
    composite = display.sliceCompositeNodes(scene)[0]
    assert composite.GetForegroundVolumeID() is None


class _FailingDetector:
    def detect(self, image, mask=None, heatmap=True, progress=None, cancel=None):
        progress(0.1, "started")
        if cancel():
            raise RuntimeError("cancelled")


def test_cancel_leaves_scene_untouched(rs):
    scene = rs.scene
    node = addVolume(scene, blobVolume())
    before = scene.GetNumberOfNodes()
    with pytest.raises(RuntimeError, match="cancelled"):
        pipeline.detectVolumeNode(scene, _FailingDetector(), node, progress=lambda f, m: None, cancel=lambda: True)
    assert scene.GetNumberOfNodes() == before


class _CancelOnSecondFile:
    def __init__(self):
        self.calls = 0

    def detect(self, path, heatmap=True, progress=None, cancel=None):
        from cradl.errors import DetectionCancelled, InputError

        self.calls += 1
        if self.calls == 1:
            raise InputError("not a scan")  # the batch reports it and goes on
        raise DetectionCancelled("detection cancelled")  # the batch stops


def test_file_batch_goes_on_past_a_bad_file_and_stops_on_the_core_cancel(tmp_path):
    from cradl.errors import DetectionCancelled

    detector = _CancelOnSecondFile()
    with pytest.raises(DetectionCancelled):
        pipeline.processFiles(detector, ["a.nii.gz", "b.nii.gz", "c.nii.gz"], str(tmp_path), log=lambda m: None)
    assert detector.calls == 2


class _FakeFileDetector:
    """Reads nothing: every file gives the same core-shaped result, with its region label map."""

    def detect(self, path, heatmap=True, progress=None, cancel=None):
        image = sitk.GetImageFromArray(blobVolume().astype(np.float32))
        result = fakeResult(image)
        result.region_labels = sitk.Cast(result.heatmap > result.threshold, sitk.sitkUInt16)
        return result


def test_file_batch_names_its_outputs_as_the_cli_batch_does(tmp_path):
    """One naming scheme (cradl.outputs) for both batches: same stems (same-named inputs kept apart), same
    suffixes; every file written, no temporaries."""
    from cradl.outputs import CLI_KINDS, batch_plan

    inputs = [tmp_path / "in" / "scan.nii.gz", tmp_path / "in" / "scan.nrrd"]
    out = tmp_path / "out"
    summary = pipeline.processFiles(_FakeFileDetector(), inputs, str(out), log=lambda m: None)
    assert [entry["ok"] for entry in summary] == [True, True]
    for entry, planned in zip(summary, batch_plan(inputs, out, CLI_KINDS, [])):
        assert {Path(entry["files"][kind]) for kind in ("heatmap", "report")} == {planned["heatmap"],
                                                                                 planned["report"]}
        report = json.loads(Path(entry["files"]["report"]).read_text())
        assert report["files"]["regions"] == Path(entry["files"]["regions"]).name
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(f).name for e in summary for f in e["files"].values())
    assert Path(summary[1]["files"]["heatmap"]).name == "scan_nrrd_anomaly_heatmap.nii.gz"


class _UnfamiliarFileDetector(_FakeFileDetector):
    """A scan unlike the model's normal scans: the core's report words it so."""

    def detect(self, path, **options):
        from cradl.detector import DetectionResult

        result = super().detect(path, **options)
        words = DetectionResult(9.0, 100.0, [], [], 2.0, 100.0, {"name": "m", "version": "1"},
                                typicality={"typical_z": 6.0, "limit": 2.5, "out_of_distribution": True}).interpretation
        report = result.to_report
        result.to_report = lambda: {**report(), "interpretation": words}
        return result


def test_the_file_batch_words_an_unfamiliar_scan_as_the_panel_does(tmp_path):
    """The panel's summary, the file batch's log and the review figure's title share `review.verdict`."""
    logged = []
    pipeline.processFiles(_UnfamiliarFileDetector(), [tmp_path / "in" / "scan.nii.gz"], str(tmp_path / "out"),
                          log=logged.append)
    assert "not comparable" in logged[-1] and "unusual" not in logged[-1]
    assert review.verdict({"volume_percentile": 97.5}) == review.percentileWords(97.5)


def test_user_messages_come_from_the_error_classes():
    from cradl.errors import CradlError, ModelError

    from CRADLAnomalyLib.dependencies import InstallInProgress
    from CRADLAnomalyLib.worker import WorkerError

    for error in (ModelError("model file not found"), CradlError("bad"), BridgeError("sheared volume"),
                  WorkerError("cancelled"), InstallInProgress("an install is running")):
        assert lib.userMessage(error) == str(error)

    class CradlErrorLookalike(Exception):  # same name, not the class: not a user error
        pass

    CradlErrorLookalike.__name__ = "CradlError"
    assert lib.userMessage(ValueError("x")) == "ValueError: x"
    assert lib.userMessage(CradlErrorLookalike("y")) == "CradlError: y"


# ------------------------------------------------------------------------------------------ segmentation
def test_segmentation_from_thresholded_heatmap(rs):
    scene = rs.scene
    node, image, res = volumeWithResult(scene, obliqueFlippedIjkToRas(), threshold=0.5)
    heat = slicer.util.arrayFromVolume(res.heatmapNode)
    labels, peaks = lib.rankedRegionLabels(heat, 0.5)
    assert len(peaks) == 2 and peaks[0] > peaks[1]
    seg = lib.createSegmentation(scene, node, res.heatmapNode, 0.5)
    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 2
    assert segmentation.GetNthSegment(0).GetName() == "Anomaly region 1"
    assert seg.GetTransformNodeID() == node.GetTransformNodeID()
    exported = lib.segmentation.labelImageFromSegmentation(seg, node, scene)
    assert geometry.sameGrid(exported, image)
    assert np.array_equal(sitk.GetArrayViewFromImage(exported), labels)
    # Again at a higher threshold: same node, fewer voxels; none above the maximum -> no segments.
    seg2 = lib.createSegmentation(scene, node, res.heatmapNode, 1.7)
    assert seg2 is seg and seg.GetSegmentation().GetNumberOfSegments() == 1
    lib.createSegmentation(scene, node, res.heatmapNode, 100.0)
    assert seg.GetSegmentation().GetNumberOfSegments() == 0
    # Minimum region size drops small components.
    lib.createSegmentation(scene, node, res.heatmapNode, 0.5, minVolumeMm3=1e6)
    assert seg.GetSegmentation().GetNumberOfSegments() == 0


# ------------------------------------------------------------------------------------------ saving
def test_save_results_complete_and_atomic(rs, tmp_path, monkeypatch):
    scene = rs.scene
    node, image, res = volumeWithResult(scene, obliqueFlippedIjkToRas(), name="Patient 7 T1", threshold=0.5)
    out = tmp_path / "out"
    paths = pipeline.saveSceneResults(scene, node, str(out))
    assert set(paths) == {"heatmap", "segmentation", "report"}
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in paths.values())  # no temporaries
    assert os.path.basename(paths["heatmap"]) == "Patient_7_T1_anomaly_heatmap.nii.gz"
    saved = sitk.ReadImage(paths["heatmap"])
    assert geometry.sameGrid(saved, image)
    assert np.allclose(sitk.GetArrayViewFromImage(saved), slicer.util.arrayFromVolume(res.heatmapNode))
    report = json.loads(Path(paths["report"]).read_text())
    assert report["volume_percentile"] == 97.5 and report["display_threshold"] == 0.5
    assert report["files"]["segmentation"].endswith(".seg.nrrd")
    loaded = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(loaded)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(paths["segmentation"])
    assert storage.ReadData(loaded) and loaded.GetSegmentation().GetNumberOfSegments() == 2

    # A failure in the middle: nothing new appears, earlier files are kept as they were, no temporaries.
    before = {p: Path(p).read_bytes() for p in paths.values()}
    display.setHeatmapThreshold(res.heatmapNode, 0.9)

    def broken(path, data):
        Path(path).write_text("{ half")
        raise OSError("disk full")

    monkeypatch.setattr(saving, "writeJson", broken)
    with pytest.raises(OSError, match="disk full"):
        pipeline.saveSceneResults(scene, node, str(out))
    assert {p: Path(p).read_bytes() for p in paths.values()} == before
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in paths.values())


def test_save_without_result_is_a_clear_error(rs, tmp_path):
    node = addVolume(rs.scene, blobVolume())
    with pytest.raises(BridgeError, match="run detection first"):
        pipeline.saveSceneResults(rs.scene, node, str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_safe_base_names():
    assert saving.safeBaseName("/data/sub-01_T1w.nii.gz") == "sub-01_T1w"
    assert saving.safeBaseName("My scan (2).nrrd") == "My_scan_2"
    assert saving.safeBaseName("/data/dicom/series7/") == "series7"
    assert saving.safeBaseName("...") == "scan"


# ------------------------------------------------------------------------------------------ rendering
def test_headless_render_shows_heat_only_above_threshold(rs):
    scene = rs.scene
    anatomy = 100 * (0.3 + 0.7 * blobVolume(radius=12.0))
    node = addVolume(scene, anatomy, obliqueFlippedIjkToRas())
    render.ensureGreyDisplay(node)
    image = geometry.imageFromVolumeNode(node)
    res = pipeline.applyResult(scene, node, fakeResult(image, threshold=0.5), image, opacity=1.0)
    centre = geometry.rasOfVoxel(node, (28 // 3, 12, 10))  # the strongest blob's centre
    images = render.renderViews(rs.sliceLogics, centre)
    for name, rgb in images.items():
        assert rgb.shape == (96, 96, 3)
        spread = rgb.max(axis=2).astype(int) - rgb.min(axis=2).astype(int)
        coloured = spread > 30
        assert coloured.sum() > 10, name  # heat is visible
        assert (~coloured).sum() > 0.5 * coloured.size, name  # most of the view is untinted grey anatomy
    figure = render.composeFigure(images, display.heatmapDisplayMax(res.heatmapNode), 0.5, "t", "s")
    assert figure.width > 3 * 96 and figure.height > 96
