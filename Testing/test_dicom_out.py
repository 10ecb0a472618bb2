"""DICOM in, DICOM out: a DICOM series input gets its heatmap as a DICOM Parametric Map and its regions as a
DICOM Segmentation (highdicom); both are read back (pydicom, highdicom) and checked against the NIfTI
outputs: same grid, same values, referencing the source series, naming the model, not for diagnostic use.
The heatmap also comes as a Secondary Capture series blended over the scan (for viewers without Parametric
Maps): one RGB image on each source slice, coloured where the heat is."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from cradl.colormap import region_rgb
from cradl.dicom_out import (
    DISCLAIMER,
    OVERLAY_FILE,
    source_datasets,
    write_dicom_results,
    write_dicom_series,
)
from cradl.errors import InputError, OutputError
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


@pytest.mark.integration
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
    overlay = _overlay_files(Path(row["overlay"]))  # the overlay series: one image per source slice
    assert row["overlay"].endswith("series_anomaly_overlay") and len(overlay) == len(sources)


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
    assert written == {"seg": tmp_path / "seg.dcm", "pmap": tmp_path / "pmap.dcm", "overlay": None}
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
        # the colour the Slicer segmentation gives the region of that rank, so viewers match the panel
        shown = hd.color.CIELabColor.from_dicom_value(description.RecommendedDisplayCIELabValue).to_rgb()
        assert np.allclose(shown, [255 * c for c in region_rgb(number)], atol=2)
    uids = list(sources)
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, ignore_spatial_locations=False,
                                               assert_missing_frames_are_empty=True)
    for uid, frame in zip(uids, pixels):
        k = nifti.TransformPhysicalPointToIndex(sources[uid][1].tolist())[2]
        for s, number in enumerate(seg.segment_numbers):
            assert np.array_equal(frame[..., s] > 0, labels[k] == number), (uid, number)


@pytest.mark.slow
def test_single_dicom_input_writes_seg_pmap_and_overlay_beside_the_report(series, tiny_model, tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, "-m", "cradl", "detect", str(series), "--model", str(tiny_model),
                          "--report", str(tmp_path / "r.json"), "--pmap", str(tmp_path / "p.dcm"),
                          "--seg", str(tmp_path / "s.dcm"), "--overlay", str(tmp_path / "overlay"), "--quiet"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    pmap = pydicom.dcmread(tmp_path / "p.dcm")
    assert pmap.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30" and DISCLAIMER in pmap.SeriesDescription
    assert (tmp_path / "s.dcm").exists() == bool(report["regions"])
    assert len(list((tmp_path / "overlay").iterdir())) == len(list(series.iterdir()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlay", "p.dcm", "r.json"] + (
        ["s.dcm"] if report["regions"] else [])  # no temporary left behind


@pytest.mark.parametrize("extra, message", [
    (["--pmap", "p.dcm", "--report", "r.json"], "need a DICOM series input"),
    (["--seg", "s.dcm", "--no-heatmap", "--report", "r.json"], "need a DICOM series input"),
    (["--overlay", "overlay", "--report", "r.json"], "need a DICOM series input"),
])
def test_dicom_outputs_for_a_nifti_input_are_refused_with_one_line(sample_case, tmp_path, extra, message):
    run = subprocess.run([sys.executable, "-m", "cradl", "detect", str(sample_case[2]),
                          *[e if e.startswith("--") else str(tmp_path / e) for e in extra]],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 2 and run.stderr.strip().endswith(message + " (a folder holding one series)")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- the overlay series

@pytest.fixture(scope="module")
def detected(series, tiny_detector):
    """The tiny model's result on the series, with a threshold low enough that it has heat above it."""
    result = tiny_detector.detect(series)
    result.threshold = 0.5 * float(sitk.GetArrayViewFromImage(result.heatmap).max())
    return result


def _overlay_files(folder):
    files = sorted(folder.iterdir())
    assert all(OVERLAY_FILE.fullmatch(p.name) for p in files)
    return [pydicom.dcmread(p) for p in files]


def test_overlay_series_blends_the_heatmap_over_every_source_slice(series, detected, tiny_detector, tmp_path):
    model = tiny_detector.model_summary()
    written = write_dicom_results(series, detected, model, overlay_path=tmp_path / "overlay")
    assert written == {"seg": None, "pmap": None, "overlay": tmp_path / "overlay"}
    assert [p.name for p in tmp_path.iterdir()] == ["overlay"]  # no temporary left behind
    images, sources = _overlay_files(tmp_path / "overlay"), _source_positions(series)
    source = next(iter(sources.values()))[0]
    assert len(images) == len(sources)
    assert len({ds.SeriesInstanceUID for ds in images}) == 1 and images[0].SeriesInstanceUID != source.SeriesInstanceUID
    heat = sitk.GetArrayFromImage(detected.heatmap)
    coloured = grey = 0
    for ds in images:
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
        assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert DISCLAIMER in ds.SeriesDescription and DISCLAIMER in ds.ImageComments
        assert model["name"] in ds.ManufacturerModelName and model["version"] in ds.SoftwareVersions
        assert ds.BurnedInAnnotation == "NO" and ds.ConversionType == "WSD"
        # on its source slice: referenced, and at the same place
        uid = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
        assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == uid
        origin, position = sources[uid]
        assert np.allclose(np.array(ds.ImagePositionPatient, dtype=float), position)
        assert np.allclose(ds.ImageOrientationPatient, origin.ImageOrientationPatient)
        assert np.allclose(ds.PixelSpacing, origin.PixelSpacing)
        # RGB over the source grid: coloured where the heat is above the threshold, grey where there is none
        assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3 and ds.BitsAllocated == 8
        rgb = ds.pixel_array
        assert rgb.dtype == np.uint8 and rgb.shape == (origin.Rows, origin.Columns, 3)
        k = detected.heatmap.TransformPhysicalPointToIndex(position.tolist())[2]
        hot, cold = heat[k] >= detected.threshold, heat[k] <= 0
        r, g, b = (rgb[..., c].astype(int) for c in range(3))
        assert np.all((r != g) | (g != b) | ~hot) and np.all((r == g) & (g == b) | ~cold)
        coloured, grey = coloured + int(hot.sum()), grey + int(cold.sum())
    assert coloured > 0 and grey > 0


def test_overlay_grey_follows_the_scan_where_there_is_no_heat(series, detected, tiny_detector, tmp_path):
    from pydicom.pixels import apply_modality_lut

    write_dicom_results(series, detected, tiny_detector.model_summary(), overlay_path=tmp_path / "overlay")
    sources = {uid: ds for uid, (ds, _) in _source_positions(series).items()}
    heat = sitk.GetArrayFromImage(detected.heatmap)
    for ds in _overlay_files(tmp_path / "overlay")[::10]:
        source = pydicom.dcmread(sources[ds.SourceImageSequence[0].ReferencedSOPInstanceUID].filename)
        k = detected.heatmap.TransformPhysicalPointToIndex([float(v) for v in ds.ImagePositionPatient])[2]
        cold = heat[k] <= 0
        values, red = apply_modality_lut(source.pixel_array, source)[cold], ds.pixel_array[..., 0][cold].astype(int)
        order = np.argsort(values, kind="stable")
        assert np.all(np.diff(red[order]) >= 0)  # windowed grey: brighter scan, brighter pixel


def test_overlay_replaces_an_earlier_overlay_but_never_a_foreign_folder(series, detected, tiny_detector, tmp_path):
    model, folder = tiny_detector.model_summary(), tmp_path / "overlay"
    write_dicom_results(series, detected, model, overlay_path=folder)
    first = {ds.SOPInstanceUID for ds in _overlay_files(folder)}
    write_dicom_results(series, detected, model, overlay_path=folder)  # a rerun: replaced whole
    again = _overlay_files(folder)
    assert len(again) == len(first) and not first & {ds.SOPInstanceUID for ds in again}
    assert [p.name for p in tmp_path.iterdir()] == ["overlay"]
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="notes.txt"):
        write_dicom_results(series, detected, model, overlay_path=folder)
    assert (folder / "notes.txt").read_text() == "mine" and len(list(folder.iterdir())) == len(first) + 1


def test_a_series_that_does_not_map_writes_no_dicom_result(series, detected, tiny_detector, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(series, broken)
    sorted(broken.iterdir())[5].unlink()  # a slice missing: the results cannot be put on the series
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match="DICOM slices for a scan of"):
        write_dicom_results(broken, detected, tiny_detector.model_summary(), out / "seg.dcm", out / "pmap.dcm",
                            out / "overlay")
    assert list(out.iterdir()) == []


def test_a_batch_rerun_redoes_a_scan_whose_overlay_folder_is_incomplete(series, detected, tiny_detector, tmp_path):
    from cradl.batch.runner import _write_record, input_signature, read_valid_record

    report, overlay = tmp_path / "series_anomaly_report.json", tmp_path / "series_anomaly_overlay"
    report.write_text("{}")
    write_dicom_results(series, detected, tiny_detector.model_summary(), overlay_path=overlay)
    task = {"input": str(series), "input_signature": input_signature(series), "model_sha256": "0" * 64,
            "options": {"no_heatmap": False, "mask": None}, "outputs": {"report": str(report), "overlay": str(overlay)}}
    _write_record(task, {"report": report, "overlay": overlay}, {"status": "ok"})
    assert read_valid_record(task) is not None  # complete: skipped on a rerun
    victim = sorted(overlay.iterdir())[3]
    data = victim.read_bytes()
    victim.write_bytes(data[:-10])  # cut short
    assert read_valid_record(task) is None
    victim.write_bytes(data)
    assert read_valid_record(task) is not None
    victim.unlink()  # a file missing
    assert read_valid_record(task) is None
    shutil.rmtree(overlay)  # the folder missing
    assert read_valid_record(task) is None
