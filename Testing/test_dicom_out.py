"""DICOM in, DICOM out: a DICOM series input gets its heatmap as a DICOM Parametric Map and its regions as a
DICOM Segmentation (highdicom); both are read back (pydicom, highdicom) and checked against the NIfTI
outputs: same grid, same values, referencing the source series, naming the model, not for diagnostic use."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from cradl.dicom_out import (
    DISCLAIMER,
    source_datasets,
    write_dicom_results,
    write_dicom_series,
)
from cradl.io import read_image


@pytest.fixture(scope="module")
def series(sample_case, tmp_path_factory):
    """The lesion case as a classic MR DICOM series (one file per slice)."""
    return write_dicom_series(sitk.ReadImage(str(sample_case[0])), tmp_path_factory.mktemp("dicom") / "series")


def _source_positions(folder):
    by_uid = {}
    for path in folder.iterdir():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by_uid[ds.SOPInstanceUID] = (ds, np.array(ds.ImagePositionPatient, dtype=float))
    return by_uid


def _frame_positions(ds):
    return [np.array(f.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
            for f in ds.PerFrameFunctionalGroupsSequence]


def _check_references(ds, source, model_name):
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
    assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    referenced = ds.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert len(referenced.ReferencedInstanceSequence) == len(os.listdir(os.path.dirname(source.filename)))
    assert DISCLAIMER in ds.SeriesDescription and DISCLAIMER in ds.ContentDescription
    assert model_name in ds.ManufacturerModelName


def test_the_series_reads_back_on_the_grid_it_was_written_from(series, sample_case):
    original, read = sitk.ReadImage(str(sample_case[0])), read_image(series)
    # DICOM stacks slices along row x column (right-handed): the series may hold the scan reoriented
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(read.GetDirection())
    expected = sitk.DICOMOrient(original, code)
    assert read.GetSize() == expected.GetSize()
    assert np.allclose(read.GetSpacing(), expected.GetSpacing(), atol=1e-4)
    assert np.allclose(read.GetOrigin(), expected.GetOrigin(), atol=1e-3)
    values, stored = sitk.GetArrayFromImage(expected), sitk.GetArrayFromImage(read)
    assert np.abs(values - stored).max() <= 1e-4 * (values.max() - values.min()) + 1e-6  # int16 quantisation
    ordered = source_datasets(series, read)
    assert [int(ds.InstanceNumber) for ds in ordered] == sorted(int(ds.InstanceNumber) for ds in ordered)


def test_batch_on_a_dicom_series_writes_a_parametric_map_equal_to_the_nifti_heatmap(series, tiny_model, tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, "-m", "cradl", "detect", str(series), "--out-dir", str(tmp_path),
                          "--model", str(tiny_model), "--workers", "1", "--quiet"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    row = next(csv.DictReader((tmp_path / "summary.csv").read_text().splitlines()))
    assert row["status"] == "ok" and row["pmap"].endswith("series_anomaly_pmap.dcm")
    report = json.loads(Path(row["report"]).read_text())
    heatmap = sitk.ReadImage(row["heatmap"])
    pmap = pydicom.dcmread(row["pmap"])
    sources = _source_positions(series)
    source = next(iter(sources.values()))[0]
    _check_references(pmap, source, report["model"]["name"])
    assert pmap.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    assert report["model"]["version"] in pmap.SoftwareVersions
    # geometry: every frame sits on a source slice, same in-plane grid
    shared = pmap.SharedFunctionalGroupsSequence[0]
    assert np.allclose(shared.PixelMeasuresSequence[0].PixelSpacing, source.PixelSpacing)
    assert np.allclose(shared.PlaneOrientationSequence[0].ImageOrientationPatient, source.ImageOrientationPatient)
    array = sitk.GetArrayFromImage(heatmap)
    frames = pmap.pixel_array
    assert frames.shape == array.shape and frames.dtype == np.float32
    for k, position in enumerate(_frame_positions(pmap)):
        index = heatmap.TransformPhysicalPointToIndex(position.tolist())
        assert np.allclose(heatmap.TransformIndexToPhysicalPoint(index), position, atol=1e-3)
        assert np.array_equal(frames[k], array[index[2]])  # the NIfTI heatmap's values, exactly
    if report["regions"]:
        assert row["seg"] and os.path.exists(row["seg"])


def test_regions_round_trip_through_a_dicom_segmentation(series, tiny_detector, tmp_path):
    import highdicom as hd
    from cradl.io import write_image
    from cradl.regions import find_regions

    result = tiny_detector.detect(series)
    # a threshold low enough that the tiny model shows regions, so the segmentation has segments to check
    threshold = 0.5 * float(sitk.GetArrayViewFromImage(result.heatmap).max())
    result.threshold = threshold
    result.regions, result.region_labels = find_regions(result.heatmap, threshold, result.min_region_mm3)
    assert result.regions
    write_image(result.heatmap, tmp_path / "heat.nii.gz")
    written = write_dicom_results(series, result, tiny_detector.model_summary(), tmp_path / "seg.dcm",
                                  tmp_path / "pmap.dcm")
    assert written == {"seg": tmp_path / "seg.dcm", "pmap": tmp_path / "pmap.dcm"}
    # the reference: regions found again on the NIfTI heatmap as written to disk
    nifti = sitk.ReadImage(str(tmp_path / "heat.nii.gz"))
    regions, labels = find_regions(nifti, threshold, result.min_region_mm3)
    labels = sitk.GetArrayFromImage(labels)

    seg = hd.seg.segread(tmp_path / "seg.dcm")
    sources = _source_positions(series)
    source = next(iter(sources.values()))[0]
    _check_references(seg, source, tiny_detector.model_summary()["name"])
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert seg.number_of_segments == len(regions)
    for number in seg.segment_numbers:
        description = seg.get_segment_description(number)
        algorithm = description.algorithm_identification[0]
        assert algorithm.AlgorithmName == "cradl-tiny-test" and algorithm.AlgorithmVersion == "0.0.1"
    uids = list(sources)
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, ignore_spatial_locations=False,
                                               assert_missing_frames_are_empty=True)
    for uid, frame in zip(uids, pixels):
        k = nifti.TransformPhysicalPointToIndex(sources[uid][1].tolist())[2]
        for s, number in enumerate(seg.segment_numbers):
            assert np.array_equal(frame[..., s] > 0, labels[k] == number), (uid, number)


@pytest.mark.slow
def test_single_dicom_input_writes_seg_and_pmap_beside_the_report(series, tiny_model, tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, "-m", "cradl", "detect", str(series), "--model", str(tiny_model),
                          "--report", str(tmp_path / "r.json"), "--pmap", str(tmp_path / "p.dcm"),
                          "--seg", str(tmp_path / "s.dcm"), "--quiet"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    pmap = pydicom.dcmread(tmp_path / "p.dcm")
    assert pmap.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30" and DISCLAIMER in pmap.SeriesDescription
    assert (tmp_path / "s.dcm").exists() == bool(report["regions"])


@pytest.mark.parametrize("extra, message", [
    (["--pmap", "p.dcm", "--report", "r.json"], "need a DICOM series input"),
    (["--seg", "s.dcm", "--no-heatmap", "--report", "r.json"], "need a DICOM series input"),
])
def test_dicom_outputs_for_a_nifti_input_are_refused_with_one_line(sample_case, tmp_path, extra, message):
    run = subprocess.run([sys.executable, "-m", "cradl", "detect", str(sample_case[2]),
                          *[str(tmp_path / e) if e.endswith((".dcm", ".json")) else e for e in extra]],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 2 and run.stderr.strip().endswith(message + " (a folder holding one series)")
    assert list(tmp_path.iterdir()) == []
