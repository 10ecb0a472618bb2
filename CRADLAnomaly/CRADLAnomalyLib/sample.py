"""A generated sample scan for self-tests and screenshots (no download, no patient data).

The model bundle carries its reference T1 template; a sample scan is that template with an
inserted bright lesion (tumour-like core with a softer oedema rim), a little noise, and a chosen
voxel grid: flipped axes, an oblique direction and anisotropic spacing, so the whole path through
the geometry code is exercised.
"""
from __future__ import annotations

import numpy as np


def obliqueDirection(angleDeg: float = 12.0, flipLR: bool = True) -> np.ndarray:
    """An LPS direction matrix (columns = axes): rotated about S and A, optionally L-R flipped."""
    a = np.deg2rad(angleDeg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    b = np.deg2rad(angleDeg / 2)
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    direction = rz @ ry
    if flipLR:
        direction = direction @ np.diag([-1.0, 1.0, 1.0])
    return direction


def insertLesion(image, centreLps, radiusMm: float = 12.0, intensity: float = 0.6, seed: int = 0):
    """Copy of ``image`` with a bright spherical lesion and a halo (values added, then clipped)."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image).astype(np.float32)
    size = np.array(image.GetSize())
    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    index = np.stack([ii, jj, kk], axis=-1).reshape(-1, 3).astype(float)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    points = np.array(image.GetOrigin()) + (index * np.array(image.GetSpacing())) @ direction.T
    dist = np.linalg.norm(points - np.asarray(centreLps, dtype=float), axis=1).reshape(array.shape)
    rng = np.random.default_rng(seed)
    core = 1.0 / (1.0 + np.exp((dist - radiusMm) / 1.5))
    halo = 0.35 / (1.0 + np.exp((dist - 1.6 * radiusMm) / 3.0))
    top = float(np.percentile(array[array > 0], 99)) if np.any(array > 0) else 1.0
    brain = array > 0.05 * top
    array = array + brain * intensity * top * (core + halo) * (1 + 0.05 * rng.standard_normal(array.shape))
    out = sitk.GetImageFromArray(np.clip(array, 0, None).astype(np.float32))
    out.CopyInformation(image)
    return out


def sampleScan(template, lesionCentreLps=None, spacing=(1.6, 1.4, 2.2), direction=None, noise: float = 0.01,
               seed: int = 0):
    """The template resampled onto a flipped, oblique, anisotropic grid covering it, with a lesion.

    ``template`` is a SimpleITK image (e.g. ``detector.space.template``). Returns (image, lesion
    centre in LPS)."""
    import SimpleITK as sitk

    template = sitk.Cast(template, sitk.sitkFloat32)
    size = np.array(template.GetSize())
    image = resampleOblique(template, spacing, direction)
    if lesionCentreLps is None:
        centre = np.array(template.TransformContinuousIndexToPhysicalPoint([float(v) for v in (size - 1) / 2]))
        lesionCentreLps = centre + np.array([-22.0, -8.0, 12.0])  # left hemisphere, a little superior
    image = insertLesion(image, lesionCentreLps, seed=seed)
    if noise > 0:
        rng = np.random.default_rng(seed + 1)
        array = sitk.GetArrayFromImage(image)
        array = array + noise * float(array.max()) * rng.standard_normal(array.shape).astype(np.float32)
        noisy = sitk.GetImageFromArray(np.clip(array, 0, None).astype(np.float32))
        noisy.CopyInformation(image)
        image = noisy
    return image, np.asarray(lesionCentreLps, dtype=float)


def resampleOblique(template, spacing=(1.6, 1.4, 2.2), direction=None):
    """``template`` resampled (linear) onto a grid with ``direction`` (default: oblique, L-R flipped)
    and anisotropic ``spacing`` that covers all of it."""
    import SimpleITK as sitk

    direction = obliqueDirection() if direction is None else np.asarray(direction, dtype=float)
    size = np.array(template.GetSize())
    corners = np.array([[i, j, k] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)])
    world = np.array([template.TransformContinuousIndexToPhysicalPoint([float(v) for v in c]) for c in corners])
    local = world @ direction  # coordinates along the new axes
    lo, hi = local.min(0), local.max(0)
    spacing = np.asarray(spacing, dtype=float)
    newSize = np.ceil((hi - lo) / spacing).astype(int) + 1
    reference = sitk.Image([int(v) for v in newSize], sitk.sitkFloat32)
    reference.SetSpacing([float(v) for v in spacing])
    reference.SetDirection([float(v) for v in direction.ravel()])
    reference.SetOrigin([float(v) for v in direction @ lo])
    return sitk.Resample(sitk.Cast(template, sitk.sitkFloat32), reference, sitk.Transform(), sitk.sitkLinear,
                         0.0, sitk.sitkFloat32)
