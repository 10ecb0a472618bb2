"""The model's reference space and every coordinate conversion, in one place.

SimpleITK (and so the core) works in LPS physical coordinates; Slicer and the reports speak RAS.
Scans are aligned to the reference template by affine registration; the model sees axial slices of
the reference grid; heatmaps go back through the inverse transform onto the input's exact grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

_LPS_RAS_FLIP = np.array([-1.0, -1.0, 1.0])


def lps_to_ras(points) -> np.ndarray:
    """Physical points (..., 3) from LPS (ITK, most files) to RAS (Slicer, reports)."""
    return np.asarray(points, dtype=float) * _LPS_RAS_FLIP


def ras_to_lps(points) -> np.ndarray:
    return np.asarray(points, dtype=float) * _LPS_RAS_FLIP


def ras_canonical_array(image: sitk.Image) -> np.ndarray:
    """The voxels as an [x, y, z] array whose axes run towards R, A and S (nibabel's canonical order).

    The axes are only permuted and flipped (no resampling); an oblique scan goes to its nearest
    canonical orientation. Tools written for nibabel (brain extraction) expect this layout.
    """
    identity_lps = sitk.DICOMOrient(image, "LPS")  # direction ~ identity: array [z, y, x] towards S, P, L
    return np.ascontiguousarray(sitk.GetArrayViewFromImage(identity_lps).transpose(2, 1, 0)[::-1, ::-1, :])


def array_from_ras_canonical(array: np.ndarray, image: sitk.Image) -> np.ndarray:
    """Inverse of ras_canonical_array for a mask: an [x, y, z] RAS-ordered array back to `image`'s [z, y, x]."""
    geometry = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    geometry.CopyInformation(image)
    oriented = sitk.GetImageFromArray(np.ascontiguousarray(array[::-1, ::-1, :].transpose(2, 1, 0)).astype(np.uint8))
    oriented.CopyInformation(sitk.DICOMOrient(geometry, "LPS"))
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    return sitk.GetArrayFromImage(sitk.DICOMOrient(oriented, code)).astype(array.dtype)


@dataclass(frozen=True)
class ReferenceGrid:
    """An axis-aligned LPS grid; numpy arrays on it are indexed [axial slice, row (P), column (L)]."""

    size: tuple[int, int, int]  # x, y, z as SimpleITK orders it
    spacing: float
    origin: tuple[float, float, float]

    def empty_image(self, pixel=sitk.sitkFloat32) -> sitk.Image:
        image = sitk.Image([int(s) for s in self.size], pixel)
        image.SetSpacing([self.spacing] * 3)
        image.SetOrigin([float(o) for o in self.origin])
        return image

    def image_from_array(self, array: np.ndarray) -> sitk.Image:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetSpacing([self.spacing] * 3)
        image.SetOrigin([float(o) for o in self.origin])
        return image

    def to_json(self) -> dict:
        return {"size": list(self.size), "spacing": self.spacing, "origin": list(self.origin)}

    @classmethod
    def from_json(cls, data: dict) -> "ReferenceGrid":
        return cls(tuple(int(s) for s in data["size"]), float(data["spacing"]),
                   tuple(float(o) for o in data["origin"]))

    @classmethod
    def around(cls, mask: sitk.Image, slice_size: int, spacing: float, margin_mm: float = 4.0) -> "ReferenceGrid":
        """A grid of slice_size x slice_size axial pixels centred on the mask, covering its height."""
        lower, upper = _physical_bounds(mask)
        centre = (lower + upper) / 2
        n_slices = int(np.ceil((upper[2] - lower[2] + 2 * margin_mm) / spacing))
        size = np.array([slice_size, slice_size, n_slices])
        origin = centre - (size - 1) / 2 * spacing
        return cls(tuple(int(s) for s in size), float(spacing), tuple(float(o) for o in origin))


def _physical_bounds(mask: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    index = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1]  # -> x, y, z
    corners = [mask.TransformIndexToPhysicalPoint([int(v) for v in c]) for c in (index.min(0), index.max(0))]
    corners = np.array(corners)
    return corners.min(0), corners.max(0)


def resample(image: sitk.Image, reference: sitk.Image, transform: sitk.Transform | None = None,
             interpolator=sitk.sitkLinear, default: float = 0.0) -> sitk.Image:
    """`image` on the grid of `reference`; `transform` maps reference points to image points."""
    return sitk.Resample(image, reference, transform or sitk.Transform(), interpolator, default,
                         image.GetPixelID())


# Registration schedule, measured on real brains (brain-extracted IXI heads and BraTS/MS patients,
# Dice of the aligned brain mask with the template's): 30 iterations at 10 % sampling left 3 of 13
# scans misaligned (Dice 0.84-0.88); 100 iterations at 25 % aligned all of them (0.89-0.96) for
# about 1.5 times the registration time.
ITERATIONS_PER_STAGE = 100
METRIC_SAMPLING = 0.25


def register_affine(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image | None = None,
                    seed: int = 0) -> sitk.AffineTransform:
    """Affine transform mapping points of `fixed` (template) onto `moving` (scan).

    Mattes mutual information, so T1, T2 and FLAIR align to the same template; moments initialisation
    handles any orientation and field of view; a similarity stage first keeps the affine stage stable.
    """
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = coarse_copy(sitk.Cast(moving, sitk.sitkFloat32), fixed.GetSpacing()[0])
    initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.Similarity3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    similarity = _run_registration(fixed, moving, initial, fixed_mask, seed, shrink=(4, 2))
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(similarity.GetMatrix())
    affine.SetTranslation(similarity.GetTranslation())
    affine.SetCenter(similarity.GetCenter())
    return _run_registration(fixed, moving, affine, fixed_mask, seed, shrink=(2, 1))


def coarse_copy(image: sitk.Image, spacing: float) -> sitk.Image:
    """Registration never needs finer voxels than the template's: average blocks of big scans first.

    Block averaging (BinShrink) aligned as well as Gaussian smoothing + subsampling on the synthetic
    scans (1.16 vs 1.19 mm mean error) in 3 ms instead of 0.23 s for a 1 mm brain.
    """
    # The tolerance: a 3 mm scan read back from NRRD had a spacing of 3.0000000000000004, and 6 / that
    # truncates to 1, not 2; the whole result must not hang on such rounding.
    factors = [max(1, int(spacing / s + 1e-6)) for s in image.GetSpacing()]
    return image if max(factors) == 1 else sitk.BinShrink(image, factors)


def coarse_mask(mask: sitk.Image, spacing: float) -> sitk.Image:
    """A mask on `coarse_copy`'s grid, by majority over each block. A nearest neighbour would be a tie with
    even blocks (a 1 mm scan onto 2 mm), broken by the last bits of the geometry, which differ between file
    formats."""
    return sitk.Cast(coarse_copy(sitk.Cast(mask > 0, sitk.sitkFloat32), spacing) > 0.5, sitk.sitkUInt8)


def _run_registration(fixed, moving, initial, fixed_mask, seed, shrink):
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    # SimpleITK reads seed 0 as "seed from the wall clock": offset it so every seed is reproducible
    reg.SetMetricSamplingPercentage(METRIC_SAMPLING, seed + 1)
    if fixed_mask is not None:
        reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3,
                                                 numberOfIterations=ITERATIONS_PER_STAGE,
                                                 gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel([s / 2 for s in shrink])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(initial, inPlace=False)
    result = reg.Execute(fixed, moving)
    if isinstance(result, sitk.CompositeTransform):
        result = result.GetBackTransform() if result.GetNumberOfTransforms() == 1 else result
    return type(initial)(result) if not isinstance(result, type(initial)) else result


class ReferenceSpace:
    """The reference grid with its template and brain mask; aligns scans to it and maps results back."""

    def __init__(self, grid: ReferenceGrid, template: np.ndarray, template_mask: np.ndarray):
        self.grid = grid
        self.template = grid.image_from_array(np.asarray(template, dtype=np.float32))
        self.template_mask = grid.image_from_array(np.asarray(template_mask, dtype=np.uint8))

    @classmethod
    def from_mni(cls, slice_size: int, spacing: float) -> "ReferenceSpace":
        """The MNI152 template (nilearn wheel) on a grid of slice_size^2 axial pixels at `spacing` mm."""
        from .template import load_mni, load_mni_brain_mask

        mask_1mm = load_mni_brain_mask()
        grid = ReferenceGrid.around(mask_1mm, slice_size, spacing)
        ref = grid.empty_image()
        t1 = resample(sitk.SmoothingRecursiveGaussian(load_mni("t1"), spacing / 2), ref)
        mask = resample(mask_1mm, ref, interpolator=sitk.sitkNearestNeighbor)
        return cls(grid, sitk.GetArrayFromImage(t1), sitk.GetArrayFromImage(mask))

    def align(self, image: sitk.Image, seed: int = 0) -> sitk.AffineTransform:
        """Affine transform from reference points to the scan's physical points."""
        try:
            return register_affine(self.template, image, self.template_mask, seed=seed)
        except RuntimeError as exc:
            from .errors import InputError
            raise InputError("could not align the scan to the brain template "
                             f"({str(exc).strip().splitlines()[-1][:100]}); is it a brain MRI?") from None

    def to_reference(self, image: sitk.Image, transform: sitk.Transform,
                     interpolator=sitk.sitkLinear) -> np.ndarray:
        """The scan resampled onto the reference grid, as a [z, y, x] array."""
        ref = self.grid.empty_image(image.GetPixelID())
        return sitk.GetArrayFromImage(resample(image, ref, transform, interpolator))

    def to_input(self, array: np.ndarray, transform: sitk.Transform, target: sitk.Image,
                 interpolator=sitk.sitkLinear) -> sitk.Image:
        """A reference-grid array resampled onto `target`'s exact grid (size, spacing, origin, direction)."""
        ref_image = self.grid.image_from_array(array)
        return resample(ref_image, target, transform.GetInverse(), interpolator)

    def reference_to_input_ras(self, points_ref_lps: np.ndarray, transform: sitk.Transform) -> np.ndarray:
        """Reference-space physical points (LPS) -> the scan's physical points in RAS."""
        moved = np.array([transform.TransformPoint([float(v) for v in p]) for p in np.atleast_2d(points_ref_lps)])
        return lps_to_ras(moved)
