"""From a scan to normalised reference-space slices: the same steps in training and in detection."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .space import ReferenceSpace

DEFAULT_NORMALISATION = {"method": "robust-range", "low_percentile": 1.0, "high_percentile": 99.0,
                         "clip": [-0.5, 2.0]}


@dataclass
class PreparedScan:
    """A scan in the reference space: normalised slices, brain mask, and the transform to go back."""

    volume: np.ndarray  # [z, y, x] float32, normalised, 0 outside the mask
    mask: np.ndarray  # [z, y, x] bool
    transform: sitk.Transform  # reference points -> scan points
    slice_indices: np.ndarray  # axial slices that hold enough brain to be scored

    @property
    def slices(self) -> np.ndarray:
        return self.volume[self.slice_indices]


def normalise_intensity(volume: np.ndarray, mask: np.ndarray, config: dict = DEFAULT_NORMALISATION) -> np.ndarray:
    """Map the brain's low/high percentiles to 0/1 (robust to outliers and to the scanner's scale)."""
    values = volume[mask]
    if values.size < 100:
        raise InputError("too little brain overlaps the template after alignment; is this a brain MRI?")
    low, high = np.percentile(values, [config["low_percentile"], config["high_percentile"]])
    if high - low <= 1e-6 * max(1.0, abs(high)):
        raise InputError("the brain region of the scan has no contrast (constant intensity)")
    out = np.clip((volume - low) / (high - low), *config["clip"]).astype(np.float32)
    out[~mask] = 0.0
    return out


def brain_slices(mask: np.ndarray, min_fraction: float) -> np.ndarray:
    """Indices of axial slices whose brain area is at least `min_fraction` of the largest slice's."""
    area = mask.reshape(mask.shape[0], -1).sum(1)
    return np.flatnonzero(area >= min_fraction * area.max())


# |correlation| with the template inside the brain after alignment: about 0.35-0.95 for T1, T2 and FLAIR
# scans (negative for T2), about 0.05 for noise. Below this the scan is not a brain MRI we can read.
MIN_TEMPLATE_CORRELATION = 0.15


def _check_resembles_brain(volume: np.ndarray, template: np.ndarray, mask: np.ndarray) -> None:
    correlation = np.corrcoef(volume[mask], template[mask])[0, 1]
    if not np.isfinite(correlation) or abs(correlation) < MIN_TEMPLATE_CORRELATION:
        raise InputError("the scan does not resemble a brain MRI after alignment to the template "
                         f"(|correlation| {abs(np.nan_to_num(correlation)):.2f} < {MIN_TEMPLATE_CORRELATION})")


def prepare_scan(image: sitk.Image, space: ReferenceSpace, normalisation: dict, min_brain_fraction: float,
                 mask: sitk.Image | None = None, transform: sitk.Transform | None = None,
                 seed: int = 0) -> PreparedScan:
    transform = transform or space.align(image, seed=seed)
    volume = space.to_reference(image, transform)
    brain = sitk.GetArrayViewFromImage(space.template_mask) > 0
    if mask is not None:
        user = space.to_reference(sitk.Cast(mask > 0, sitk.sitkUInt8), transform, sitk.sitkNearestNeighbor) > 0
        if user.sum() < 100:
            raise InputError("the brain mask does not overlap the scan's brain (after alignment)")
        brain = user
    normalised = normalise_intensity(volume, brain, normalisation)
    _check_resembles_brain(normalised, sitk.GetArrayViewFromImage(space.template), brain)
    return PreparedScan(normalised, brain.copy(), transform, brain_slices(brain, min_brain_fraction))
