"""Suspicious regions: connected components of the heatmap above the calibrated threshold."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .space import lps_to_ras


@dataclass(frozen=True)
class Region:
    rank: int  # 1 = highest peak
    centre_ras: tuple[float, float, float]  # heatmap-weighted centre, RAS mm
    volume_mm3: float
    peak: float
    mean: float
    voxel_count: int

    def to_json(self) -> dict:
        data = asdict(self)
        data["centre_ras"] = [round(float(v), 2) for v in self.centre_ras]
        for key in ("volume_mm3", "peak", "mean"):
            data[key] = round(float(data[key]), 4)
        return data


def find_regions(heatmap: sitk.Image, threshold: float, min_volume_mm3: float) -> tuple[list[Region], sitk.Image]:
    """Ranked regions and a label image on the heatmap's grid (0 = background, k = region of rank k)."""
    values = sitk.GetArrayViewFromImage(heatmap)
    components, count = ndimage.label(values > threshold)
    voxel_mm3 = float(np.prod(heatmap.GetSpacing()))
    rank_of_component = np.zeros(count + 1, dtype=np.uint16)
    found = []
    if count:
        ids = np.arange(1, count + 1)
        sizes = ndimage.sum_labels(np.ones_like(values, dtype=np.uint8), components, ids)
        peaks = ndimage.maximum(values, components, ids)
        means = ndimage.mean(values, components, ids)
        centres = ndimage.center_of_mass(values, components, ids)  # [z, y, x] continuous indices
        keep = [i for i in range(count) if sizes[i] * voxel_mm3 >= min_volume_mm3]
        keep.sort(key=lambda i: -peaks[i])
        for rank, i in enumerate(keep[:np.iinfo(np.uint16).max], start=1):
            centre_lps = heatmap.TransformContinuousIndexToPhysicalPoint([float(c) for c in centres[i][::-1]])
            found.append(Region(rank, tuple(float(v) for v in lps_to_ras(centre_lps)), float(sizes[i] * voxel_mm3),
                                float(peaks[i]), float(means[i]), int(sizes[i])))
            rank_of_component[ids[i]] = rank
    label_image = sitk.GetImageFromArray(rank_of_component[components])
    label_image.CopyInformation(heatmap)
    return found, label_image
