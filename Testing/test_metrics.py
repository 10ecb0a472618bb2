"""Evaluation metrics on hand-made arrays with known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from cradl.evaluate.metrics import (CaseScores, bin_index, bootstrap_ci, curve_metrics, dice, full_report,
                                    region_outcome, sample_metrics, score_histograms, size_bin, summarise,
                                    voxel_metrics)


def test_sample_metrics_perfect_inverted_and_degenerate():
    labels = [0, 0, 0, 1, 1]
    assert sample_metrics(labels, [0.1, 0.2, 0.3, 0.8, 0.9]) == {"n_pos": 2, "n_neg": 3, "auroc": 1.0, "ap": 1.0}
    inverted = sample_metrics(labels, [0.9, 0.8, 0.7, 0.2, 0.1])
    assert inverted["auroc"] == 0.0
    assert inverted["ap"] == pytest.approx(0.5 * 1 / 4 + 0.5 * 2 / 5)  # positives found 4th and 5th
    only_normals = sample_metrics([0, 0], [1.0, 2.0])
    assert math.isnan(only_normals["auroc"]) and math.isnan(only_normals["ap"])
    ties = sample_metrics([0, 1], [1.0, 1.0])
    assert ties["auroc"] == 0.5
    # NaN scores are ranked lowest rather than raising
    assert sample_metrics([0, 1, 1], [np.nan, 2.0, 3.0])["auroc"] == 1.0


def test_random_scores_give_chance_auroc_and_prevalence_ap():
    rng = np.random.default_rng(0)
    labels = rng.random(200_000) < 0.1
    scores = rng.random(200_000)
    m = sample_metrics(labels, scores)
    assert m["auroc"] == pytest.approx(0.5, abs=0.01)
    assert m["ap"] == pytest.approx(0.1, abs=0.01)
    v = voxel_metrics(scores, labels)
    assert v["auroc"] == pytest.approx(m["auroc"], abs=1e-3)
    assert v["ap"] == pytest.approx(m["ap"], abs=1e-3)
    assert v["best_dice"] == pytest.approx(2 * 0.1 / 1.1, abs=0.01)  # call everything anomalous


def test_voxel_metrics_match_sklearn_exactly_on_distinct_bins():
    rng = np.random.default_rng(1)
    levels = 10.0 ** np.linspace(-3, 3, 40)  # far apart: one bin each
    scores = levels[rng.integers(0, 40, 5000)]
    labels = rng.random(5000) < (np.log10(scores) + 3) / 8  # higher scores more often anomalous
    v = voxel_metrics(scores, labels)
    assert v["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert v["ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_voxel_metrics_close_to_sklearn_on_continuous_scores():
    rng = np.random.default_rng(2)
    labels = rng.random(300_000) < 0.03
    scores = rng.gamma(2.0, 1.0, labels.size) + 1.5 * labels
    v = voxel_metrics(scores, labels)
    assert v["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-3)
    assert v["ap"] == pytest.approx(average_precision_score(labels, scores), abs=2e-3)


def test_best_dice_perfect_and_threshold_and_mask():
    heat = np.zeros((4, 20, 20), np.float32)
    lesion = np.zeros(heat.shape, bool)
    lesion[1:3, 5:10, 5:10] = True
    heat[lesion] = 5.0
    heat[~lesion] = 0.5
    v = voxel_metrics(heat, lesion)
    assert v["auroc"] == 1.0 and v["ap"] == 1.0 and v["best_dice"] == 1.0
    assert 0.5 < v["best_threshold"] <= 5.0
    # voxels outside the mask are ignored: a bright false positive there does not count
    heat[0, 0, 0] = 100.0
    brain = np.ones(heat.shape, bool)
    brain[0, 0, 0] = False
    assert voxel_metrics(heat, lesion, brain)["best_dice"] == 1.0
    assert voxel_metrics(heat, lesion)["best_dice"] < 1.0


def test_histograms_pool_by_summing():
    rng = np.random.default_rng(3)
    a, b = rng.random(1000), rng.random(1000) + 0.3
    la, lb = rng.random(1000) < 0.2, rng.random(1000) < 0.2
    pa, na = score_histograms(a, la)
    pb, nb = score_histograms(b, lb)
    pooled = voxel_metrics(np.concatenate([a, b]), np.concatenate([la, lb]))
    assert curve_metrics(pa + pb, na + nb) == pooled
    assert pa.sum() + na.sum() == 1000


def test_bins_handle_zero_negative_nan_and_huge():
    idx = bin_index(np.array([0.0, -3.0, np.nan, 1e-9, 1e-5, 1.0, 1e9, np.inf]))
    assert list(idx[:4]) == [0, 0, 0, 0]
    assert idx[4] < idx[5] < idx[6] == idx[7]
    assert np.all(np.diff(bin_index(np.geomspace(1e-5, 1e5, 1000))) >= 0)


def test_no_positive_voxels():
    v = voxel_metrics(np.random.default_rng(0).random(100), np.zeros(100, bool))
    assert math.isnan(v["ap"]) and math.isnan(v["auroc"]) and math.isnan(v["best_dice"])


def test_dice_and_regions():
    a = np.zeros((5, 5), bool)
    b = a.copy()
    assert dice(a, b) == 1.0
    a[1:3, 1:3] = True
    b[1:3, 2:4] = True
    assert dice(a, b) == pytest.approx(0.5)
    labels = np.zeros((6, 6), np.uint16)
    labels[0:2, 0:2] = 1  # overlaps the lesion
    labels[4:6, 4:6] = 2  # elsewhere
    lesion = np.zeros((6, 6), bool)
    lesion[1:3, 1:3] = True
    assert region_outcome(labels, lesion) == {"n_regions": 2, "n_true_regions": 1, "n_false_regions": 1,
                                              "detected": True}
    assert region_outcome(labels, np.zeros_like(lesion))["detected"] is None
    assert region_outcome(np.zeros_like(labels), lesion)["detected"] is False


def test_bootstrap_interval_brackets_the_estimate():
    rng = np.random.default_rng(4)
    labels = np.r_[np.zeros(30, bool), np.ones(30, bool)]
    scores = rng.normal(size=60) + labels
    auc = sample_metrics(labels, scores)["auroc"]
    low, high = bootstrap_ci(lambda i: sample_metrics(labels[i], scores[i])["auroc"], labels.astype(int), 300, 0)
    assert low < auc < high and high - low < 0.5
    # perfect separation: every resample is perfect
    assert bootstrap_ci(lambda i: sample_metrics(labels[i], labels[i] * 1.0)["auroc"], labels, 50) == (1.0, 1.0)


def _case(i, kind, size, score, detected=None, fp=0):
    heat = np.full((2, 8, 8), 0.1, np.float32)
    lesion = np.zeros(heat.shape, bool)
    if kind != "normal":
        lesion[0, 2:5, 2:5] = True
        heat[lesion] = 3.0 if detected else 0.05
    pos, neg = score_histograms(heat, lesion)
    slice_labels = lesion.reshape(2, -1).any(1)
    return CaseScores(f"c{i}", kind, size, score, np.array([score, 0.0]), slice_labels, pos, neg,
                      dice_at_threshold=None if kind == "normal" else float(bool(detected)),
                      n_regions=fp + bool(detected),
                      n_false_regions=fp, detected=None if kind == "normal" else bool(detected))


def test_summary_and_breakdowns_on_a_known_set():
    cases = [_case(0, "normal", None, 0.0, fp=1), _case(1, "normal", None, 0.1),
             _case(2, "tumour", 20.0, 5.0, True), _case(3, "tumour", 5.0, 0.05, False),
             _case(4, "blob", 40.0, 3.0, True)]
    s = summarise(cases, n_boot=50)
    assert s["n_abnormal"] == 3 and s["n_normal"] == 2
    # volume: the 5 mm tumour (0.05) ranks between the normals (0.0, 0.1) -> 5 of 6 pairs right
    assert s["volume"]["auroc"] == pytest.approx(5 / 6)
    assert s["detection_rate"] == pytest.approx(2 / 3)
    assert s["fp_regions_per_normal_scan"] == pytest.approx(0.5)
    assert s["dice_at_threshold"] == pytest.approx(2 / 3)
    assert 0 < s["voxel"]["ap"] < 1
    report = full_report(cases, n_boot=20)
    assert set(report["by_type"]) == {"tumour", "blob"}
    assert report["by_type"]["blob"]["volume"]["auroc"] == 1.0
    assert report["by_type"]["blob"]["voxel_lesion_only"]["best_dice"] == 1.0
    assert set(report["by_size"]) == {size_bin(5.0), size_bin(20.0), size_bin(40.0)}
    # the target subset: tumour/resection of 15 mm or more
    assert report["target_subset"]["n_abnormal"] == 1
    assert report["target_subset"]["volume"]["auroc"] == 1.0
