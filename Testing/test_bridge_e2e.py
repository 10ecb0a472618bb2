"""End to end through the scene: volume node on a flipped oblique grid -> real detector (tiny model
trained by the session fixture) -> result nodes -> review -> saving; batch mode; headless views."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
sitk = pytest.importorskip("SimpleITK")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "CRADLAnomaly"))

from cradl import space  # noqa: E402
import CRADLAnomalyLib as lib  # noqa: E402
from CRADLAnomalyLib import geometry, pipeline, render, review  # noqa: E402
from CRADLAnomalyLib.sample import resampleOblique  # noqa: E402


@pytest.fixture(scope="module")
def detector(tiny_detector):
    return tiny_detector


@pytest.fixture(scope="module")
def case(request):
    path, lesion, _ = request.getfixturevalue("sample_case")
    abnormal = sitk.ReadImage(str(path), sitk.sitkFloat32)
    # The same scan on a flipped, oblique, anisotropic grid: the geometry path is exercised end to end.
    image = resampleOblique(abnormal, spacing=(1.8, 1.6, 2.4))
    lesionOnGrid = sitk.Resample(lesion, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return image, lesionOnGrid


def test_detect_volume_node_end_to_end(detector, case, tmp_path):
    image, lesion = case
    rs = render.newReviewScene(220)
    scene = rs.scene
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "case 1")
    geometry.updateVolumeNodeFromImage(node, image)
    before = np.array(slicer.util.arrayFromVolume(node), copy=True)
    # The node holds exactly the image: same voxels at the same RAS points.
    for ijk in [(0, 0, 0), (10, 20, 30), tuple(int(s) - 1 for s in image.GetSize())]:
        assert np.allclose(geometry.rasOfVoxel(node, ijk),
                           space.lps_to_ras(image.TransformIndexToPhysicalPoint(ijk)), atol=1e-6)

    progress = []
    res = pipeline.detectVolumeNode(scene, detector, node, progress=lambda f, m: progress.append((f, m)))
    assert progress and progress[-1][0] == pytest.approx(1.0)
    assert np.array_equal(slicer.util.arrayFromVolume(node), before)

    heat = res.heatmapNode
    assert np.allclose(geometry.ijkToRasArray(heat), geometry.ijkToRasArray(node))
    heatArray = slicer.util.arrayFromVolume(heat)
    assert heatArray.shape == before.shape and np.isfinite(heatArray).all()
    # The heatmap points at the lesion: its mean inside the lesion beats the mean in the rest of the brain.
    lesionMask = sitk.GetArrayViewFromImage(lesion) > 0
    brain = heatArray > 0
    assert heatArray[lesionMask].mean() > heatArray[brain & ~lesionMask].mean()

    report = res.report
    assert 0.0 <= report["volume_percentile"] <= 100.0 and report["model"]["name"] == "cradl-tiny-test"
    assert res.sliceTableNode.GetNumberOfRows() == len(report["slice_scores"]) > 0
    assert res.regionTableNode.GetNumberOfRows() == len(report["regions"])
    assert "Whole scan" in review.summarize(report)

    # Re-run: same nodes, no pile-up.
    count = scene.GetNumberOfNodes()
    res2 = pipeline.detectVolumeNode(scene, detector, node)
    assert res2.heatmapNode.GetID() == heat.GetID() and scene.GetNumberOfNodes() == count
    report = res2.report  # the report now in the scene (detection is not bit-for-bit repeatable)
    assert pipeline.reportOf(scene, node)["volume_score"] == report["volume_score"]

    # Review and save.
    if report["regions"]:
        centre = report["regions"][0]["centre_ras"]
        lib.jumpSlicesToRAS(scene, centre)
        seg = lib.createSegmentation(scene, node, heat, report["threshold"], minVolumeMm3=200.0)
        assert seg.GetSegmentation().GetNumberOfSegments() == len(report["regions"])
    paths = pipeline.saveSceneResults(scene, node, str(tmp_path / "out"))
    saved = sitk.ReadImage(paths["heatmap"])
    assert geometry.sameGrid(saved, image)
    assert json.loads(Path(paths["report"]).read_text())["volume_score"] == report["volume_score"]

    # What a reviewer sees, headless; also kept as the README picture when asked for.
    centre = report["regions"][0]["centre_ras"] if report["regions"] else \
        geometry.rasOfVoxel(node, np.array(image.GetSize()) // 2)
    figure, images = render.renderReview(scene, rs.sliceLogics, node, heat, centre, "CRADL", "test")
    for rgb in images.values():
        assert rgb.shape == (220, 220, 3) and rgb.max() > 0


@pytest.mark.integration
def test_process_files_batch(detector, case, tmp_path):
    image, _ = case
    scans = tmp_path / "scans"
    scans.mkdir()
    sitk.WriteImage(image, str(scans / "a.nii.gz"))
    sitk.WriteImage(image, str(scans / "b.nrrd"))
    (scans / "broken.nii.gz").write_bytes(b"not an image")
    out = tmp_path / "out"
    seen = []
    summary = pipeline.processFiles(detector, sorted(scans.iterdir()), str(out),
                                    progress=lambda f, m: seen.append(f))
    byName = {Path(s["input"]).name: s for s in summary}
    assert byName["a.nii.gz"]["ok"] and byName["b.nrrd"]["ok"] and not byName["broken.nii.gz"]["ok"]
    assert byName["broken.nii.gz"]["error"]
    assert seen == sorted(seen) and max(seen) <= 1.0
    for stem in ("a", "b"):
        heat = sitk.ReadImage(str(out / f"{stem}_anomaly_heatmap.nii.gz"))
        assert geometry.sameGrid(heat, image)
        report = json.loads((out / f"{stem}_anomaly_report.json").read_text())
        assert {"volume_score", "volume_percentile", "regions", "slice_scores"} <= set(report)
        assert (out / f"{stem}_anomaly_regions.nii.gz").is_file()
    assert not any(p.name.startswith(".cradl-tmp") for p in out.iterdir())
    assert not any(p.name.startswith("broken") for p in out.iterdir())
