"""Evaluation metrics as the CRADL paper and the MOOD challenge report them.

* sample level (slices and volumes): AUROC and average precision from scikit-learn;
* voxel level, inside the brain mask: AUROC, average precision and the best Dice over all thresholds,
  computed from per-case score histograms (fixed, log-spaced bins, 0.34 % relative resolution). A case
  reduces to two small integer histograms, so pooling any subset of cases (a type, a size, a bootstrap
  resample) is a sum of arrays and one threshold sweep instead of a sort of millions of voxels;
* Dice at a fixed (the model's calibrated) threshold, region-level detection rate and false-positive
  regions per scan;
* breakdowns by anomaly type and size, and stratified case-level bootstrap 95 % intervals.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

# ----------------------------------------------------------------------------- sample level


def sample_metrics(labels, scores) -> dict:
    """AUROC and average precision of `scores` (higher = more anomalous) for binary `labels`.

    Undefined values (only one class present) are NaN, never an exception."""
    labels = np.asarray(labels, dtype=bool).ravel()
    scores = np.asarray(scores, dtype=float).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in shape")
    out = {"n_pos": int(labels.sum()), "n_neg": int((~labels).sum()), "auroc": math.nan, "ap": math.nan}
    scores = np.nan_to_num(scores, nan=-np.inf)
    scores = np.clip(scores, -1e300, 1e300)
    if out["n_pos"] and out["n_neg"]:
        out["auroc"] = float(roc_auc_score(labels, scores))
    if out["n_pos"]:
        out["ap"] = float(average_precision_score(labels, scores))
    return out


# ----------------------------------------------------------------------------- voxel level: histograms

N_BINS = 8192
LOG_MIN, LOG_MAX = -6.0, 6.0  # positive scores from 1e-6 to 1e6 get their own bins; <= 0 share bin 0
_SCALE = (N_BINS - 2) / (LOG_MAX - LOG_MIN)


def bin_index(scores: np.ndarray) -> np.ndarray:
    """Bin of each score: 0 for scores <= 1e-6 (and NaN), then log-spaced bins up to 1e6 (clipped)."""
    s = np.asarray(scores, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        idx = np.floor((np.log10(s) - LOG_MIN) * _SCALE) + 1
    idx = np.nan_to_num(idx, nan=0.0, posinf=N_BINS - 1, neginf=0.0)
    return np.clip(idx, 0, N_BINS - 1).astype(np.int64)


def bin_lower_edges() -> np.ndarray:
    """The threshold each bin stands for (its lower edge); bin 0 stands for 'everything'."""
    edges = 10.0 ** (LOG_MIN + (np.arange(N_BINS) - 1) / _SCALE)
    edges[0] = -np.inf
    return edges


def score_histograms(scores, labels, mask=None) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) voxel counts per score bin, over the voxels in `mask` (all when None)."""
    scores = np.asarray(scores)
    labels = np.asarray(labels, dtype=bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in shape")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        scores, labels = scores[mask], labels[mask]
    idx = bin_index(scores.ravel())
    labels = labels.ravel()
    pos = np.bincount(idx[labels], minlength=N_BINS)
    neg = np.bincount(idx[~labels], minlength=N_BINS)
    return pos.astype(np.int64), neg.astype(np.int64)


def curve_metrics(pos_hist, neg_hist) -> dict:
    """AUROC, average precision (scikit-learn's step definition), best Dice and its threshold, from histograms.

    Thresholds sweep the bins from the highest down: a voxel is called anomalous when its bin is at or
    above the threshold's bin. Equal to scikit-learn on scores that fall into distinct bins."""
    pos = np.asarray(pos_hist, dtype=np.float64)[::-1]
    neg = np.asarray(neg_hist, dtype=np.float64)[::-1]
    n_pos, n_neg = pos.sum(), neg.sum()
    out = {"n_pos": int(n_pos), "n_neg": int(n_neg), "auroc": math.nan, "ap": math.nan,
           "best_dice": math.nan, "best_threshold": math.nan}
    keep = (pos + neg) > 0
    if not keep.any():
        return out
    edges = bin_lower_edges()[::-1][keep]
    tp, fp = np.cumsum(pos[keep]), np.cumsum(neg[keep])
    if n_pos and n_neg:
        tpr = np.concatenate([[0.0], tp / n_pos])
        fpr = np.concatenate([[0.0], fp / n_neg])
        out["auroc"] = float(np.trapezoid(tpr, fpr))
    if n_pos:
        recall = tp / n_pos
        precision = tp / (tp + fp)
        out["ap"] = float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))
        dice = 2 * tp / (tp + fp + n_pos)
        best = int(np.argmax(dice))
        out["best_dice"] = float(dice[best])
        out["best_threshold"] = float(edges[best])
    return out


def voxel_metrics(scores, labels, mask=None) -> dict:
    """Voxel-level AUROC / AP / best Dice of one score volume against a label volume, inside `mask`."""
    return curve_metrics(*score_histograms(scores, labels, mask))


# ----------------------------------------------------------------------------- thresholds and regions


def dice(prediction, target) -> float:
    """Dice of two binary arrays; 1.0 when both are empty (nothing to find, nothing found)."""
    p, t = np.asarray(prediction, dtype=bool), np.asarray(target, dtype=bool)
    total = p.sum() + t.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(p, t).sum() / total)


def region_outcome(region_labels, target) -> dict:
    """How the regions of a label image (0 = none, k = region k) meet an anomaly mask.

    A region that overlaps the mask by one voxel or more is a hit; every other region is a false positive.
    `detected` is True when at least one region hits (None when the mask is empty: nothing to detect)."""
    lab = np.asarray(region_labels)
    t = np.asarray(target, dtype=bool)
    ids = np.unique(lab[lab > 0])
    hit_ids = np.unique(lab[(lab > 0) & t])
    n_hit = int(len(hit_ids))
    return {"n_regions": int(len(ids)), "n_true_regions": n_hit, "n_false_regions": int(len(ids) - n_hit),
            "detected": (n_hit > 0) if t.any() else None}


# ----------------------------------------------------------------------------- bootstrap


def bootstrap_ci(statistic: Callable[[np.ndarray], float], strata: Sequence, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of `statistic(indices)` over case-level resamples drawn within each stratum.

    `strata` gives each case's group (e.g. normal / abnormal), so every resample keeps both classes and
    their sizes; `statistic` receives an index array (with repeats) into the cases."""
    strata = np.asarray(strata)
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(n_boot)):
        idx = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        v = statistic(idx)
        if v is not None and np.isfinite(v):
            values.append(v)
    if len(values) < max(10, n_boot // 10):
        return (math.nan, math.nan)
    alpha = (1.0 - level) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return (float(low), float(high))


# ----------------------------------------------------------------------------- per-case records and summaries


@dataclass
class CaseScores:
    """What one method produced on one case, reduced to what the metrics need."""

    case_id: str
    type: str  # 'normal' for clean scans
    size_mm: float | None
    volume_score: float
    slice_scores: np.ndarray  # (n_slices,)
    slice_labels: np.ndarray  # (n_slices,) bool
    pos_hist: np.ndarray | None = None  # voxel histograms inside the brain mask
    neg_hist: np.ndarray | None = None
    dice_at_threshold: float | None = None  # None for normal scans
    n_regions: int = 0
    n_false_regions: int = 0
    detected: bool | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def abnormal(self) -> bool:
        return self.type != "normal"


def size_bin(size_mm: float | None, edges: Sequence[float] = (15.0, 30.0)) -> str | None:
    """Size class of an anomaly: 'small' (< 15 mm), 'medium' (15-30 mm), 'large' (>= 30 mm)."""
    if size_mm is None:
        return None
    if size_mm < edges[0]:
        return f"<{edges[0]:g}mm"
    if size_mm < edges[1]:
        return f"{edges[0]:g}-{edges[1]:g}mm"
    return f">={edges[1]:g}mm"


def _nanmean(values) -> float:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def summarise(cases: Sequence[CaseScores], n_boot: int = 1000, seed: int = 0, voxel: bool = True) -> dict:
    """All metrics over a set of cases (normals and abnormals), with bootstrap intervals for the headline ones.

    Volume AUROC/AP: abnormal cases against the normal cases. Slice AUROC/AP: pooled over every slice of
    every case (a slice is anomalous when the anomaly touches it). Voxel AUROC/AP/best Dice: pooled over
    every brain voxel of every case (normal scans contribute negatives). Dice at threshold and detection
    rate: means over abnormal cases; false-positive regions: mean per normal scan (and per abnormal scan,
    counting regions that miss the anomaly)."""
    cases = list(cases)
    if not cases:
        return {"n_cases": 0}
    labels = np.array([c.abnormal for c in cases])
    vol = np.array([c.volume_score for c in cases], dtype=float)
    slice_lab = [np.asarray(c.slice_labels, bool) for c in cases]
    slice_sc = [np.asarray(c.slice_scores, float) for c in cases]
    out: dict = {"n_cases": len(cases), "n_abnormal": int(labels.sum()), "n_normal": int((~labels).sum())}
    out["volume"] = sample_metrics(labels, vol)
    out["slice"] = sample_metrics(np.concatenate(slice_lab), np.concatenate(slice_sc))
    ci = {}
    if n_boot and labels.any() and (~labels).any():
        ci.update(_sample_intervals(labels, vol, slice_lab, slice_sc, n_boot, seed))
    if voxel and all(c.pos_hist is not None for c in cases):
        out["voxel"], voxel_ci = _voxel_metrics(cases, labels, n_boot, seed)
        ci.update(voxel_ci)
        out.update(_region_metrics(cases))
    out["ci95"] = {k: [round(v, 4) if np.isfinite(v) else None for v in pair] for k, pair in ci.items()}
    out["seconds_per_case"] = _nanmean([c.seconds for c in cases])
    return out


def _sample_intervals(labels: np.ndarray, vol: np.ndarray, slice_lab: list, slice_sc: list, n_boot: int,
                      seed: int) -> dict:
    """Bootstrap intervals of the volume AUROC and AP and of the slice AUROC (cases resampled by class)."""
    strata = labels.astype(int)

    def slice_auroc(i):
        pooled = np.concatenate([slice_lab[j] for j in i]), np.concatenate([slice_sc[j] for j in i])
        return sample_metrics(*pooled)["auroc"]

    return {"volume_auroc": bootstrap_ci(lambda i: sample_metrics(labels[i], vol[i])["auroc"], strata, n_boot, seed),
            "volume_ap": bootstrap_ci(lambda i: sample_metrics(labels[i], vol[i])["ap"], strata, n_boot, seed),
            "slice_auroc": bootstrap_ci(slice_auroc, strata, n_boot // 4, seed)}


def _voxel_metrics(cases: list[CaseScores], labels: np.ndarray, n_boot: int, seed: int) -> tuple[dict, dict]:
    """Voxel AUROC, AP and best Dice pooled over every case's brain voxels, and the intervals of AP and best Dice
    (when there are abnormal cases to resample)."""
    pos = np.stack([c.pos_hist for c in cases])
    neg = np.stack([c.neg_hist for c in cases])
    ci = {}
    if n_boot and labels.any():
        strata = labels.astype(int)

        def vox(i, key):
            return curve_metrics(pos[i].sum(0), neg[i].sum(0))[key]

        ci["voxel_ap"] = bootstrap_ci(lambda i: vox(i, "ap"), strata, n_boot // 4, seed)
        ci["voxel_best_dice"] = bootstrap_ci(lambda i: vox(i, "best_dice"), strata, n_boot // 4, seed)
    return curve_metrics(pos.sum(0), neg.sum(0)), ci


def _region_metrics(cases: list[CaseScores]) -> dict:
    """Dice at the threshold and detection rate over abnormal cases; false-positive regions per scan."""
    abnormal = [c for c in cases if c.abnormal]
    normal = [c for c in cases if not c.abnormal]
    return {"dice_at_threshold": _nanmean([c.dice_at_threshold for c in abnormal]),
            "detection_rate": _nanmean([float(c.detected) for c in abnormal if c.detected is not None]),
            "fp_regions_per_normal_scan": _nanmean([c.n_false_regions for c in normal]),
            "fp_regions_per_abnormal_scan": _nanmean([c.n_false_regions for c in abnormal]),
            "normal_scans_with_regions": _nanmean([float(c.n_regions > 0) for c in normal])}


def breakdown(cases: Sequence[CaseScores], key: Callable[[CaseScores], str | None], n_boot: int = 0,
              voxel: bool = True) -> dict:
    """`summarise` per group of abnormal cases (grouped by `key`), each group scored against all normal cases."""
    normals = [c for c in cases if not c.abnormal]
    groups: dict[str, list[CaseScores]] = {}
    for c in cases:
        if c.abnormal:
            k = key(c)
            if k is not None:
                groups.setdefault(k, []).append(c)
    return {k: summarise(normals + g, n_boot=n_boot, voxel=voxel) | {"voxel_lesion_only": _lesion_voxel(g, voxel)}
            for k, g in sorted(groups.items())}


def _lesion_voxel(cases: Iterable[CaseScores], voxel: bool) -> dict | None:
    """Voxel metrics pooled over the abnormal cases alone (no normal scans' voxels)."""
    cases = [c for c in cases if c.pos_hist is not None]
    if not voxel or not cases:
        return None
    return curve_metrics(sum(c.pos_hist for c in cases), sum(c.neg_hist for c in cases))


def full_report(cases: Sequence[CaseScores], n_boot: int = 1000, seed: int = 0,
                target_types: Sequence[str] = ("tumour", "resection"), target_min_size_mm: float = 15.0) -> dict:
    """Headline metrics with intervals, the breakdowns by type and size, and the target subset of the issue."""
    cases = list(cases)
    voxel = all(c.pos_hist is not None for c in cases)
    normals = [c for c in cases if not c.abnormal]
    target = [c for c in cases if c.abnormal and c.type in target_types and (c.size_mm or 0) >= target_min_size_mm]
    report = {
        "overall": summarise(cases, n_boot=n_boot, seed=seed, voxel=voxel),
        "by_type": breakdown(cases, lambda c: c.type, voxel=voxel),
        "by_size": breakdown(cases, lambda c: size_bin(c.size_mm), voxel=voxel),
        "by_type_and_size": breakdown(cases, lambda c: f"{c.type}@{c.size_mm:g}mm", voxel=voxel),
    }
    if target:
        report["target_subset"] = summarise(normals + target, n_boot=n_boot, seed=seed, voxel=voxel)
        report["target_subset"]["definition"] = (f"types {list(target_types)}, size >= {target_min_size_mm:g} mm, "
                                                 "against all normal scans")
    return report
