"""From a scan to normalised reference-space slices: the same steps in training and in detection."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage, stats

from .brain import extract_brain, is_brain_sized
from .errors import InputError
from .space import ReferenceSpace, coarse_copy, coarse_mask, resample

DEFAULT_NORMALISATION = {"method": "robust-range", "low_percentile": 1.0, "high_percentile": 99.0,
                         "clip": [-0.5, 2.0]}


@dataclass
class PreparedScan:
    """A scan in the reference space: normalised slices, brain mask, and the transform to go back."""

    volume: np.ndarray  # [z, y, x] float32, normalised, 0 outside the mask
    mask: np.ndarray  # [z, y, x] bool
    transform: sitk.Transform  # reference points -> scan points
    slice_indices: np.ndarray  # axial slices that hold enough brain to be scored
    brain_extraction: str = "given"  # how the brain mask was found: 'network', 'already stripped', 'given'
    t1_likeness: float = 1.0  # rank correlation with the T1 template in the brain's core (negative: T2-like)

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


# How much of the template's intensity variance inside the brain the scan's intensities explain after
# alignment (correlation ratio over 32 intensity bins of the scan: any tissue contrast, monotone or not,
# counts), measured on the brain's core, BRAIN_CHECK_MARGIN_MM inside its outline, where a matching
# outline alone cannot explain anything. Synthetic T1/T2/FLAIR scans: 0.26-0.95; real brains (2 mm IXI
# T1 heads after brain extraction, BraTS and MS patients) have far weaker contrast at 2 mm: 0.04-0.35;
# ellipsoid phantoms at most 0.008 and noise 0.002. Below the threshold the scan is not a brain MRI we
# can read.
MIN_TEMPLATE_EXPLAINED = 0.02
BRAIN_CHECK_MARGIN_MM = 6.0


def template_explained(volume: np.ndarray, template: np.ndarray, mask: np.ndarray, bins: int = 32) -> float:
    """Correlation ratio: fraction of the template's variance in `mask` explained by binned scan intensity."""
    scan, reference = volume[mask], np.asarray(template)[mask].astype(np.float64)
    edges = np.quantile(scan, np.linspace(0, 1, bins + 1)[1:-1])
    which = np.searchsorted(edges, scan)
    counts = np.bincount(which, minlength=bins)
    means = np.bincount(which, reference, minlength=bins) / np.maximum(counts, 1)
    total = ((reference - reference.mean()) ** 2).sum()
    return float((counts * (means - reference.mean()) ** 2).sum() / total) if total > 0 else 0.0


def brain_core(mask: np.ndarray, spacing_mm: float) -> np.ndarray:
    """The mask eroded by BRAIN_CHECK_MARGIN_MM; the whole mask when too little would be left."""
    core = ndimage.binary_erosion(mask, iterations=max(1, round(BRAIN_CHECK_MARGIN_MM / spacing_mm)))
    return core if core.sum() >= 0.1 * mask.sum() else mask


def _check_resembles_brain(volume: np.ndarray, template: np.ndarray, core: np.ndarray) -> None:
    explained = template_explained(volume, template, core)
    if explained < MIN_TEMPLATE_EXPLAINED:
        raise InputError("the scan does not resemble a brain MRI after alignment to the template "
                         f"(its intensities explain {explained:.0%} of the template's brain contrast; "
                         f"a brain MRI explains at least {MIN_TEMPLATE_EXPLAINED:.0%})")


def correct_bias_field(image: sitk.Image, mask: sitk.Image, spacing_mm: float = 6.0) -> sitk.Image:
    """The scan divided by its N4 bias field, estimated inside the brain mask.

    The field is smooth, so it is estimated on a 6 mm copy and interpolated onto the scan's own grid
    (evaluating N4's B-spline on a 1 mm grid instead took three times as long and changed the field by at
    most 1%). These settings are the ones measured in the README. N4 works on logarithms: the brain's
    intensities are shifted to be positive first (z-scored scans have negative ones) and shifted back after.
    The work is done on the voxel grid alone (spacing rounded, no origin or direction): the last bits of a
    scan's geometry, which differ between file formats, must not change the result (a 3 mm scan written
    to NRRD and read back moved a Slicer detection's score by 1.5%).
    """
    positive, brain = (_on_plain_grid(sitk.Cast(each, pixel)) for each, pixel in
                       ((image, sitk.sitkFloat32), (mask > 0, sitk.sitkUInt8)))
    values = sitk.GetArrayViewFromImage(positive)[sitk.GetArrayViewFromImage(brain) > 0]
    shift = float(max(0.0, -values.min()) + 0.01 * (values.max() - values.min()) + 1e-3)
    positive = positive + shift
    coarse, coarse_brain = coarse_copy(positive, spacing_mm), coarse_mask(brain, spacing_mm)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([50, 50, 50])
    corrector.Execute(coarse, coarse_brain)
    log_field = resample(corrector.GetLogBiasFieldAsImage(coarse), positive, interpolator=sitk.sitkLinear)
    corrected = positive / sitk.Exp(log_field) - shift
    corrected.CopyInformation(image)
    return corrected


def _on_plain_grid(image: sitk.Image) -> sitk.Image:
    plain = sitk.Image(image)
    plain.SetSpacing([round(v, 6) for v in image.GetSpacing()])
    plain.SetOrigin([0.0] * image.GetDimension())
    plain.SetDirection(np.eye(image.GetDimension()).ravel().tolist())
    return plain


def brain_only(image: sitk.Image, mask: sitk.Image, normalisation: dict, spacing_mm: float) -> sitk.Image:
    """The scan at registration resolution, normalised inside its brain and 0 outside, like the template.

    Registering the brain alone is what makes heads with skull and neck align: matched against the
    skull-stripped template, the whole head pulled the brain towards the skull and the neck.
    """
    coarse = coarse_copy(sitk.Cast(image, sitk.sitkFloat32), spacing_mm)
    brain = sitk.GetArrayFromImage(coarse_mask(mask, spacing_mm)) > 0
    if brain.sum() < 100:
        raise InputError("the brain mask covers almost none of the scan")
    array = normalise_intensity(sitk.GetArrayFromImage(coarse), brain, normalisation)
    out = sitk.GetImageFromArray(np.clip(array, 0.0, None))
    out.CopyInformation(coarse)
    return out


def prepare_scan(image: sitk.Image, space: ReferenceSpace, normalisation: dict, min_brain_fraction: float,
                 mask: sitk.Image | None = None, transform: sitk.Transform | None = None,
                 seed: int = 0) -> PreparedScan:
    """Brain mask, affine alignment of the brain, normalised reference slices.

    A given `mask` of a brain's size is the brain mask; a smaller one (a region of interest) only restricts
    where anomalies are looked for, inside the extracted brain, which is what is aligned.
    """
    method, region = "given", None
    if mask is not None and not same_grid(mask, image):
        mask = resample(sitk.Cast(mask > 0, sitk.sitkUInt8), image, interpolator=sitk.sitkNearestNeighbor)
    if mask is None or not is_brain_sized(sitk.GetArrayViewFromImage(mask) > 0, image):
        region = mask
        mask, method = extract_brain(image)
    if normalisation.get("bias_correction") == "n4":
        image = correct_bias_field(image, mask)
    transform = transform or space.align(brain_only(image, mask, normalisation, space.grid.spacing), seed=seed)
    volume = space.to_reference(image, transform)
    brain = space.to_reference(sitk.Cast(mask > 0, sitk.sitkUInt8), transform, sitk.sitkNearestNeighbor) > 0
    if region is not None:
        brain &= space.to_reference(sitk.Cast(region > 0, sitk.sitkUInt8), transform, sitk.sitkNearestNeighbor) > 0
        method += " and the given region"
    if brain.sum() < 100:
        raise InputError("the brain mask does not overlap the reference brain after alignment")
    normalised = normalise_intensity(volume, brain, normalisation)
    template = sitk.GetArrayViewFromImage(space.template)
    core = brain_core(brain, space.grid.spacing)
    _check_resembles_brain(normalised, template, core)
    indices = brain_slices(brain, min_brain_fraction)
    return PreparedScan(normalised, brain, transform, indices, method, t1_likeness(normalised, template, core, indices))


def t1_likeness(volume: np.ndarray, template: np.ndarray, core: np.ndarray, indices: np.ndarray) -> float:
    """Median over axial slices of the rank correlation with the T1 template in the brain's core.

    Per slice and then the median, so that a large lesion (a 170 ml infarct took the whole-brain
    correlation of a T1 from 0.32 to 0.13) does not make a T1 look like another contrast.
    """
    per_slice = [stats.spearmanr(volume[i][core[i]], template[i][core[i]]).statistic
                 for i in indices if core[i].sum() >= 200]
    return float(np.median(per_slice)) if per_slice else 0.0


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6))
