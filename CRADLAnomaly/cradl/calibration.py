"""Calibration against held-out normal scans: what "normal" looks like for slice scores, volume scores
and heatmap values, so results can be read as percentiles and thresholds rather than raw NLLs."""
from __future__ import annotations

import numpy as np

# How a volume's slice scores become one number. Slice NLLs are first standardised against normal
# scans at the same reference slice position (edge slices are rarer, hence score higher even when
# normal); the mean of the top-k standardised slices keeps one noisy slice from deciding alone
# while staying sensitive to a lesion that spans only a few slices.
AGGREGATES = ("max_nll", "mean_nll", "max_z", "top3_z", "mean_z")
DEFAULT_AGGREGATE = "top3_z"


def slice_z_scores(nll: np.ndarray, indices: np.ndarray, calibration: dict) -> np.ndarray:
    mean = np.asarray(calibration["slice_nll_mean"])[indices]
    std = np.asarray(calibration["slice_nll_std"])[indices]
    return (np.asarray(nll) - mean) / std


def aggregate(nll: np.ndarray, indices: np.ndarray, calibration: dict, method: str | None = None) -> float:
    method = method or calibration.get("volume_aggregate", DEFAULT_AGGREGATE)
    if method == "max_nll":
        return float(np.max(nll))
    if method == "mean_nll":
        return float(np.mean(nll))
    z = slice_z_scores(nll, indices, calibration)
    if method == "max_z":
        return float(np.max(z))
    if method == "top3_z":
        return float(np.mean(np.sort(z)[-3:]))
    if method == "mean_z":
        return float(np.mean(z))
    raise ValueError(f"unknown volume aggregate {method!r}; choose from {AGGREGATES}")


def percentile(score: float, calibration: dict) -> float:
    """Percentage of normal calibration scans scoring below `score` (0-100, ties count half)."""
    normal = np.asarray(calibration["volume_scores"], dtype=float)
    below = np.sum(normal < score) + 0.5 * np.sum(normal == score)
    return float(100.0 * below / len(normal))


def fit_slice_statistics(per_scan_nll: list[np.ndarray], per_scan_indices: list[np.ndarray],
                         n_slices: int) -> tuple[list[float], list[float]]:
    """Mean and spread of normal slice NLLs at each reference slice; pooled where data are thin."""
    sums = [[] for _ in range(n_slices)]
    for nll, indices in zip(per_scan_nll, per_scan_indices):
        for value, index in zip(nll, indices):
            sums[index].append(value)
    pooled = np.concatenate(per_scan_nll)
    pooled_std = float(np.std(pooled)) or 1.0
    means, stds = [], []
    for values in sums:
        if len(values) >= 3:
            means.append(float(np.mean(values)))
            # never trust a spread below a fraction of the pooled one: few scans underestimate it
            stds.append(max(float(np.std(values, ddof=1)), 0.25 * pooled_std))
        else:
            means.append(float(np.mean(pooled)))
            stds.append(pooled_std)
    return means, stds


def describe_percentile(percentile: float) -> str:
    """The volume percentile in words a radiologist reads at a glance."""
    p = float(percentile)
    if p >= 99.0:
        return "highly unusual: more anomalous than 99% of the normal reference scans"
    if p >= 95.0:
        return f"unusual: more anomalous than {int(np.floor(p))}% of the normal reference scans"
    if p >= 75.0:
        return f"upper end of normal (more anomalous than {int(np.floor(p))}% of normal reference scans)"
    return f"within the normal range ({_ordinal(int(np.floor(p)))} percentile of normal reference scans)"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
