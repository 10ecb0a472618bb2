"""The heat colour ramp every picture of a heatmap uses (the quick-look PNG, the Slicer colour table, the
screenshots): matplotlib's *inferno* from dark purple to pale yellow, skipping its near-black start, which
would be invisible over an MRI. Sampled here so that neither the core nor Slicer needs matplotlib for it."""
from __future__ import annotations

import numpy as np

# Samples of matplotlib's inferno colour map at 17 evenly spaced points (0, 1/16, ..., 1).
INFERNO = np.array([
    (0.001, 0.000, 0.014), (0.042, 0.028, 0.141), (0.129, 0.047, 0.291), (0.238, 0.037, 0.396),
    (0.342, 0.062, 0.429), (0.441, 0.099, 0.432), (0.541, 0.135, 0.415), (0.640, 0.171, 0.381),
    (0.736, 0.216, 0.330), (0.822, 0.275, 0.266), (0.894, 0.353, 0.194), (0.947, 0.449, 0.115),
    (0.978, 0.558, 0.035), (0.988, 0.675, 0.065), (0.975, 0.798, 0.206), (0.948, 0.917, 0.411),
    (0.988, 0.998, 0.645),
])
HEAT_START = 0.22  # where on inferno a heat of 0 starts


def heat_rgb(level) -> np.ndarray:
    """RGB in [0, 1] (shape `level.shape + (3,)`) for heat levels in [0, 1] (clipped)."""
    u = HEAT_START + (1.0 - HEAT_START) * np.clip(np.asarray(level, dtype=np.float64), 0.0, 1.0)
    anchors = np.linspace(0.0, 1.0, len(INFERNO))
    return np.stack([np.interp(u, anchors, INFERNO[:, c]) for c in range(3)], axis=-1)


# The grey window of a scan under its heatmap: robust to a few very bright or dark voxels.
GREY_PERCENTILES = (1.0, 99.5)


def grey_window(values) -> tuple[float, float]:
    """(lo, hi): the grey window of `values` (a plane, or a whole series so that its slices match)."""
    lo, hi = np.percentile(values, GREY_PERCENTILES)
    return float(lo), float(max(hi, lo + 1e-6))


def heat_scale(heat, threshold: float) -> float:
    """The heat shown in the brightest colour: the maximum, but at least 1.5 x the threshold, so that a scan
    with nothing above its threshold is not painted as if its weak heat were strong."""
    return max(float(np.max(heat)), threshold * 1.5, 1e-6)


def heat_over_grey(values, heat, threshold: float, vmax: float, window=None) -> np.ndarray:
    """uint8 RGB: `heat` in the heat colours blended over `values` in grey (windowed by `window`, default
    `grey_window(values)`): the one blend of every picture of a heatmap over a scan (the quick-look PNG, the
    DICOM overlay series). Heat at or above `threshold` at 75 % opacity; weaker heat fades in below it (a
    quarter at most) so that it never looks like a finding; no heat leaves the grey as it is."""
    lo, hi = grey_window(values) if window is None else window
    grey = np.clip((np.asarray(values, dtype=np.float64) - lo) / max(hi - lo, 1e-6), 0, 1)
    heat = np.asarray(heat, dtype=np.float64)
    colour = heat_rgb(np.clip(heat / vmax, 0, 1))
    alpha = np.where(heat >= threshold, 0.75, np.clip(heat / threshold, 0, 1) * 0.25)[..., None]
    blended = (1 - alpha) * grey[..., None] + alpha * colour
    return (blended * 255).astype(np.uint8)


# Region colours by rank, warm and distinguishable (first = strongest region): the Slicer segmentation and the
# DICOM Segmentation's recommended display colours.
REGION_COLORS = (
    (0.99, 0.85, 0.22), (0.98, 0.55, 0.04), (0.89, 0.29, 0.20), (0.74, 0.22, 0.33),
    (0.55, 0.14, 0.42), (0.99, 0.70, 0.50), (0.93, 0.45, 0.53), (0.65, 0.38, 0.75),
)


def region_rgb(rank: int) -> tuple:
    """RGB in [0, 1] of the region of `rank` (1 = strongest); the colours repeat after eight."""
    return REGION_COLORS[(int(rank) - 1) % len(REGION_COLORS)]
