"""The synthetic normal cohort (cradl.synthetic.scans and .sets): what the trainer and the CLI can rely on."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "CRADLAnomaly"))

from cradl.synthetic.scans import CONTRASTS, _sample_parameters, make_normal_scan, mni_brain_centre  # noqa: E402
from cradl.synthetic.sets import generate_normal_cohort  # noqa: E402
from cradl.template import load_mni  # noqa: E402


def _seed_with(**wanted) -> int:
    """The first seed whose drawn parameters match `wanted` (parameters are drawn first from the rng)."""
    for seed in range(500):
        p = _sample_parameters(np.random.default_rng(seed), wanted.get("contrast"))
        if all(p[k] == v for k, v in wanted.items()):
            return seed
    raise AssertionError(f"no seed gives {wanted}")


def _interior(labels: np.ndarray, value: int) -> np.ndarray:
    """Voxels of `value` whose 6 neighbours share it (no partial volume with another tissue)."""
    m = labels == value
    inner = m.copy()
    for axis in range(3):
        inner &= np.roll(m, 1, axis) & np.roll(m, -1, axis)
    return inner


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("normals")
    paths = generate_normal_cohort(out, n=3, seed=11, progress=False)
    return out, paths


def test_cohort_files_and_record(cohort):
    out, paths = cohort
    assert [p.name for p in paths] == ["normal_000.nii.gz", "normal_001.nii.gz", "normal_002.nii.gz"]
    record = json.loads((out / "cohort.json").read_text())
    assert record["seed"] == 11 and record["n"] == 3 and len(record["scans"]) == 3
    for path, rec in zip(paths, record["scans"]):
        assert rec["image"] == path.name and rec["contrast"] in CONTRASTS
        assert {"resolution", "spacing", "augmentation", "labels"} <= set(rec)
        assert {"rotation_deg", "translation_mm", "scale", "noise_sigma", "bias_strength",
                "deformation_mm", "tissue_means"} <= set(rec["augmentation"])
        image, labels = sitk.ReadImage(str(path)), sitk.ReadImage(str(out / rec["labels"]))
        assert image.GetSize() == labels.GetSize() and image.GetDirection() == labels.GetDirection()
        assert np.allclose(image.GetSpacing(), rec["spacing"]) and np.allclose(labels.GetOrigin(), image.GetOrigin())
        assert set(np.unique(sitk.GetArrayViewFromImage(labels))) <= {0, 1, 2, 3}
        a = sitk.GetArrayViewFromImage(image)
        assert np.isfinite(a).all() and a.min() >= 0 and 300 < a.max() < 3000
    # the cohort mixes contrasts
    assert len({rec["contrast"] for rec in record["scans"]}) == 3


def test_writes_are_atomic_no_temporary_files_left(cohort):
    out, _ = cohort
    names = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert all(not n.startswith(".") and (n.endswith(".nii.gz") or n == "cohort.json") for n in names), names
    assert len(names) == 3 + 3 + 1


def test_same_seed_gives_identical_files_other_seed_differs(cohort, tmp_path):
    out, _ = cohort
    again = generate_normal_cohort(tmp_path / "again", n=2, seed=11, progress=False)
    for path in again:
        assert path.read_bytes() == (out / path.name).read_bytes()
        assert (tmp_path / "again" / "labels" / path.name.replace(".nii.gz", "_labels.nii.gz")).read_bytes() == \
            (out / "labels" / path.name.replace(".nii.gz", "_labels.nii.gz")).read_bytes()
    a, _ = make_normal_scan(np.random.default_rng(5), "t1")
    b, _ = make_normal_scan(np.random.default_rng(6), "t1")
    assert a.GetSize() != b.GetSize() or not np.array_equal(sitk.GetArrayViewFromImage(a),
                                                            sitk.GetArrayViewFromImage(b))


def test_geometry_varies_like_real_scans():
    params = [_sample_parameters(np.random.default_rng(s), None) for s in range(60)]
    assert {p["direction_name"] for p in params} >= {"LPS", "RAS", "sagittal", "coronal"}
    assert {p["resolution"] for p in params} == {"iso", "thick", "aniso", "blur"}
    assert sum(p["resolution"] == "iso" for p in params) > len(params) / 3        # 1 mm isotropic mostly
    thick = [p for p in params if p["resolution"] == "thick"]
    assert all(3 <= p["spacing"][2] <= 5 for p in thick)
    assert {p["contrast"] for p in params} == set(CONTRASTS)


_NO_JITTER = {"rotation_deg": [0.0, 0.0, 0.0], "translation_mm": [0.0, 0.0, 0.0], "scale": [1.0, 1.0, 1.0],
              "deformation_mm": 0.0}


def _on_template_grid(labels: sitk.Image) -> np.ndarray:
    ref = load_mni("t1")
    return sitk.GetArrayFromImage(sitk.Resample(labels, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.mark.parametrize("wanted", [{"direction_name": "LPS"}, {"direction_name": "RAS"},
                                    {"direction_name": "sagittal"}, {"direction_name": "coronal"},
                                    {"direction_name": "random"}, {"resolution": "thick"}])
def test_brain_is_anatomically_placed_whatever_the_grid(wanted):
    """Whatever the direction matrix and spacing, the brain is where the template puts it in physical
    space. Without the head-position jitter, resampled onto the template's grid it lies on the
    template's brain tissue by tissue (a flipped or permuted axis would ruin that: the brain is not
    symmetric front-back or top-bottom); with the jitter, its centre of mass stays within ~20 mm."""
    seed = _seed_with(**wanted)
    image, labels = make_normal_scan(np.random.default_rng(seed), _overrides=_NO_JITTER)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    assert np.allclose(np.abs(direction).sum(0), 1) and abs(abs(np.linalg.det(direction)) - 1) < 1e-9
    on_ref = _on_template_grid(labels)
    template_brain = sitk.GetArrayViewFromImage(load_mni("t1")) > 0.02
    dice = _dice(template_brain, on_ref > 0)
    assert dice > 0.93, dice
    for flipped in (template_brain[::-1], template_brain[:, ::-1]):     # upside down, back to front
        assert _dice(flipped, on_ref > 0) < dice - 0.1
    wm = sitk.GetArrayViewFromImage(load_mni("wm")) > 0.5
    assert (on_ref[wm] == 3).mean() > 0.8

    jittered, labels = make_normal_scan(np.random.default_rng(seed))
    assert jittered.GetDirection() == image.GetDirection()
    lab = sitk.GetArrayViewFromImage(labels)
    com_index = np.argwhere(lab > 0).mean(axis=0)[::-1]
    com = np.array(labels.TransformContinuousIndexToPhysicalPoint(com_index.tolist()))
    assert np.linalg.norm(com - mni_brain_centre()) < 20.0
    assert _dice(template_brain, _on_template_grid(labels) > 0) > 0.75


@pytest.mark.parametrize("contrast", CONTRASTS)
def test_tissue_contrast_is_ordered(contrast):
    seed = _seed_with(contrast=contrast, resolution="iso")
    image, labels = make_normal_scan(np.random.default_rng(seed), contrast)
    a, lab = sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(labels)
    csf, gm, wm = (float(np.median(a[_interior(lab, v)])) for v in (1, 2, 3))
    if contrast == "t1":
        assert wm > gm > csf
    elif contrast == "t2":
        assert csf > gm > wm
    else:
        assert gm > wm > csf
    assert np.median(a[lab == 0]) < 0.2 * max(csf, gm, wm)      # dark background (noise only)


def test_drawn_tissue_means_are_ordered():
    for seed in range(30):
        for contrast in CONTRASTS:
            m = _sample_parameters(np.random.default_rng(seed), contrast)["tissue_means"]
            order = {"t1": ("wm", "gm", "csf"), "t2": ("csf", "gm", "wm"), "flair": ("gm", "wm", "csf")}[contrast]
            assert m[order[0]] > m[order[1]] > m[order[2]]


def test_unknown_contrast_is_refused():
    with pytest.raises(ValueError):
        make_normal_scan(np.random.default_rng(0), "pd")
