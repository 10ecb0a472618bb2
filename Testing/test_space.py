"""Reference space: LPS/RAS in one place, registration recovers known motion, and results map back
onto the input's exact grid whatever the file's orientation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from cradl.io import read_image
from cradl.space import ReferenceSpace, lps_to_ras, ras_to_lps
from cradl.synthetic.scans import template_to_scan_affine


@pytest.fixture(scope="module")
def space():
    return ReferenceSpace.from_mni(64, 3.0)


def test_lps_and_ras_differ_by_the_sign_of_the_first_two_axes():
    p = np.array([[10.0, -20.0, 30.0]])
    assert np.array_equal(lps_to_ras(p), [[-10.0, 20.0, 30.0]])
    assert np.array_equal(ras_to_lps(lps_to_ras(p)), p)


def test_reference_grid_covers_the_template_brain(space):
    mask = sitk.GetArrayViewFromImage(space.template_mask)
    assert mask.shape == (space.grid.size[2], 64, 64)
    assert mask[0].sum() == 0 and mask[-1].sum() == 0  # margin above and below the brain
    assert mask[:, 0, :].sum() == 0 and mask[:, :, 0].sum() == 0  # and around it


def _moved_template(space, rotation=(0.08, -0.05, 0.12), translation=(6.0, -9.0, 4.0)):
    from cradl.template import load_mni

    motion = sitk.Euler3DTransform()
    motion.SetCenter((0.0, -18.0, 10.0))
    motion.SetRotation(*rotation)
    motion.SetTranslation(translation)
    t1 = load_mni("t1")
    return sitk.Resample(t1, t1, motion, sitk.sitkLinear, 0.0), motion


def test_registration_recovers_a_known_rigid_motion(space):
    moved, motion = _moved_template(space)
    found = space.align(moved)
    truth = motion.GetInverse()  # reference point -> where that anatomy now lies in the moved scan
    points = np.random.default_rng(0).uniform(-50, 50, (100, 3)) + (0, -18, 10)
    error = [np.linalg.norm(np.subtract(found.TransformPoint(p), truth.TransformPoint(p))) for p in points]
    assert np.mean(error) < 1.5  # mm, on a 3 mm reference grid


def test_registration_aligns_inverted_contrast(space):
    moved, motion = _moved_template(space)
    array = sitk.GetArrayFromImage(moved)
    inverted = sitk.GetImageFromArray(np.where(array > 0.02, 1.2 - array, 0).astype(np.float32))
    inverted.CopyInformation(moved)  # T2-like: mutual information copes
    found = space.align(inverted)
    truth = motion.GetInverse()
    points = np.random.default_rng(1).uniform(-50, 50, (100, 3)) + (0, -18, 10)
    error = [np.linalg.norm(np.subtract(found.TransformPoint(p), truth.TransformPoint(p))) for p in points]
    assert np.mean(error) < 2.0


def _reoriented(image: sitk.Image, code: str) -> sitk.Image:
    return sitk.DICOMOrient(image, code)


@pytest.mark.parametrize("code", ["LPS", "RAS", "ASL", "IRP"])
def test_results_map_to_the_same_physical_points_whatever_the_storage_order(space, code):
    scan, _ = _moved_template(space)
    scan = sitk.Shrink(scan, (2, 2, 2))
    transform = space.align(scan)
    heat = np.random.default_rng(0).random(tuple(reversed(space.grid.size))).astype(np.float32)
    reference_result = space.to_input(heat, transform, scan)
    stored = _reoriented(scan, code)
    result = space.to_input(heat, transform, stored)
    # same size, spacing, origin, direction as the stored input
    assert result.GetSize() == stored.GetSize() and result.GetDirection() == stored.GetDirection()
    assert result.GetOrigin() == stored.GetOrigin() and result.GetSpacing() == stored.GetSpacing()
    back = sitk.Resample(result, reference_result, sitk.Transform(), sitk.sitkNearestNeighbor)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(reference_result),
                               atol=1e-5)


def test_results_map_onto_an_oblique_grid(space):
    scan, _ = _moved_template(space)
    transform = space.align(scan)
    heat = np.zeros(tuple(reversed(space.grid.size)), np.float32)
    heat[10:14, 20:24, 30:34] = 1.0  # a marked block in reference space
    oblique = sitk.Image([80, 90, 70], sitk.sitkFloat32)
    rotation = sitk.VersorTransform((0.3, 0.2, 0.9), 0.4).GetMatrix()
    oblique.SetDirection(rotation)
    oblique.SetSpacing((2.2, 2.0, 2.5))
    oblique.SetOrigin(np.array(scan.TransformContinuousIndexToPhysicalPoint(np.array(scan.GetSize()) / 2))
                      - np.array(rotation).reshape(3, 3) @ (np.array([80, 90, 70]) * [2.2, 2.0, 2.5] / 2))
    result = space.to_input(heat, transform, oblique)
    # the block's centre in reference space lands where the block shows in the oblique result
    centre_ref = space.grid.origin + space.grid.spacing * np.array([31.5, 21.5, 11.5])
    expected = np.array(transform.TransformPoint(centre_ref))
    index = np.argwhere(sitk.GetArrayViewFromImage(result) > 0.5)[:, ::-1]
    seen = np.mean([result.TransformIndexToPhysicalPoint([int(v) for v in i]) for i in index], axis=0)
    assert np.linalg.norm(seen - expected) < 2.5


def test_registration_recovers_the_known_affine_of_every_synthetic_scan(space, normal_cohort):
    """T1, T2 and FLAIR, every storage orientation, thick slices: within a few mm of the truth.

    The synthetic scans also carry a smooth non-linear deformation of a few mm that no affine can
    undo, so the bound is on the mean over brain points, not on each point.
    """
    brain = np.argwhere(sitk.GetArrayViewFromImage(space.template_mask) > 0)[::40, ::-1]
    points = [space.template_mask.TransformIndexToPhysicalPoint([int(v) for v in i]) for i in brain]
    errors = []
    for scan in json.loads((normal_cohort / "cohort.json").read_text())["scans"]:
        found = space.align(read_image(normal_cohort / scan["image"]))
        truth = template_to_scan_affine(scan["augmentation"])
        errors.append(np.mean([np.linalg.norm(np.subtract(found.TransformPoint(p), truth.TransformPoint(p)))
                               for p in points]))
    print("mean registration error per scan (mm):", np.round(errors, 2))
    assert max(errors) < 3.0 and np.mean(errors) < 2.2  # mm; a failed alignment is off by tens of mm


def test_the_registration_copy_of_a_1mm_scan_does_not_hang_on_the_last_bits_of_its_geometry():
    """A 1 mm scan is registered on a 2 mm copy: blocks of two voxels, whose brain mask is a majority over each
    block. A nearest-neighbour mask would be a tie at every block, broken by the last bits of the spacing and
    origin, which differ between file formats; the copy must not change with them."""
    from cradl.preprocess import DEFAULT_NORMALISATION, brain_only
    from cradl.template import load_mni, load_mni_brain_mask

    t1, mask = load_mni("t1"), load_mni_brain_mask()
    copies = []
    for spacing, origin_shift in ((1.0, 0.0), (1.0000000000000002, 1e-9), (0.9999999999999999, -1e-9)):
        image, brain = sitk.Image(t1), sitk.Image(mask)
        for each in (image, brain):
            each.SetSpacing([spacing] * 3)
            each.SetOrigin([v + origin_shift for v in t1.GetOrigin()])
        copies.append(sitk.GetArrayFromImage(brain_only(image, brain, DEFAULT_NORMALISATION, 2.0)))
    for other in copies[1:]:
        np.testing.assert_array_equal(other, copies[0])
