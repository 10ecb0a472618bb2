"""Post-processing of the gradient saliency into a heatmap."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score

from cradl.io import read_image
from cradl.localize import postprocess_saliency, score_and_saliency, slice_weights
from cradl.manifest import DEFAULT_LOCALIZATION, complete_localization, uses_normal_mean


def test_smoothing_across_slices_finds_a_lesion_better_through_independent_slice_noise():
    rng = np.random.default_rng(0)
    saliency = rng.random((40, 48, 48)).astype(np.float32)  # gradient noise, independent per slice
    lesion = np.zeros(saliency.shape, dtype=bool)
    lesion[15:25, 18:30, 18:30] = True  # a 20 mm lesion on a 2 mm grid spans ten slices
    saliency[lesion] += rng.random(lesion.sum()) * 0.8 * (rng.random(lesion.sum()) < 0.5)
    mask = np.ones_like(lesion)
    in_plane = dict(DEFAULT_LOCALIZATION, gaussian_sigma_z_px=0.0)
    flat = postprocess_saliency(saliency, mask, in_plane, np.arange(40))
    smooth = postprocess_saliency(saliency, mask, DEFAULT_LOCALIZATION, np.arange(40))
    smooth_ap = average_precision_score(lesion.ravel(), smooth.ravel())
    assert smooth_ap > average_precision_score(lesion.ravel(), flat.ravel()) + 0.1


def test_slices_missing_from_the_indices_are_no_evidence_and_nothing_blurs_across_a_gap():
    rng = np.random.default_rng(1)
    saliency = rng.random((5, 32, 32)).astype(np.float32)
    mask = np.ones_like(saliency, dtype=bool)
    config = dict(DEFAULT_LOCALIZATION, gaussian_sigma_z_px=1.0)
    with_gap = postprocess_saliency(saliency, mask, config, np.array([0, 1, 2, 30, 31]))
    alone = postprocess_saliency(saliency[3:], mask[3:], config, np.array([30, 31]))
    np.testing.assert_allclose(with_gap[3:], alone, rtol=1e-6)


def test_the_heatmap_is_zero_outside_the_mask():
    saliency = np.random.default_rng(2).random((6, 32, 32)).astype(np.float32)
    mask = np.zeros_like(saliency, dtype=bool)
    mask[:, 8:24, 8:24] = True
    heat = postprocess_saliency(saliency, mask, DEFAULT_LOCALIZATION, np.arange(6))
    assert heat[~mask].max() == 0 and heat[mask].min() >= 0


def test_bundles_written_before_cross_slice_smoothing_keep_their_heatmaps():
    saliency = np.random.default_rng(3).random((6, 32, 32)).astype(np.float32)
    mask = np.ones_like(saliency, dtype=bool)
    old = complete_localization({k: v for k, v in DEFAULT_LOCALIZATION.items() if k != "gaussian_sigma_z_px"})
    in_plane_only = dict(DEFAULT_LOCALIZATION, gaussian_sigma_z_px=0.0)
    np.testing.assert_array_equal(postprocess_saliency(saliency, mask, old, np.arange(6)),
                                  postprocess_saliency(saliency, mask, in_plane_only, np.arange(6)))


def test_slice_weighting_keeps_unusual_slices_and_fades_typical_ones():
    z = np.array([-9.0, -2.0, 0.0, 2.0, 4.0, 9.0])
    weights = slice_weights(z, dict(DEFAULT_LOCALIZATION, slice_weight_z_scale=2.0))
    np.testing.assert_allclose(weights, np.exp(np.array([-5.0, -2.0, 0.0, 2.0, 4.0, 5.0]) / 2), rtol=1e-6)
    assert np.all(np.diff(weights) > 0)  # the more unusual the slice, the more of its heatmap is kept


def test_bundles_written_before_slice_weighting_keep_their_heatmaps():
    old = complete_localization({k: v for k, v in DEFAULT_LOCALIZATION.items() if k != "slice_weight_z_scale"})
    assert np.array_equal(slice_weights(np.array([-3.0, 0.0, 7.0]), old), np.ones(3))


def test_pixels_that_look_as_the_normal_brains_do_there_contribute_nothing(tiny_detector, sample_case):
    """The gradient x deviation attribution: a pixel equal to the normal mean, or where normal brains have no
    brain (NaN), adds nothing to the heatmap however large the gradient; elsewhere it is |gradient x deviation|."""
    prepared = tiny_detector.prepare(read_image(sample_case[0]))
    idx = prepared.slice_indices[::8]
    slices = prepared.volume[idx]
    args = (slices, idx, tiny_detector.encoder, tiny_detector.gmm, tiny_detector.localization, tiny_detector.device)
    _, gradient = score_and_saliency(*args)
    assert gradient.max() > 0
    reference = slices - 0.5
    reference[:, :, :10] = slices[:, :, :10]  # as normal here
    reference[:, :, -10:] = np.nan  # no normal brain here
    _, attributed = score_and_saliency(*args, reference=reference)
    assert attributed[:, :, :10].max() == 0 and attributed[:, :, -10:].max() == 0
    np.testing.assert_allclose(attributed[:, :, 10:-10], 0.5 * gradient[:, :, 10:-10], rtol=1e-5, atol=1e-9)


def test_bundles_written_before_the_deviation_attribution_keep_the_plain_gradient():
    old = complete_localization({k: v for k, v in DEFAULT_LOCALIZATION.items() if k != "attribution"})
    assert not uses_normal_mean(old) and uses_normal_mean(DEFAULT_LOCALIZATION)
