"""Training internals that the command-line tests do not reach."""
from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from cradl.space import ReferenceSpace
from cradl.io import find_scans
from cradl.train.trainer import TrainConfig, prepare_all


def test_prepared_scan_cache_is_reused_only_for_the_same_preparation(normal_cohort, tmp_path, caplog):
    scans = find_scans([normal_cohort])[:2]
    cache = tmp_path / "model.prep.npz"
    coarse = TrainConfig(slice_size=48, spacing_mm=4.0)
    fine = TrainConfig(slice_size=64, spacing_mm=3.0)
    coarse_space = ReferenceSpace.from_mni(coarse.slice_size, coarse.spacing_mm)
    fine_space = ReferenceSpace.from_mni(fine.slice_size, fine.spacing_mm)

    first = prepare_all(scans, coarse_space, coarse, cache, progress=False)
    with caplog.at_level(logging.INFO, logger="cradl"):
        again = prepare_all(scans, coarse_space, coarse, cache, progress=False)
    assert "using cached preprocessed scans" in caplog.text
    assert again[0].volume.shape == first[0].volume.shape

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cradl"):
        other_grid = prepare_all(scans, fine_space, fine, cache, progress=False)
    assert "using cached" not in caplog.text
    assert other_grid[0].volume.shape[1:] == (64, 64)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cradl"):
        prepare_all(scans, fine_space, dataclasses.replace(fine, min_brain_fraction=0.3), cache, progress=False)
    assert "using cached" not in caplog.text


def test_every_normal_reference_is_scored_against_the_other_normals_as_a_new_scan_would_be(tiny_model, normal_cohort):
    """Calibration uses every held-out normal scan for every statistic: the slice statistics come from all of
    them, and each scan's reference volume score and typical z from the statistics of the others."""
    import numpy as np

    from conftest import label_masks
    from cradl.bundle import load_bundle
    from cradl.calibration import aggregate, slice_z_scores
    from cradl.localize import score_slices
    from cradl.train.trainer import calibrate, config_from_manifest, slice_statistics
    from cradl.typicality import typical_z

    bundle = load_bundle(tiny_model)
    config = config_from_manifest(bundle.manifest)
    paths = sorted(normal_cohort.glob("normal_*.nii.gz"))[:5]
    scans = prepare_all(paths, ReferenceSpace(bundle.grid, bundle.template, bundle.template_mask), config, None,
                        progress=False, masks=label_masks(paths))
    calibration, _ = calibrate(bundle.encoder.eval(), bundle.gmm, scans, config, "cpu", progress=False)

    nlls = [score_slices(s.slices, bundle.encoder, bundle.gmm, "cpu") for s in scans]
    assert calibration["slice_nll_mean"] == slice_statistics(nlls, scans, config)["slice_nll_mean"]
    unseen, typical = [], []
    for i, scan in enumerate(scans):
        others = slice_statistics(nlls[:i] + nlls[i + 1:], scans[:i] + scans[i + 1:], config)
        unseen.append(aggregate(nlls[i], scan.slice_indices, others))
        typical.append(typical_z(slice_z_scores(nlls[i], scan.slice_indices, others)))
    np.testing.assert_allclose(calibration["volume_scores"], sorted(unseen), rtol=1e-5)
    np.testing.assert_allclose(calibration["typicality"]["normal_values"], typical, atol=1e-3)
    assert calibration["n_scans"] == calibration["n_heatmap_scans"] == 5
    in_sample = [aggregate(n, s.slice_indices, calibration) for n, s in zip(nlls, scans)]
    assert np.mean(unseen) > np.mean(in_sample)  # a scan inside the statistics flatters itself


def test_the_normal_mean_image_comes_from_normal_scans_of_one_contrast(tiny_model, normal_cohort):
    """Calibration with the gradient x deviation heatmap returns the normal scans' mean intensity wherever at
    least half of them have brain, and refuses scans of mixed contrasts with a clear message: their mean is
    no normal brain."""
    import numpy as np
    import pytest

    from conftest import label_masks
    from cradl.bundle import load_bundle
    from cradl.errors import InputError
    from cradl.train.trainer import calibrate, config_from_manifest

    bundle = load_bundle(tiny_model)
    config = config_from_manifest(bundle.manifest)
    config = dataclasses.replace(config, localization=dict(config.localization, attribution="gradient_x_deviation"))
    contrasts = {s["image"]: s["contrast"] for s in json.loads((normal_cohort / "cohort.json").read_text())["scans"]}
    paths = sorted(normal_cohort.glob("normal_*.nii.gz"))
    t1 = [p for p in paths if contrasts[p.name] == "t1"]
    space = ReferenceSpace(bundle.grid, bundle.template, bundle.template_mask)
    scans = prepare_all(t1, space, config, None, progress=False, masks=label_masks(t1))
    _, normal_mean = calibrate(bundle.encoder.eval(), bundle.gmm, scans, config, "cpu", progress=False)
    coverage = np.sum([s.mask for s in scans], axis=0)
    mean = np.sum([s.volume * s.mask for s in scans], axis=0) / np.maximum(coverage, 1)
    half = coverage >= len(scans) / 2
    np.testing.assert_allclose(normal_mean[half], mean[half], rtol=1e-5)
    assert np.isnan(normal_mean[~half]).all()

    mixed = prepare_all(paths[:4], space, config, None, progress=False, masks=label_masks(paths[:4]))
    with pytest.raises(InputError, match="share one contrast"):
        calibrate(bundle.encoder.eval(), bundle.gmm, mixed, config, "cpu", progress=False)


def test_each_normal_scan_is_read_against_the_mean_of_the_other_normal_scans():
    """The normal mean image a calibration scan's heatmap reads leaves that scan out, as every other
    statistic does; voxels where fewer than half of the others have brain read against nothing (NaN)."""
    import numpy as np

    from cradl.preprocess import PreparedScan
    from cradl.train.trainer import NormalMean

    rng = np.random.default_rng(0)
    masks = [np.ones((2, 3, 3), bool) for _ in range(4)]
    for m, n in zip(masks, range(4)):
        m[0, 0, :n] = False  # voxel (0, 0, x) has brain in x + 1 of the 4 scans
    scans = [PreparedScan(rng.random((2, 3, 3)).astype(np.float32) * m, m, None, np.arange(2)) for m in masks]
    mean = NormalMean(scans)
    others = scans[1:]
    without = mean.without(scans[0])
    inside = np.sum([s.mask for s in others], axis=0)
    expected = np.sum([s.volume for s in others], axis=0) / np.maximum(inside, 1)
    np.testing.assert_allclose(without[inside >= 1.5], expected[inside >= 1.5], rtol=1e-6)
    assert np.isnan(without[inside < 1.5]).all() and (inside < 1.5).any()
    np.testing.assert_allclose(mean.image()[1], np.mean([s.volume[1] for s in scans], axis=0), rtol=1e-6)


def test_a_slice_position_seen_in_too_few_normal_scans_takes_the_pooled_statistics():
    """Slice weighting is exponential in the z-score, so a per-position spread from a handful of scans would
    weight slices at random: such positions are read against all slices' mean and spread instead."""
    import numpy as np

    from cradl.calibration import MIN_SCANS_PER_POSITION, fit_slice_statistics

    rng = np.random.default_rng(0)
    n = MIN_SCANS_PER_POSITION
    # position 0 in every scan, around 100; position 1 in all but one, around 106
    nlls = [np.array([100, 106]) + rng.normal(0, 3, 2) for _ in range(n - 1)] + [np.array([100 + rng.normal(0, 3)])]
    indices = [np.array([0, 1])] * (n - 1) + [np.array([0])]
    means, stds = fit_slice_statistics(nlls, indices, n_slices=2)
    assert means[0] == pytest.approx(np.mean([nll[0] for nll in nlls]))
    assert stds[0] == pytest.approx(np.std([nll[0] for nll in nlls], ddof=1))
    pooled = np.concatenate(nlls)
    assert means[1] == pytest.approx(pooled.mean()) and stds[1] == pytest.approx(pooled.std())


@pytest.mark.integration
def test_recalibration_keeps_the_weights_and_uses_every_scan(tiny_model, normal_cohort, tmp_path):
    """As `calibrate-real` does for the bundled model: named scans, their own brain masks, new heatmap
    settings; the weights and the mixture stay."""
    from conftest import label_masks
    from cradl.bundle import load_bundle
    from cradl.train.trainer import recalibrate_model

    scans = sorted(normal_cohort.glob("normal_*.nii.gz"))[:5]
    out = recalibrate_model(tiny_model, None, tmp_path / "recal.cradl", {"slice_weight_z_scale": 4.0},
                            version="0.0.2", progress=False, scans=scans, masks=label_masks(scans))
    before, after = load_bundle(tiny_model).manifest, load_bundle(out).manifest
    assert after.version == "0.0.2" and after.localization["slice_weight_z_scale"] == 4.0
    assert after.calibration["n_scans"] == 5 and after.calibration["n_heatmap_scans"] == 5
    assert after.gmm == before.gmm


def test_a_simclr_run_begun_on_another_device_resumes_here_and_names_both(tmp_path):
    """How a GPU node's run is finished on a laptop: the checkpoint carries the epochs done, their time and the
    device they ran on; resuming trains only the remaining epochs and the record names every device."""
    import numpy as np
    import torch

    from cradl.encoder import ProjectionHead, SliceEncoder
    from cradl.train.simclr import train_simclr

    rng = np.random.default_rng(0)
    slices = rng.normal(size=(32, 32, 32)).astype(np.float32)
    config = TrainConfig(epochs=2, batch_size=16, width=4, feature_dim=8, projection_dim=4)
    checkpoint = tmp_path / "run.ckpt"

    def models():
        torch.manual_seed(0)
        return (SliceEncoder(config.width, config.feature_dim, config.grid),
                ProjectionHead(config.feature_dim, config.projection_dim))

    first = train_simclr(*models(), slices, config, torch.device("cpu"), checkpoint, progress=False)
    assert first.epochs_done == 2 and len(first.devices) == 1
    state = torch.load(checkpoint, weights_only=True)
    assert state["history"] == first.history and state["seconds"] == first.seconds

    # as a GPU node leaves it after its first epoch
    state.update(epoch=0, history=first.history[:1], seconds=100.0, devices=["NVIDIA H200"])
    steps = state["steps_per_epoch"]
    state["schedule"].update(last_epoch=steps, _step_count=steps + 1)
    torch.save(state, checkpoint)
    resumed = train_simclr(*models(), slices, config, torch.device("cpu"), checkpoint, progress=False)
    assert resumed.history[0] == first.history[0] and resumed.epochs_done == 2
    assert resumed.devices == ["NVIDIA H200", first.devices[0]] and resumed.seconds > 100.0
    assert resumed.record()["simclr_devices"] == resumed.devices

    # a finished run is not trained again
    again = train_simclr(*models(), slices, config, torch.device("cpu"), checkpoint, progress=False)
    assert again.history == resumed.history and again.seconds == resumed.seconds
