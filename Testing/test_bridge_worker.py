"""The panel's detection runs in a worker process: the scene is read before it starts and written
after it ends, on the calling (main) thread; the caller is never blocked; Cancel stops it at once.
Against a real vtkMRMLScene (slicer-core) and the bundled default model."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
sitk = pytest.importorskip("SimpleITK")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "CRADLAnomaly"))

import CRADLAnomalyLib as lib  # noqa: E402
from CRADLAnomalyLib import geometry, nodes, pipeline, render, worker  # noqa: E402
from CRADLAnomalyLib.sample import sampleScan  # noqa: E402
from cradl.bundle import DEFAULT_MODEL as MODEL  # noqa: E402
pytestmark = pytest.mark.skipif(not MODEL.is_file(), reason="the bundled model is not built")


@pytest.fixture(scope="module")
def scan():
    """A head-sized sample scan (the default model's template with a lesion, oblique grid, 3 mm)."""
    from cradl import AnomalyDetector

    template = AnomalyDetector.load(str(MODEL), device="cpu").space.template
    image, _ = sampleScan(template, spacing=(3.0, 3.0, 3.0))
    return image


@pytest.fixture
def scene_with_scan(scan):
    rs = render.newReviewScene(64)
    node = rs.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "scan")
    geometry.updateVolumeNodeFromImage(node, scan)
    return rs.scene, node


def _sceneIds(scene):
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


@pytest.mark.integration
def test_detection_runs_in_a_worker_and_the_scene_changes_only_at_the_end(scene_with_scan):
    scene, node = scene_with_scan
    before = _sceneIds(scene)
    task = pipeline.SceneDetection(scene, node, device="cpu")
    assert task.poll() == worker.RUNNING, "starting returns while the worker loads the model"
    fractions = []
    while task.poll() == worker.RUNNING:
        fractions.append(task.fraction)
        assert _sceneIds(scene) == before  # nothing is written while it runs
        time.sleep(0.05)
    assert task.poll() == worker.DONE, task.job.error
    assert fractions and max(fractions) <= 1.0 and fractions == sorted(fractions)

    result = task.finish()
    assert result.heatmapNode.GetImageData().GetDimensions() == node.GetImageData().GetDimensions()
    assert np.allclose(geometry.ijkToRasArray(result.heatmapNode), geometry.ijkToRasArray(node))
    for key in ("volume_score", "volume_percentile", "slice_scores", "regions", "model"):
        assert key in result.report
    assert result.regionTableNode.GetNumberOfRows() == len(result.report["regions"])
    assert not os.path.exists(task.job.dir), "the job folder is removed once read"

    # The same scan in this process gives the same result: the worker is the core, not a copy.
    from cradl import AnomalyDetector

    direct = AnomalyDetector.load(str(MODEL), device="cpu").detect(geometry.imageFromVolumeNode(node), heatmap=False)
    assert result.report["volume_score"] == pytest.approx(round(direct.volume_score, 4), abs=1e-3)


def test_cancel_stops_the_worker_and_leaves_the_scene(scene_with_scan):
    scene, node = scene_with_scan
    before = _sceneIds(scene)
    task = pipeline.SceneDetection(scene, node, device="cpu")
    time.sleep(1.0)  # inside model loading or alignment, where the core has no cancel check
    task.cancel()  # terminate, then kill after half a second: bounded by the worker, not measured here
    assert task.poll() == worker.CANCELLED
    assert task.job.process.poll() is not None, "the worker process has ended"
    assert not os.path.exists(task.job.dir)
    with pytest.raises(worker.WorkerError, match="cancelled"):
        task.finish()
    assert _sceneIds(scene) == before


def test_worker_errors_come_back_as_one_clear_message(scene_with_scan, tmp_path):
    scene, node = scene_with_scan
    bad = tmp_path / "not_a_model.cradl"
    bad.write_bytes(b"this is not a model bundle")
    task = pipeline.SceneDetection(scene, node, modelPath=str(bad), device="cpu")
    assert task.job.wait(timeout=60) == worker.FAILED
    assert "Traceback" not in task.job.error and task.job.error.strip()
    with pytest.raises(worker.WorkerError):
        task.finish()
    assert nodes.findResultNodes(scene, node) == []


def test_model_details_are_read_without_torch_in_this_process():
    job = worker.ModelInfoJob(str(MODEL))
    assert job.wait(timeout=60) == worker.DONE, job.error
    info = job.result()
    assert info["name"] and info["version"]


@pytest.mark.integration
def test_input_removed_during_detection_is_a_clear_error(scene_with_scan):
    scene, node = scene_with_scan
    task = pipeline.SceneDetection(scene, node, device="cpu")
    scene.RemoveNode(node)
    task.job.wait(timeout=120)
    with pytest.raises(lib.BridgeError, match="removed"):
        task.finish()
