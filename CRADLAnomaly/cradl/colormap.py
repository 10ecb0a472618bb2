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
