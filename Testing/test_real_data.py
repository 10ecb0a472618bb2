"""Real scans: brain extraction on heads with skull, brain-only alignment, the recorded subject split,
out-of-distribution honesty, and the lesions painted into real anatomy for evaluation.

Tests that need the shared real data (`../shared/data`, or $CRADL_REAL_DATA) skip where it is absent,
as in a user's clone."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from cradl import realdata
from cradl.brain import dice, extract_brain, stripped_region
from cradl.errors import InputError
from cradl.space import array_from_ras_canonical, ras_canonical_array
from cradl.typicality import assess, fit_typicality

needs_real_data = pytest.mark.skipif(not realdata.available(), reason="shared real data not on this machine")


def _oriented(code: str) -> sitk.Image:
    image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6))
    image.SetSpacing((1.0, 2.0, 3.0))
    return sitk.DICOMOrient(image, code)


@pytest.mark.parametrize("code", ["LPS", "RAS", "PIR", "SAR", "ASL"])
def test_ras_canonical_layout_matches_nibabel_and_round_trips(code, tmp_path):
    import nibabel as nib

    image = _oriented(code)
    sitk.WriteImage(image, str(tmp_path / "x.nii.gz"))
    expected = nib.as_closest_canonical(nib.load(tmp_path / "x.nii.gz")).get_fdata()
    canonical = ras_canonical_array(image)
    assert np.array_equal(canonical, expected)
    mask = canonical > canonical.mean()
    back = array_from_ras_canonical(mask, image)
    assert np.array_equal(back, sitk.GetArrayFromImage(image) > canonical.mean())


def test_a_skull_stripped_scan_keeps_its_own_brain_region():
    from cradl.synthetic.scans import make_normal_scan

    image, labels = make_normal_scan(np.random.default_rng(2024), contrast="t1")
    brain = sitk.GetArrayFromImage(labels) > 0
    stripped = sitk.GetImageFromArray(np.where(brain, sitk.GetArrayFromImage(image), 0).astype(np.float32))
    stripped.CopyInformation(image)
    mask, method = extract_brain(stripped)
    assert method == "already stripped"
    assert np.array_equal(sitk.GetArrayFromImage(mask) > 0, stripped_region(stripped))
    assert mask.GetSize() == image.GetSize() and mask.GetDirection() == image.GetDirection()
    _, method = extract_brain(image)  # the same brain with its noisy background: the network's mask
    assert method == "network"


@pytest.mark.parametrize("kind", ["noise", "ellipsoid"])
def test_noise_and_phantoms_are_still_refused(kind):
    from cradl.preprocess import DEFAULT_NORMALISATION, prepare_scan
    from cradl.space import ReferenceSpace

    rng = np.random.default_rng(0)
    if kind == "noise":
        array = rng.normal(100, 30, (60, 80, 80))
    else:  # a uniform ellipsoid with a little noise: brain-sized, but no anatomy
        z, y, x = np.mgrid[:60, :80, :80]
        array = np.where(((z - 30) / 24) ** 2 + ((y - 40) / 32) ** 2 + ((x - 40) / 28) ** 2 < 1, 500.0, 0.0)
        array += rng.normal(0, 5, array.shape)
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing((2.0, 2.0, 2.0))
    with pytest.raises(InputError, match="brain"):
        prepare_scan(image, ReferenceSpace.from_mni(64, 3.0), DEFAULT_NORMALISATION, 0.15)


def test_typicality_flags_scans_unlike_every_normal_one():
    rng = np.random.default_rng(0)
    fitted = fit_typicality([rng.normal(0, 1, 60) for _ in range(20)])
    assert fitted["limit"] >= 1.5
    calibration = {"typicality": fitted}
    lesion = np.concatenate([rng.normal(0, 1, 50), np.full(10, 8.0)])  # a few slices very high: a finding
    elsewhere = rng.normal(4.0, 1, 60)  # every slice high: another kind of scan
    assert not assess(lesion, calibration)["out_of_distribution"]
    assert assess(elsewhere, calibration)["out_of_distribution"]
    assert assess(lesion, {}) is None  # older bundles: no claim either way


def test_recorded_split_is_by_subject_disjoint_and_reproducible():
    recorded = json.loads(realdata.SPLIT_FILE.read_text())
    groups = recorded["groups"]
    ids = [i for g in groups.values() for i in g]
    assert len(ids) == len(set(ids)) == recorded["n_subjects"]
    assert len(groups["test"]) >= 30
    assert realdata.make_split(sorted(ids), recorded["seed"]) == groups


@needs_real_data
def test_recorded_split_covers_the_shared_subjects():
    assert sorted(s.id for s in realdata.ixi_subjects()) == sorted(i for g in realdata.recorded_split().values()
                                                                   for i in g)


@needs_real_data
def test_brain_extraction_of_a_held_out_head_with_skull_matches_its_label_mask():
    subject = realdata.subjects_in("test")[0]
    image = sitk.ReadImage(str(subject.t1))
    mask, method = extract_brain(image)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(subject.labels))) > 0
    assert method == "network"
    assert dice(sitk.GetArrayFromImage(mask) > 0, labels) >= 0.95


@needs_real_data
def test_a_head_with_skull_is_accepted_and_aligned_to_the_template():
    from cradl import AnomalyDetector

    detector = AnomalyDetector.load(device="cpu")
    subject = realdata.subjects_in("test")[1]
    prepared = detector.prepare(sitk.ReadImage(str(subject.t1)))
    template_brain = sitk.GetArrayFromImage(detector.space.template_mask) > 0
    assert prepared.brain_extraction == "network"
    assert dice(prepared.mask, template_brain) >= 0.85  # the subject's brain over the template's, after affine
    assert prepared.t1_likeness > 0.3


@needs_real_data
def test_a_real_stroke_shape_is_painted_into_the_brain_as_a_dark_lesion():
    from cradl.evaluate.realset import paint_infarct, stroke_library
    from cradl.preprocess import DEFAULT_NORMALISATION, brain_only
    from cradl.space import ReferenceSpace

    subject = realdata.subjects_in("test")[2]
    image = sitk.ReadImage(str(subject.t1), sitk.sitkFloat32)
    before = sitk.GetArrayFromImage(image).copy()
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(subject.labels))) > 0
    space = ReferenceSpace.from_mni(64, 3.0)
    brain_image = sitk.GetImageFromArray(brain.astype(np.uint8))
    brain_image.CopyInformation(image)
    to_scan = space.align(brain_only(image, brain_image, DEFAULT_NORMALISATION, 3.0))
    shape, _ = stroke_library(min_ml=5.0)[0]
    painted, lesion = paint_infarct(image, sitk.ReadImage(str(shape)), to_scan.GetInverse(), brain,
                                    np.random.default_rng(0))
    after = sitk.GetArrayFromImage(painted)
    assert np.array_equal(sitk.GetArrayFromImage(image), before)  # input untouched
    assert lesion.sum() > 100 and not (lesion & ~brain).any()
    assert after[lesion].mean() < 0.8 * before[lesion].mean()
    assert np.allclose(after[~brain], before[~brain])


def test_real_commands_name_missing_data_in_one_line(tmp_path):
    import subprocess
    import sys

    for argv in (["real-set", "--out", str(tmp_path / "set")], ["train-real", "--out", str(tmp_path / "m.cradl")],
                 ["calibrate-real", "--out", str(tmp_path / "m.cradl")],
                 ["benchmark-real", "--set", str(tmp_path), "--out-dir", str(tmp_path / "b")]):
        run = subprocess.run([sys.executable, "-m", "cradl", *argv, "--data", str(tmp_path / "nowhere")],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and run.stderr.count("\n") == 1 and "real data not found" in run.stderr
        assert not (tmp_path / "set").exists() and not (tmp_path / "m.cradl").exists()


@needs_real_data
def test_calibrate_real_never_overwrites_its_model_and_writes_only_bundles(tmp_path):
    import subprocess
    import sys

    model = tmp_path / "m.cradl"
    model.write_bytes(b"the model the run would read")
    for out, message in ((model, "it would be overwritten"), (tmp_path / "m.model", "must end with .cradl")):
        argv = ["calibrate-real", "--model", str(model), "--out", str(out)]
        run = subprocess.run([sys.executable, "-m", "cradl", *argv], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and run.stderr.count("\n") == 1 and message in run.stderr, run.stderr
    assert model.read_bytes() == b"the model the run would read" and sorted(tmp_path.iterdir()) == [model]


def test_group_table_reports_each_group_against_the_same_normals():
    from cradl.evaluate.metrics import CaseScores, score_histograms
    from cradl.evaluate.real import group_table, markdown

    rng = np.random.default_rng(0)
    cases, rows = [], []
    for i, (kind, shift) in enumerate([("normal", 0.0)] * 6 + [("stroke", 3.0)] * 6 + [("brats", 3.0)] * 2):
        lesion = np.zeros((8, 8, 8), bool)
        if kind != "normal":
            lesion[2:5, 2:5, 2:5] = True
        heat = rng.random((8, 8, 8)) + shift * lesion
        case = CaseScores(f"c{i}", kind, 20.0, float(shift + rng.random()), rng.random(5), np.zeros(5, bool))
        case.pos_hist, case.neg_hist = score_histograms(heat, lesion, np.ones_like(lesion))
        case.n_regions = int(kind != "normal")
        case.extra["first_hit_rank"] = 1 if kind != "normal" else None
        cases.append(case)
        rows.append({"id": case.case_id, "type": kind, "contrast": "t1",
                     "methods": {"CRADL": {"percentile": 99.0 if kind != "normal" else 40.0,
                                           "out_of_distribution": False, "first_hit_rank": 1, "voxel_ap": 0.9,
                                           "best_dice": 0.8}}})
    table = group_table({"CRADL": cases}, rows, n_boot=50)["CRADL"]
    assert table["normal"]["flagged_at_95th"] == 0.0 and table["normal"]["fp_regions_per_scan"] == 0.0
    assert table["stroke"]["volume"]["auroc"] == 1.0 and table["stroke"]["top1_hit_rate"] == 1.0
    assert "volume" not in table["brats"]  # patients vs IXI normals would mix scanner with lesion
    assert table["brats"]["top3_hit_rate"] == 1.0
    prep = {"n_subjects": 1, "dice_mean": 0.98, "dice_min": 0.98, "dice_max": 0.98, "seconds_median": 3.0,
            "n_structures": 100, "alignment_scatter_mm_median": 2.0, "alignment_scatter_mm_p90": 4.0}
    text = markdown({"meta": {"date": "d", "machine": "m", "command": "c"}, "groups": {"CRADL": table},
                     "cases": rows, "brain_extraction_and_alignment": prep})
    assert "| CRADL | 0.00" in text and "c12" in text


def test_the_brain_mask_of_a_scan_seen_again_is_not_recomputed(monkeypatch):
    from cradl import brain
    from cradl.synthetic.scans import make_normal_scan

    image, _ = make_normal_scan(np.random.default_rng(7), contrast="t1")
    first = brain.network_mask(image)
    monkeypatch.setattr(brain, "_run_network", lambda image: pytest.fail("the network ran again"))
    again = brain.network_mask(image)
    assert np.array_equal(first, again)
    again[:] = False  # callers get copies
    assert np.array_equal(brain.network_mask(image), first)
    shifted = sitk.Image(image)
    shifted.SetOrigin([v + 1.0 for v in image.GetOrigin()])
    with pytest.raises(pytest.fail.Exception):
        brain.network_mask(shifted)  # same voxels, another geometry: a new mask


@needs_real_data
def test_leak_free_recalibration_leaves_the_validation_subjects_out_of_every_statistic():
    from cradl import realdata
    from cradl.train.real import recalibration_subjects

    validation = {s.id for s in realdata.subjects_in("validation")}
    calibration = {s.id for s in realdata.subjects_in("calibration")}
    test = set(realdata.recorded_split()["test"])
    as_trained = [s.id for s in recalibration_subjects()]
    leak_free = [s.id for s in recalibration_subjects(leak_free=True)]
    assert sorted(as_trained) == sorted(validation | calibration)  # as training used them
    assert sorted(leak_free) == sorted(calibration)
    assert not (set(as_trained) | set(leak_free)) & test
