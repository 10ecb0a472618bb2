"""N4 bias-field correction (the `bias_correction: n4` normalisation setting): it removes a smooth
multiplicative field, keeps anatomy, copes with z-scored intensities, and a bundle names it or nothing."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from cradl.preprocess import correct_bias_field
from cradl.template import load_mni, load_mni_brain_mask


@pytest.fixture(scope="module")
def template_and_field():
    """The 1 mm MNI T1 times a smooth left-right and front-back field of about +-25%, like IXI's (N4 found
    fields spanning 0.79-1.28 between their 5th and 95th percentiles in the brain)."""
    t1, mask = load_mni("t1"), load_mni_brain_mask()
    _, y, x = np.indices(t1.GetSize()[::-1], dtype=np.float32)
    log_field = 0.25 * (x / x.max() - 0.5) * 2 + 0.1 * np.sin(np.pi * y / y.max())
    biased = sitk.GetImageFromArray(sitk.GetArrayFromImage(t1) * np.exp(log_field).astype(np.float32))
    biased.CopyInformation(t1)
    return t1, mask, biased


def _spread_of_log_ratio(image: sitk.Image, truth: sitk.Image, mask: sitk.Image) -> float:
    """How far `image` is from `truth` up to a constant factor: the spread of log(image / truth) in the brain."""
    a, b = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(truth)
    inside = (sitk.GetArrayFromImage(mask) > 0) & (b > 0.2)  # away from near-zero CSF, where ratios are noise
    return float(np.std(np.log(a[inside] / b[inside])))


@pytest.fixture(scope="module")
def corrected(template_and_field):
    t1, mask, biased = template_and_field
    return correct_bias_field(t1, mask), correct_bias_field(biased, mask)


def test_a_planted_smooth_field_is_mostly_removed(template_and_field, corrected):
    """N4 also flattens some of the template's own smooth variation, so the planted field is judged by how
    far the corrected biased scan lies from the corrected original."""
    t1, mask, biased = template_and_field
    from_original, from_biased = corrected
    assert _spread_of_log_ratio(from_biased, from_original, mask) < 0.25 * _spread_of_log_ratio(biased, t1, mask)


def test_correction_keeps_the_grid_and_changes_a_scan_without_field_less_than_the_field_would(
        template_and_field, corrected):
    t1, mask, biased = template_and_field
    from_original, _ = corrected
    assert from_original.GetSize() == t1.GetSize() and from_original.GetSpacing() == t1.GetSpacing()
    assert from_original.GetOrigin() == t1.GetOrigin() and from_original.GetDirection() == t1.GetDirection()
    assert _spread_of_log_ratio(from_original, t1, mask) < 0.6 * _spread_of_log_ratio(biased, t1, mask)


def test_z_scored_intensities_with_negative_values_are_corrected_without_error(template_and_field):
    _, mask, biased = template_and_field
    array = sitk.GetArrayFromImage(biased)
    inside = sitk.GetArrayFromImage(mask) > 0
    z_scored = sitk.GetImageFromArray(((array - array[inside].mean()) / array[inside].std()).astype(np.float32))
    z_scored.CopyInformation(biased)
    corrected = sitk.GetArrayFromImage(correct_bias_field(z_scored, mask))
    assert np.isfinite(corrected).all()
    assert np.corrcoef(corrected[inside], array[inside])[0, 1] > 0.9


def test_the_last_bit_of_the_spacing_does_not_change_the_correction():
    """A 3 mm scan written to NRRD and read back had a spacing of 2.9999999999999996: the coarse copy's
    block size and its brain mask must not hang on that (it moved a Slicer detection's score by 1.5%)."""
    t1, mask = (sitk.BinShrink(image, [3, 3, 3]) for image in (load_mni("t1"), load_mni_brain_mask()))
    results = []
    for spacing in (3.0, 3.0000000000000004, 2.9999999999999996):
        image, brain = sitk.Image(t1), sitk.Image(mask)
        for each in (image, brain):
            each.SetSpacing([spacing] * 3)
        results.append(sitk.GetArrayFromImage(correct_bias_field(image, brain)))
    for other in results[1:]:
        assert np.abs(other - results[0]).max() < 1e-4 * np.abs(results[0]).max()
