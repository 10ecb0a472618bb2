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


# Per-position statistics need this many normal scans at a position; with fewer, the pooled ones serve. The
# heatmap's slice weighting is exponential in the z-score, so a spread from a handful of scans weights
# slices at random: calibrated on 4 synthetic normals, the tiny test model's heatmap no longer favoured
# its lesion (mean inside / mean in the brain 0.98) until these positions were pooled.
MIN_SCANS_PER_POSITION = 10


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
        if len(values) >= MIN_SCANS_PER_POSITION:
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


# ---------------------------------------------------------------- validation of a bundle's calibration

MAX_THRESHOLD = 1e3  # heatmap unit: 1.0 = the 99th percentile of normal heatmaps; thresholds are about 1-5
MAX_SCORES = 100_000


def validate_calibration(calibration: dict, n_slices: int) -> None:
    """Raise ValueError naming the first field that is missing, of the wrong type, non-finite, out of
    range or of the wrong length. Fields other code may add (e.g. `typicality`) are checked loosely: any
    nesting of dicts and lists of strings and finite numbers."""
    if not isinstance(calibration, dict):
        raise ValueError("calibration is not a mapping")
    _numbers(calibration, "slice_nll_mean", n_slices)
    _numbers(calibration, "slice_nll_std", n_slices, positive=True)
    _numbers(calibration, "volume_scores")
    if calibration.get("volume_aggregate", DEFAULT_AGGREGATE) not in AGGREGATES:
        raise ValueError(f"calibration.volume_aggregate must be one of {', '.join(AGGREGATES)}")
    _number(calibration, "heatmap_scale", 0.0, 1e12, low_open=True)
    _number(calibration, "voxel_threshold", 0.0, MAX_THRESHOLD, low_open=True)
    _number(calibration, "min_region_mm3", 0.0, 1e9)
    _number(calibration, "false_alarm_quantile", 0.0, 1.0, low_open=True, required=False)
    _number(calibration, "n_scans", 1, 1e9, integer=True, required=False)
    _number(calibration, "n_heatmap_scans", 1, 1e9, integer=True, required=False)
    if "normal_region_bounds" in calibration:
        _numbers(calibration, "normal_region_bounds", minimum=0)
    for key, value in calibration.items():
        if key not in _KNOWN_FIELDS:
            check_loose(value, f"calibration.{key}")


def _numbers(calibration: dict, key: str, length=None, positive=False, minimum=1) -> None:
    values = calibration.get(key)
    if not isinstance(values, list) or not all(_is_number(v) for v in values):
        raise ValueError(f"calibration.{key} must be a list of numbers")
    if length is not None and len(values) != length:
        raise ValueError(f"calibration.{key} has {len(values)} values; the reference grid has {length} slices")
    if not minimum <= len(values) <= MAX_SCORES:
        raise ValueError(f"calibration.{key} must hold {minimum} to {MAX_SCORES} values")
    if not all(np.isfinite(v) for v in values):
        raise ValueError(f"calibration.{key} holds non-finite values")
    if positive and not all(v > 0 for v in values):
        raise ValueError(f"calibration.{key} must be positive")


def _number(calibration: dict, key: str, low, high, low_open=False, required=True, integer=False) -> None:
    if key not in calibration and not required:
        return
    value = calibration.get(key)
    if not _is_number(value) or (integer and not isinstance(value, int)):
        raise ValueError(f"calibration.{key} must be {'an integer' if integer else 'a number'}")
    if not np.isfinite(value) or value > high or value < low or (low_open and value == low):
        raise ValueError(f"calibration.{key} = {value} is outside {'(' if low_open else '['}{low:g}, {high:g}]")


_KNOWN_FIELDS = {"slice_nll_mean", "slice_nll_std", "volume_scores", "volume_aggregate", "heatmap_scale",
                 "voxel_threshold", "min_region_mm3", "n_scans", "n_heatmap_scans", "normal_region_bounds",
                 "false_alarm_quantile"}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_loose(value, where: str, depth: int = 0) -> None:
    """JSON made of dicts, lists, strings, booleans, null and finite numbers, at most 8 levels deep."""
    if depth > 8:
        raise ValueError(f"{where} is nested too deeply")
    if isinstance(value, dict):
        for key, item in value.items():
            check_loose(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, list):
        for item in value:
            check_loose(item, where, depth + 1)
    elif _is_number(value):
        if not np.isfinite(value):
            raise ValueError(f"{where} holds a non-finite number")
    elif not (value is None or isinstance(value, (str, bool))):
        raise ValueError(f"{where} holds a {type(value).__name__}")
