"""Labelled abnormal cases (cradl.synthetic.lesions and .sets): each anomaly changes the scan where its mask
says, barely anywhere else, has about the size asked for, and looks like what it imitates."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "CRADLAnomaly"))

from cradl.synthetic.lesions import ANOMALY_TYPES, insert_anomaly  # noqa: E402
from cradl.synthetic.scans import _sample_parameters, make_normal_scan  # noqa: E402
from cradl.synthetic.sets import generate_anomaly_set, generate_normal_cohort  # noqa: E402

DEFORMING = ("tumour", "deformation")        # move tissue: small changes around the mask are expected


def _seed_with(**wanted) -> int:
    for seed in range(500):
        p = _sample_parameters(np.random.default_rng(seed), wanted.get("contrast"))
        if all(p[k] == v for k, v in wanted.items()):
            return seed
    raise AssertionError(wanted)


@pytest.fixture(scope="module")
def scans():
    """One 1 mm scan per contrast, and a thick-slice one with a permuted direction matrix."""
    out = {}
    for contrast in ("t1", "t2", "flair"):
        seed = _seed_with(contrast=contrast, resolution="iso")
        out[contrast] = make_normal_scan(np.random.default_rng(seed), contrast)
    seed = _seed_with(resolution="thick", direction_name="sagittal")
    out["thick"] = make_normal_scan(np.random.default_rng(seed))
    return out


def _physical_points(image: sitk.Image, mask: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask)[:, ::-1].astype(float)                         # i, j, k
    m = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    return np.array(image.GetOrigin()) + idx @ m.T


def _check(image, labels, kind, size, seed=0, contrast=None):
    before = sitk.GetArrayFromImage(image)
    abnormal, mask = insert_anomaly(image, labels, kind, size, np.random.default_rng(seed), contrast)
    assert np.array_equal(sitk.GetArrayViewFromImage(image), before), "the input was modified"
    for out in (abnormal, mask):
        assert out.GetSize() == image.GetSize() and out.GetSpacing() == image.GetSpacing()
        assert out.GetOrigin() == image.GetOrigin() and out.GetDirection() == image.GetDirection()
    assert mask.GetPixelID() == sitk.sitkUInt8
    a, m = sitk.GetArrayFromImage(abnormal), sitk.GetArrayFromImage(mask).astype(bool)
    assert np.isfinite(a).all() and a.min() >= 0
    return before, a, m


@pytest.mark.parametrize("kind", ANOMALY_TYPES)
def test_each_type_changes_the_scan_inside_its_mask_only(scans, kind):
    image, labels = scans["t2"]
    before, a, m = _check(image, labels, kind, 20.0, seed=3)
    lab = sitk.GetArrayViewFromImage(labels)
    assert m.any() and (lab[m] > 0).all(), "the mask lies inside the brain"
    diff = np.abs(a - before)
    level = float(np.median(before[lab == 2]))                             # grey-matter level
    assert diff[m].mean() > (0.03 if kind in DEFORMING + ("copy_patch",) else 0.1) * level
    # nothing changes far from the anomaly
    pts = _physical_points(image, m)
    centre = pts.mean(axis=0)
    changed = _physical_points(image, diff > 0)
    assert np.linalg.norm(changed - centre, axis=1).max() < 1.2 * 20.0 + 5
    if kind not in DEFORMING:     # visible changes (>10 % of GM) are all in the mask, up to its soft edge
        visible = diff > 0.1 * level
        edge = visible & ~m
        assert edge.sum() <= 0.1 * visible.sum()


@pytest.mark.parametrize("size", [5.0, 35.0])
@pytest.mark.parametrize("kind", ANOMALY_TYPES)
def test_mask_extent_matches_size(scans, kind, size):
    image, labels = scans["t1"]
    _, _, m = _check(image, labels, kind, size, seed=int(size))
    pts = _physical_points(image, m)
    extent = (pts.max(axis=0) - pts.min(axis=0)).max() + 1.0
    assert extent <= 1.25 * size + 2.0, extent
    if kind in ("tumour", "resection", "blob", "noise_patch", "copy_patch", "deformation") and size > 10:
        assert extent >= 0.6 * size, extent


@pytest.mark.parametrize("kind", ANOMALY_TYPES)
def test_works_on_thick_slices_and_permuted_axes(scans, kind):
    image, labels = scans["thick"]
    _, a, m = _check(image, labels, kind, 20.0, seed=4)
    assert m.any() and (sitk.GetArrayViewFromImage(labels)[m] > 0).all()
    pts = _physical_points(image, m)
    assert (pts.max(axis=0) - pts.min(axis=0)).max() <= 1.25 * 20 + max(image.GetSpacing())


def _tissue_median(image, labels, value):
    return float(np.median(sitk.GetArrayViewFromImage(image)[sitk.GetArrayViewFromImage(labels) == value]))


@pytest.mark.parametrize("contrast", ["t1", "t2", "flair"])
def test_lesions_look_as_they_do_on_each_contrast(scans, contrast):
    image, labels = scans[contrast]
    gm, wm = _tissue_median(image, labels, 2), _tissue_median(image, labels, 3)
    before, a, m = _check(image, labels, "wm_lesions", 20.0, seed=1, contrast=contrast)
    assert (sitk.GetArrayViewFromImage(labels)[m] == 3).all()              # inside white matter
    ratio = float(np.median(a[m] / np.maximum(before[m], 1)))             # against the same voxels before
    if contrast == "t1":
        assert ratio < 0.85                            # hypointense on T1
    else:
        assert ratio > 1.2                             # hyperintense on T2 and FLAIR
        assert float(np.median(a[m])) > gm             # brighter than grey matter too
    _, a, m = _check(image, labels, "resection", 35.0, seed=1, contrast=contrast)
    pts = _physical_points(image, m)
    core = np.zeros_like(m)
    core[m] = np.linalg.norm(pts - pts.mean(axis=0), axis=1) < 5.0        # the middle of the cavity, not its rim
    cavity = float(np.median(a[core]))
    if contrast == "t2":
        assert cavity > gm                             # fluid bright on T2
    else:
        assert cavity < 0.7 * min(gm, wm)              # fluid dark on T1 and FLAIR
    before, a, m = _check(image, labels, "stroke", 35.0, seed=1, contrast=contrast)
    lab = sitk.GetArrayViewFromImage(labels)
    assert (np.isin(lab[m], (2, 3))).all()             # grey matter and juxtacortical white matter
    assert (lab[m] == 2).mean() > 0.4
    ratio = float(np.median(a[m & (lab == 2)] / np.maximum(before[m & (lab == 2)], 1)))
    assert (ratio < 0.9) if contrast == "t1" else (ratio > 1.15)


def test_contrast_is_inferred_when_not_given(scans):
    from cradl.synthetic.lesions import _Scan, infer_contrast
    for contrast in ("t1", "t2", "flair"):
        image, labels = scans[contrast]
        assert infer_contrast(_Scan(image, labels).tissue_medians()) == contrast


def test_tumour_has_mass_effect_and_same_seed_same_result(scans):
    image, labels = scans["flair"]
    info = {}
    a1, m1 = insert_anomaly(image, labels, "tumour", 35.0, np.random.default_rng(9), "flair", info)
    a2, m2 = insert_anomaly(image, labels, "tumour", 35.0, np.random.default_rng(9), "flair")
    assert np.array_equal(sitk.GetArrayViewFromImage(a1), sitk.GetArrayViewFromImage(a2))
    assert np.array_equal(sitk.GetArrayViewFromImage(m1), sitk.GetArrayViewFromImage(m2))
    # tissue outside the lesion has moved a little (mass effect), not only inside it
    before = sitk.GetArrayViewFromImage(image)
    moved = (np.abs(sitk.GetArrayViewFromImage(a1) - before) > 0) & ~sitk.GetArrayViewFromImage(m1).astype(bool)
    assert moved.sum() > 100


def test_unknown_type_is_refused(scans):
    with pytest.raises(ValueError):
        insert_anomaly(*scans["t1"], "cyst", 10.0, np.random.default_rng(0))


@pytest.fixture(scope="module")
def anomaly_set(tmp_path_factory):
    normal = tmp_path_factory.mktemp("normal")
    generate_normal_cohort(normal, n=2, seed=3, progress=False)
    out = tmp_path_factory.mktemp("abnormal")
    manifest = generate_anomaly_set(normal, out, seed=5, sizes_mm=(10, 30), types=("tumour", "blob", "stroke"),
                                    n_normals=1, progress=False)
    return normal, out, manifest


def test_anomaly_set_manifest_and_files(anomaly_set):
    normal, out, manifest = anomaly_set
    assert manifest == out / "manifest.json"
    data = json.loads(manifest.read_text())
    cases = data["cases"]
    assert len(cases) == 1 + 3 * 2
    cohort = {rec["image"]: rec["contrast"] for rec in json.loads((normal / "cohort.json").read_text())["scans"]}
    for case in cases:
        assert {"image", "mask", "type", "size_mm", "contrast", "source"} <= set(case)
        assert (out / case["image"]).is_file() and Path(case["source"]).is_file()
        assert case["contrast"] == cohort[Path(case["source"]).name]       # read from cohort.json
        image = sitk.ReadImage(str(out / case["image"]))
        if case["type"] == "normal":
            assert case["mask"] is None and case["size_mm"] is None
            assert (out / case["image"]).read_bytes() == Path(case["source"]).read_bytes()
        else:
            assert case["type"] in ANOMALY_TYPES and case["size_mm"] in (10.0, 30.0)
            mask = sitk.ReadImage(str(out / case["mask"]))
            assert mask.GetSize() == image.GetSize() and mask.GetDirection() == image.GetDirection()
            assert sitk.GetArrayViewFromImage(mask).any()
    assert sorted({c["type"] for c in cases}) == ["blob", "normal", "stroke", "tumour"]
    names = [p.name for p in out.rglob("*") if p.is_file()]
    assert not [n for n in names if n.startswith(".")], "temporary files left behind"
    assert len(names) == len(cases) + (len(cases) - 1) + 1


def test_anomaly_set_is_reproducible(anomaly_set, tmp_path):
    normal, out, _ = anomaly_set
    again = generate_anomaly_set(normal, tmp_path, seed=5, sizes_mm=(10,), types=("tumour",), n_normals=1,
                                 progress=False)
    case = json.loads(again.read_text())["cases"][1]
    first = {c["id"]: c for c in json.loads((out / "manifest.json").read_text())["cases"]}[case["id"]]
    assert (case["type"], case["size_mm"]) == (first["type"], first["size_mm"])
    assert (tmp_path / case["image"]).read_bytes() == (out / first["image"]).read_bytes()
