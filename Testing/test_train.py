"""Training internals that the command-line tests do not reach."""
from __future__ import annotations

import dataclasses
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


@pytest.mark.integration
def test_recalibration_on_given_groups_uses_each_group_for_its_own_statistics(tiny_model, normal_cohort, tmp_path):
    """As `calibrate-real` does for the bundled model: named validation and calibration scans, their own brain
    masks, new heatmap settings; the weights stay."""
    from conftest import label_masks
    from cradl.bundle import load_bundle
    from cradl.train.trainer import recalibrate_model

    scans = sorted(normal_cohort.glob("normal_*.nii.gz"))[:5]
    out = recalibrate_model(tiny_model, None, tmp_path / "recal.cradl", {"slice_weight_z_scale": 4.0},
                            version="0.0.2", progress=False, scans=scans, masks=label_masks(scans),
                            groups={"validation": [0, 1], "calibration": [2, 3, 4]})
    before, after = load_bundle(tiny_model).manifest, load_bundle(out).manifest
    assert after.version == "0.0.2" and after.localization["slice_weight_z_scale"] == 4.0
    assert after.calibration["n_scans"] == 3 and after.calibration["n_heatmap_scans"] == 5
    assert after.gmm == before.gmm
