"""Synthetic NORMAL brain scans built from the MNI152 2009a template, one at a time in memory (a cohort
folder of them is written by `sets.generate_normal_cohort`).

No data set can be downloaded on these machines, so normal anatomy comes from the template's grey-
and white-matter probability maps (CSF = brain minus GM minus WM) and is varied the way real scans
vary:

* tissue contrast: intensity = sum over tissues of probability x a random tissue mean, ordered
  T1-like (WM > GM > CSF), T2-like (CSF > GM > WM) or FLAIR-like (GM > WM > CSF, fluid dark);
* anatomy and head position: a smooth random deformation of a few mm (cubic B-spline field) and an
  affine jitter (rotation up to 10 degrees, translation up to 10 mm, scale +-8 %);
* scanner: a multiplicative smooth bias field, Rician noise, and sometimes resolution loss (thick
  slices of 3-5 mm, or blur);
* geometry: 1 mm isotropic mostly, some anisotropic grids, and varied orientations (LPS, RAS, LAS,
  sagittal-first, coronal-first direction matrices). Every grid change is a resampling in physical
  space, so whatever the direction matrix the brain sits where the template puts it (up to the
  head-position jitter).

Everything is one resampling: for each output voxel the template position is computed with numpy
(affine part by broadcasting, deformation as a separable tensor-product B-spline, both cheap) and the
pre-combined tissue intensity image is sampled with `scipy.ndimage.map_coordinates` (labels with
nearest neighbour). A scan takes about a second on one core; the same seed gives identical files.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from ..template import BACKGROUND, load_mni

CONTRASTS = ("t1", "t2", "flair")

# Random tissue means (fraction of the scan's intensity scale), disjoint ranges so the order holds.
_TISSUE_MEANS = {
    #         CSF            GM             WM
    "t1": ((0.12, 0.28), (0.50, 0.62), (0.78, 0.95)),
    "t2": ((0.85, 1.00), (0.50, 0.62), (0.32, 0.44)),
    "flair": ((0.05, 0.15), (0.64, 0.78), (0.44, 0.56)),
}

# Output orientations: columns are the physical (LPS) directions of the index axes i, j, k.
_DIRECTIONS = {
    "LPS": ((1, 0, 0), (0, 1, 0), (0, 0, 1)),
    "RAS": ((-1, 0, 0), (0, -1, 0), (0, 0, 1)),
    "LAS": ((-1, 0, 0), (0, 1, 0), (0, 0, 1)),          # radiological-style NIfTI
    "sagittal": ((0, -1, 0), (0, 0, -1), (1, 0, 0)),     # i towards anterior, j towards inferior, slices R->L
    "coronal": ((-1, 0, 0), (0, 0, -1), (0, -1, 0)),     # i towards right, j towards inferior, slices P->A
}
_DIRECTION_P = {"LPS": 0.25, "RAS": 0.3, "LAS": 0.1, "sagittal": 0.15, "coronal": 0.1, "random": 0.1}

_RESOLUTION_P = {"iso": 0.55, "thick": 0.25, "aniso": 0.1, "blur": 0.1}


# ---------------------------------------------------------------------------- template, cached

class _Template:
    """Tissue probability maps of the template, cropped to the brain's bounding box (numpy z, y, x)."""

    _instance: "_Template | None" = None

    def __init__(self) -> None:
        t1 = load_mni("t1")
        t1a = sitk.GetArrayViewFromImage(t1)
        gm = sitk.GetArrayFromImage(load_mni("gm"))
        wm = sitk.GetArrayFromImage(load_mni("wm"))
        brain = t1a > 0.02
        nz = np.nonzero(brain)
        lo = [max(int(a.min()) - 3, 0) for a in nz]
        hi = [min(int(a.max()) + 4, s) for a, s in zip(nz, brain.shape)]
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        brain = brain[sl]
        gm = np.clip(gm[sl], 0, 1) * brain
        wm = np.clip(wm[sl], 0, 1) * brain
        csf = np.clip(brain - gm - wm, 0, 1).astype(np.float32)
        self.probs = (csf.astype(np.float32), gm.astype(np.float32), wm.astype(np.float32))
        labels = np.argmax(np.stack(self.probs), axis=0).astype(np.uint8) + 1
        labels[~brain] = BACKGROUND
        self.labels = labels
        self.direction = np.array(t1.GetDirection()).reshape(3, 3)
        self.spacing = np.array(t1.GetSpacing())
        # origin of the crop: physical point of index (x, y, z) = lo reversed
        self.origin = np.array(t1.TransformContinuousIndexToPhysicalPoint([float(v) for v in lo[::-1]]))
        self.shape = labels.shape
        # physical (LPS) bounding box of the brain and its centre
        corners = [t1.TransformContinuousIndexToPhysicalPoint([float(c) for c in (x, y, z)])
                   for x in (nz[2].min(), nz[2].max()) for y in (nz[1].min(), nz[1].max())
                   for z in (nz[0].min(), nz[0].max())]
        corners = np.array(corners)
        self.box_lo, self.box_hi = corners.min(axis=0), corners.max(axis=0)
        zyx = np.array([a.mean() for a in nz])
        self.centre = np.array(t1.TransformContinuousIndexToPhysicalPoint([float(v) for v in zyx[::-1]]))

    @classmethod
    def get(cls) -> "_Template":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance


def mni_brain_centre() -> np.ndarray:
    """Centre of mass (LPS mm) of the template's brain mask: where a synthetic brain is centred."""
    return _Template.get().centre.copy()


def template_to_scan_affine(augmentation: dict) -> sitk.AffineTransform:
    """The affine part of a synthetic scan's geometry: template (MNI, LPS mm) point -> scan point.

    A scan's voxel at p shows template point c + A (p - c) + t (plus a smooth deformation of a few mm),
    so this is the ground truth that registration to the template should recover.
    """
    linear = _rotation(np.deg2rad(augmentation["rotation_deg"])) @ np.diag(augmentation["scale"])
    inverse = np.linalg.inv(linear)
    transform = sitk.AffineTransform(3)
    transform.SetCenter([float(v) for v in mni_brain_centre()])
    transform.SetMatrix([float(v) for v in inverse.ravel()])
    transform.SetTranslation([float(v) for v in -inverse @ np.asarray(augmentation["translation_mm"])])
    return transform


# ---------------------------------------------------------------------------- smooth fields

def _bspline_basis(positions_mm: np.ndarray, knot_spacing_mm: float) -> np.ndarray:
    """Cubic B-spline basis (n_positions, n_knots) covering positions_mm with the given knot spacing."""
    x = positions_mm - positions_mm.min()
    n_knots = int(np.ceil(x.max() / knot_spacing_mm)) + 3 if x.size > 1 else 4
    t = x[:, None] / knot_spacing_mm - (np.arange(n_knots)[None, :] - 1)
    a = np.abs(t)
    basis = np.where(a < 1, (4 - 6 * a ** 2 + 3 * a ** 3) / 6, np.where(a < 2, (2 - a) ** 3 / 6, 0.0))
    return basis.astype(np.float32)


def smooth_field(shape, spacing_zyx, knot_spacing_mm: float, sigma: float, rng: np.random.Generator,
                 n_fields: int = 1) -> np.ndarray:
    """Random smooth fields (n_fields, *shape) as tensor-product cubic B-splines on a coarse knot grid.

    Control coefficients are N(0, sigma); evaluation is three small matrix products, so a field on a
    full 1 mm volume costs tens of milliseconds. The fields' standard deviation is about 0.5 sigma.
    """
    bases = [_bspline_basis(np.arange(n) * float(s), knot_spacing_mm) for n, s in zip(shape, spacing_zyx)]
    out = np.empty((n_fields,) + tuple(shape), np.float32)
    for f in range(n_fields):
        coef = rng.normal(0.0, sigma, size=tuple(b.shape[1] for b in bases)).astype(np.float32)
        tmp = np.einsum("abc,za->zbc", coef, bases[0])
        tmp = np.einsum("zbc,yb->zyc", tmp, bases[1])
        out[f] = tmp @ bases[2].T
    return out


def _rotation(angles_rad) -> np.ndarray:
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


# ---------------------------------------------------------------------------- one scan

def _sample_parameters(rng: np.random.Generator, contrast: str | None) -> dict:
    if contrast is None:
        contrast = CONTRASTS[int(rng.integers(len(CONTRASTS)))]
    if contrast not in CONTRASTS:
        raise ValueError(f"unknown contrast {contrast!r}; choose from {CONTRASTS}")
    scale = float(rng.uniform(600, 1000))
    means = [float(rng.uniform(*r) * scale) for r in _TISSUE_MEANS[contrast]]

    names = list(_DIRECTION_P)
    direction_name = names[int(rng.choice(len(names), p=list(_DIRECTION_P.values())))]
    if direction_name == "random":
        perm = rng.permutation(3)
        signs = rng.choice([-1.0, 1.0], size=3)
        direction = np.zeros((3, 3))
        for axis in range(3):  # index axis `axis` runs along physical axis perm[axis]
            direction[perm[axis], axis] = signs[axis]
    else:
        direction = np.array(_DIRECTIONS[direction_name], dtype=float).T  # columns -> matrix

    res_names = list(_RESOLUTION_P)
    resolution = res_names[int(rng.choice(len(res_names), p=list(_RESOLUTION_P.values())))]
    blur_sigma_mm = 0.0
    spacing = [1.0, 1.0, 1.0]
    if resolution == "thick":  # thick slices along the slice (k) axis, each slice integrates its thickness
        inplane = float(np.round(rng.uniform(0.8, 1.2), 2))
        spacing = [inplane, inplane, float(rng.choice([3.0, 4.0, 5.0]))]
    elif resolution == "aniso":
        inplane = float(np.round(rng.uniform(0.85, 1.1), 2))
        spacing = [inplane, inplane, float(rng.choice([1.2, 1.5, 2.0]))]
    elif resolution == "blur":
        blur_sigma_mm = float(rng.uniform(0.6, 1.3))

    angles = np.clip(rng.normal(0, 4.0, 3), -10, 10)
    return {
        "contrast": contrast,
        "intensity_scale": scale,
        "tissue_means": {"csf": means[0], "gm": means[1], "wm": means[2]},
        "direction_name": direction_name,
        "direction": direction.tolist(),
        "resolution": resolution,
        "spacing": spacing,
        "blur_sigma_mm": blur_sigma_mm,
        "fov_margin_mm": rng.uniform(6, 20, size=(2, 3)).tolist(),
        "rotation_deg": angles.tolist(),
        "scale": (float(rng.uniform(0.92, 1.08)) * rng.uniform(0.98, 1.02, 3)).tolist(),
        "translation_mm": rng.uniform(-10, 10, 3).tolist(),
        "deformation_mm": float(rng.uniform(1.5, 4.0)),       # B-spline coefficient sd; field sd ~ half
        "deformation_knots_mm": float(rng.uniform(30, 50)),
        "bias_strength": float(rng.uniform(0.05, 0.35)),      # coefficient sd of the log field
        "bias_knots_mm": float(rng.uniform(60, 100)),
        "noise_sigma": float(rng.uniform(0.008, 0.035) * scale),
    }


def make_normal_scan(rng: np.random.Generator, contrast: str | None = None,
                     _params_out: dict | None = None, _overrides: dict | None = None) -> tuple[sitk.Image, sitk.Image]:
    """One synthetic normal brain: (image float32, tissue labels uint8: 0 background, 1 CSF, 2 GM, 3 WM) on the
    same grid.

    `contrast` is 't1', 't2' or 'flair' (random when None). Intensities are rounded to whole numbers
    (about 0-1000) so that writing them as int16 loses nothing. `_params_out`, when given, receives
    the drawn augmentation parameters (for the cohort's JSON record); `_overrides` replaces some of
    them (tests use it to switch the head-position jitter off).
    """
    tpl = _Template.get()
    p = _sample_parameters(rng, contrast)
    p.update(_overrides or {})

    # --- output grid: an axis-aligned box around the template brain, any signed axis permutation
    direction = np.array(p["direction"])
    spacing = np.array(p["spacing"])
    margin = np.array(p["fov_margin_mm"])
    lo = tpl.box_lo - margin[0]
    hi = tpl.box_hi + margin[1]
    phys_axis = np.argmax(np.abs(direction), axis=0)          # physical axis of each index axis
    sign = direction[phys_axis, np.arange(3)]
    size = [int(np.ceil((hi[a] - lo[a]) / s)) + 1 for a, s in zip(phys_axis, spacing)]
    origin = np.array(lo, dtype=float)
    for axis in range(3):
        if sign[axis] < 0:
            origin[phys_axis[axis]] = hi[phys_axis[axis]]

    # --- source intensity in template space (pre-blurred for resolution loss)
    csf, gm, wm = tpl.probs
    means = p["tissue_means"]
    source = csf * np.float32(means["csf"]) + gm * np.float32(means["gm"]) + wm * np.float32(means["wm"])
    if p["resolution"] == "thick":  # slice profile: a Gaussian of FWHM = slice thickness along the slice axis
        np_axis = 2 - phys_axis[2]
        source = ndi.gaussian_filter1d(source, spacing[2] / 2.355 / tpl.spacing[2 - np_axis], axis=np_axis,
                                       truncate=3.0)
    elif p["blur_sigma_mm"] > 0:
        source = ndi.gaussian_filter(source, p["blur_sigma_mm"] / tpl.spacing[::-1], truncate=3.0)

    # --- output voxel -> template index. p = O + D S idx; q = c + A (p - c) + t + u(idx)
    centre = tpl.centre
    affine = _rotation(np.deg2rad(p["rotation_deg"])) @ np.diag(p["scale"])
    t_inv = np.linalg.inv(tpl.direction @ np.diag(tpl.spacing))
    lin = t_inv @ affine @ direction @ np.diag(spacing)                        # template xyz per output ijk
    off = t_inv @ (affine @ (origin - centre) + centre + np.array(p["translation_mm"]) - tpl.origin)
    shape_zyx = tuple(size[::-1])
    spacing_zyx = spacing[::-1]
    disp = smooth_field(shape_zyx, spacing_zyx, p["deformation_knots_mm"], p["deformation_mm"], rng, 3)
    k = np.arange(shape_zyx[0], dtype=np.float32)[:, None, None]
    j = np.arange(shape_zyx[1], dtype=np.float32)[None, :, None]
    i = np.arange(shape_zyx[2], dtype=np.float32)[None, None, :]
    coords = np.empty((3,) + shape_zyx, np.float32)
    for out_axis, t_axis in enumerate((2, 1, 0)):  # numpy order of the template: z, y, x
        row = lin[t_axis]
        coords[out_axis] = (np.float32(row[0]) * i + np.float32(row[1]) * j) + (np.float32(row[2]) * k
                                                                                 + np.float32(off[t_axis]))
        for c in range(3):  # displacement (physical mm, in LPS) -> template index
            w = np.float32(t_inv[t_axis, c])
            if w != 0:
                coords[out_axis] += w * disp[c]
    del disp
    image = ndi.map_coordinates(source, coords, order=1, output=np.float32, mode="constant", cval=0.0,
                                prefilter=False)
    labels = ndi.map_coordinates(tpl.labels, coords, order=0, output=np.uint8, mode="constant", cval=0)
    del coords, source

    # --- scanner effects: bias field, Rician noise
    bias = smooth_field(shape_zyx, spacing_zyx, p["bias_knots_mm"], p["bias_strength"], rng, 1)[0]
    image *= np.exp(bias)
    del bias
    sigma = np.float32(p["noise_sigma"])
    n1 = rng.standard_normal(shape_zyx, dtype=np.float32)
    n1 *= sigma
    image += n1
    np.square(image, out=image)
    rng.standard_normal(shape_zyx, dtype=np.float32, out=n1)
    n1 *= sigma
    np.square(n1, out=n1)
    image += n1
    del n1
    np.sqrt(image, out=image)
    np.rint(image, out=image)

    out = sitk.GetImageFromArray(image)
    out.SetSpacing([float(s) for s in spacing])
    out.SetOrigin([float(o) for o in origin])
    out.SetDirection([float(v) for v in direction.ravel()])
    lab = sitk.GetImageFromArray(labels)
    lab.CopyInformation(out)
    if _params_out is not None:
        p["size"] = size
        p["origin"] = origin.tolist()
        _params_out.update(p)
    return out, lab
