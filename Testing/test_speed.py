"""The vectorised scoring path equals the straightforward one (one slice, one copy, a loop over mixture
components), and heatmaps do not depend on how slices are chunked."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cradl.evaluate.reference_impl import loop_score_and_saliency
from cradl.io import read_image
from cradl.localize import scan_heatmap, score_and_saliency


@pytest.mark.parametrize("attribution", ["gradient", "gradient_x_deviation"])
def test_vectorised_scores_and_saliency_equal_the_straightforward_loop(tiny_detector, sample_case, attribution):
    prepared = tiny_detector.prepare(read_image(sample_case[0]))
    idx = prepared.slice_indices[::6]
    slices = prepared.volume[idx]
    bundle = tiny_detector.bundle  # any reference image with NaN where it holds nothing will do
    reference = np.where(bundle.template_mask > 0, bundle.template, np.nan)[idx] if attribution != "gradient" else None
    args = (tiny_detector.encoder, tiny_detector.gmm, tiny_detector.localization, tiny_detector.device)
    fast_nll, fast = score_and_saliency(slices, idx, *args, batch_size=5, reference=reference)
    slow_nll, slow = loop_score_and_saliency(slices, idx, *args, reference=reference)
    np.testing.assert_allclose(fast_nll, slow_nll, rtol=1e-4, atol=1e-3)
    assert np.abs(fast - slow).max() <= 1e-2 * np.abs(slow).max()


def test_heatmaps_do_not_depend_on_the_chunk_size(tiny_detector, sample_case):
    """On one prepared scan (registration, which is not bit-exact between runs, is not what this tests), the
    slices' scores and heatmaps are the same whether the slices go through the network in one batch or in
    chunks of three: SmoothGrad noise is seeded per slice, and no slice sees another's."""
    prepared = tiny_detector.prepare(read_image(sample_case[0]))
    idx = prepared.slice_indices
    args = (prepared.volume, prepared.mask, idx, tiny_detector.encoder, tiny_detector.gmm,
            tiny_detector.localization, tiny_detector.device, tiny_detector.calibration)
    normal_mean = tiny_detector.bundle.normal_mean
    whole_nll, whole = scan_heatmap(*args, batch_size=len(idx), normal_mean=normal_mean)
    chunked_nll, chunked = scan_heatmap(*args, batch_size=3, normal_mean=normal_mean)
    np.testing.assert_allclose(chunked_nll, whole_nll, rtol=1e-4, atol=1e-3)
    # batch size changes only the order of float sums inside the convolutions
    assert np.abs(chunked - whole).max() <= 1e-3 * np.abs(whole).max()


def test_the_channels_last_encoder_gives_the_contiguous_encoders_results(tiny_detector, sample_case):
    """The CPU speed-up from the channels-last weight layout changes only the order of float sums."""
    conv_weight = next(p for p in tiny_detector.encoder.parameters() if p.dim() == 4)
    assert conv_weight.is_contiguous(memory_format=torch.channels_last)
    prepared = tiny_detector.prepare(read_image(sample_case[0]))
    idx = prepared.slice_indices
    contiguous = tiny_detector.encoder.to(memory_format=torch.contiguous_format)
    try:
        base_nll, base = score_and_saliency(prepared.volume[idx], idx, contiguous, tiny_detector.gmm,
                                            tiny_detector.localization, tiny_detector.device)
    finally:
        tiny_detector.encoder.to(memory_format=torch.channels_last)
    nll, saliency = score_and_saliency(prepared.volume[idx], idx, tiny_detector.encoder, tiny_detector.gmm,
                                       tiny_detector.localization, tiny_detector.device)
    np.testing.assert_allclose(nll, base_nll, rtol=1e-4, atol=1e-3)
    # raw (unsmoothed) gradients of the tiny test model amplify the reordered sums: up to 1.4 % of the
    # maximum seen in one run of the suite (0.2 % for the bundled model's post-processed heatmaps)
    assert np.abs(saliency - base).max() <= 5e-2 * np.abs(base).max()
