"""Is this scan like the normal scans the model knows at all? (out-of-distribution honesty)

A lesion raises the scores of the slices it touches; a scan of another contrast, age group or
quality raises them all. The typical (median) slice z-score tells the two apart: normal scans sit
near 0, a scan with a lesion too (most of its slices are normal), a scan from elsewhere far above.
Such a scan's volume percentile says "unlike the model's normals", not "anomaly found", and the
report, the CLI and the Slicer panel say so.
"""
from __future__ import annotations

import numpy as np

# The limit is the largest typical z of the normal calibration scans plus a margin, and never below
# MIN_LIMIT: with a few dozen calibration scans the largest one is itself a noisy estimate.
MARGIN_Z = 1.0
MIN_LIMIT = 1.5


def typical_z(slice_z: np.ndarray) -> float:
    return float(np.median(slice_z))


def fit_typicality(per_scan_slice_z: list[np.ndarray]) -> dict:
    values = [typical_z(z) for z in per_scan_slice_z]
    return {"statistic": "median slice z-score", "normal_values": [round(v, 4) for v in values],
            "limit": round(max(MIN_LIMIT, max(values) + MARGIN_Z), 4)}


def assess(slice_z: np.ndarray, calibration: dict) -> dict | None:
    """{'typical_z', 'limit', 'out_of_distribution'}; None for a model calibrated without typicality."""
    fitted = calibration.get("typicality")
    if not fitted:
        return None
    value = typical_z(slice_z)
    return {"typical_z": round(value, 3), "limit": fitted["limit"],
            "out_of_distribution": bool(value > fitted["limit"])}
