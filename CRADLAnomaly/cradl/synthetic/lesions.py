"""Anomalies inserted into a scan with a tissue label map, with exact voxel masks: placement, lesion geometry
and the kinds of lesion (a labelled set folder of such cases is written by `sets.generate_anomaly_set`).

Realistic lesions (their appearance depends on the contrast) and MOOD-style artificial anomalies:

* ``tumour``: irregular core with heterogeneous texture (solid part and, when large enough, a fluid-like
  necrotic centre), surrounding oedema spreading in white matter (sparing CSF, weaker in cortex) and
  mass effect: a radial deformation that pushes surrounding tissue outward (volume-conserving
  near the core, tapered to zero at twice the lesion radius);
* ``stroke``: a wedge (cone with its apex deep, its base on the cortex) in one vascular territory
  (middle, anterior or posterior cerebral artery), restricted to grey matter and juxtacortical white
  matter; T2/FLAIR hyperintense, T1 hypointense;
* ``wm_lesions``: several small (3-10 mm) ovoid periventricular lesions inside white matter; size_mm is
  the diameter of the region holding them; T2/FLAIR hyperintense, T1 hypointense;
* ``resection``: a cavity at the cortex filled with fluid (CSF signal) with a thin gliotic rim;
* ``blob``: a uniform-intensity ellipsoid; ``noise_patch``: a region of noise; ``deformation``: a
  local sink or source (radial warp); ``copy_patch``: a patch copied from elsewhere in the brain.

Tissue intensities are measured on the scan itself (medians of CSF, GM and WM under the label map),
so lesions sit at the right level whatever the scan's scale; a local bias-field estimate and fresh
noise of the scan's own level keep the inserted signal from looking pasted in. Everything happens
in physical space (mm), so anisotropic and oddly oriented grids get correctly shaped lesions.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from ..template import CSF, GM, WM

ANOMALY_TYPES = ("tumour", "stroke", "wm_lesions", "resection", "blob", "noise_patch", "deformation", "copy_patch")

# Deformations: a voxel counts as anomalous where it is displaced by more than half a voxel (of the
# finest spacing). A half-voxel shift moves an edge by half a voxel, which changes the voxel's value
# by about half the edge contrast: the smallest change a reader can see; smaller shifts only
# re-interpolate the noise.
_DISPLACEMENT_THRESHOLD_VOXELS = 0.5
# Soft-edged lesions: a voxel belongs to the mask where the lesion weight exceeds this fraction.
_WEIGHT_THRESHOLD = 0.25


# ---------------------------------------------------------------------------- scan geometry helpers

class _Scan:
    """numpy view of a scan and its labels, with physical-space helpers (arrays indexed k, j, i)."""

    def __init__(self, image: sitk.Image, labels: sitk.Image):
        if image.GetSize() != labels.GetSize():
            raise ValueError("image and labels must share one grid")
        self.image = image
        self.arr = sitk.GetArrayFromImage(image).astype(np.float32)  # a copy: the input stays untouched
        self.lab = sitk.GetArrayFromImage(labels).astype(np.uint8)
        self.brain = self.lab > 0
        if not self.brain.any():
            raise ValueError("the label map holds no brain voxels")
        self.spacing = np.array(image.GetSpacing(), dtype=float)               # i, j, k
        self.spacing_zyx = self.spacing[::-1]
        self.direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
        self.origin = np.array(image.GetOrigin(), dtype=float)
        self.m = self.direction @ np.diag(self.spacing)                        # mm per index step (ijk)
        self.m_inv = np.linalg.inv(self.m)
        self.min_spacing = float(self.spacing.min())
        self._coarse = None

    # -- index <-> physical
    def phys(self, idx_zyx) -> np.ndarray:
        return self.origin + self.m @ np.asarray(idx_zyx, dtype=float)[::-1]

    def crop(self, centre_zyx, half_mm: float):
        """Slices of the box around centre holding a ball of radius half_mm, and the physical offsets
        (3, *box shape) in LPS mm of each box voxel from the centre voxel."""
        half = np.ceil(half_mm / self.spacing_zyx).astype(int) + 1
        lo = np.maximum(np.asarray(centre_zyx) - half, 0)
        hi = np.minimum(np.asarray(centre_zyx) + half + 1, self.arr.shape)
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        rel = [np.arange(a, b, dtype=np.float32) - c for a, b, c in zip(lo, hi, centre_zyx)]
        k, j, i = rel[0][:, None, None], rel[1][None, :, None], rel[2][None, None, :]
        off = np.empty((3,) + tuple(int(b - a) for a, b in zip(lo, hi)), np.float32)
        for c in range(3):
            off[c] = np.float32(self.m[c, 0]) * i + np.float32(self.m[c, 1]) * j + np.float32(self.m[c, 2]) * k
        return sl, off

    def offsets_to_index(self, off: np.ndarray, centre_zyx) -> np.ndarray:
        """Physical offsets (3, ...) from the centre voxel -> continuous array indices (3, ...) (k, j, i)."""
        out = np.empty_like(off)
        for n, a in enumerate((2, 1, 0)):
            row = self.m_inv[a]
            out[n] = centre_zyx[n] + row[0] * off[0] + row[1] * off[1] + row[2] * off[2]
        return out

    # -- coarse maps for placing lesions
    def coarse(self):
        """Brain depth (mm from the brain's outer surface) on a ~3 mm subgrid, with its labels and strides."""
        if self._coarse is None:
            strides = tuple(max(1, int(round(3.0 / s))) for s in self.spacing_zyx)
            sub = tuple(slice(None, None, s) for s in strides)
            brain = self.brain[sub]
            depth = ndi.distance_transform_edt(np.pad(brain, 1), sampling=self.spacing_zyx * strides)[1:-1, 1:-1, 1:-1]
            self._coarse = (depth, self.lab[sub], np.array(strides))
        return self._coarse

    def pick(self, rng: np.random.Generator, candidates: np.ndarray) -> np.ndarray | None:
        """A random full-resolution index (k, j, i) among the True voxels of a coarse candidate map."""
        idx = np.flatnonzero(candidates)
        if idx.size == 0:
            return None
        flat = idx[int(rng.integers(idx.size))]
        return np.array(np.unravel_index(flat, candidates.shape)) * self.coarse()[2]

    def coarse_phys(self) -> np.ndarray:
        """Physical coordinates (3, *coarse shape) of the coarse grid points."""
        depth, _, strides = self.coarse()
        grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(depth.shape, strides)], indexing="ij")
        idx = np.stack([grids[2], grids[1], grids[0]]).reshape(3, -1).astype(float)  # i, j, k
        return (self.origin[:, None] + self.m @ idx).reshape((3,) + depth.shape)

    # -- intensities
    def tissue_medians(self) -> dict:
        sub = (slice(None, None, 2),) * 3
        arr, lab = self.arr[sub], self.lab[sub]
        out = {}
        for name, value in (("csf", CSF), ("gm", GM), ("wm", WM)):
            vals = arr[lab == value]
            out[name] = float(np.median(vals)) if vals.size else float(np.median(self.arr[self.brain]))
        return out

    def noise_sigma(self) -> float:
        """Noise level from differences of neighbouring white-matter voxels (robust: median absolute)."""
        a, lab = self.arr, self.lab
        both = (lab[:, :, 1:] == WM) & (lab[:, :, :-1] == WM)
        diff = (a[:, :, 1:] - a[:, :, :-1])[both]
        if diff.size < 100:
            return 0.0
        return float(np.median(np.abs(diff - np.median(diff))) / 0.6745 / np.sqrt(2))


def infer_contrast(medians: dict) -> str:
    """'t1' (WM > GM > CSF), 't2' (CSF brightest) or 'flair' (GM > WM, CSF dark) from tissue medians."""
    if medians["csf"] > medians["gm"]:
        return "t2"
    if medians["wm"] > medians["gm"]:
        return "t1"
    return "flair"


def _targets(contrast: str, m: dict) -> dict:
    """Lesion intensities for each contrast, from the scan's own tissue medians."""
    csf, gm, wm = m["csf"], m["gm"], m["wm"]

    def lerp(a, b, t):
        return a + (b - a) * t

    if contrast == "t1":
        return {"fluid": csf, "oedema": lerp(gm, csf, 0.3), "solid": lerp(gm, csf, 0.15),
                "necrosis": lerp(csf, gm, 0.25), "wml": lerp(wm, csf, 0.55), "gliosis": lerp(gm, csf, 0.2),
                "stroke": lerp(gm, csf, 0.4)}
    if contrast == "t2":
        return {"fluid": csf, "oedema": lerp(gm, csf, 0.6), "solid": lerp(gm, csf, 0.35),
                "necrosis": lerp(csf, gm, 0.1), "wml": lerp(gm, csf, 0.6), "gliosis": lerp(gm, csf, 0.45),
                "stroke": lerp(gm, csf, 0.55)}
    if contrast == "flair":
        return {"fluid": csf, "oedema": gm * 1.35, "solid": gm * 1.2, "necrosis": lerp(csf, gm, 0.35),
                "wml": gm * 1.4, "gliosis": gm * 1.3, "stroke": gm * 1.35}
    raise ValueError(f"unknown contrast {contrast!r}; choose from ('t1', 't2', 'flair')")


def _field(shape, spacing_zyx, sigma_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth random field of unit standard deviation (Gaussian-filtered white noise)."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    f = ndi.gaussian_filter(noise, np.maximum(sigma_mm / np.asarray(spacing_zyx), 0.3), mode="reflect")
    sd = float(f.std())
    return f / sd if sd > 0 else f


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def _ellipsoid_norm(off: np.ndarray, axes, rotation: np.ndarray) -> np.ndarray:
    """Normalised ellipsoid radius (1 on the surface) of physical offsets (3, ...)."""
    local = np.tensordot(rotation.T, off, axes=1)
    return np.sqrt(sum((local[a] / np.float32(axes[a])) ** 2 for a in range(3)))


class _Inserter:
    """One insertion: the scan copy, its measured tissue levels, and the place where changes go."""

    def __init__(self, scan: _Scan, contrast: str | None, rng: np.random.Generator):
        self.s = scan
        self.rng = rng
        self.medians = scan.tissue_medians()
        self.contrast = contrast or infer_contrast(self.medians)
        self.t = _targets(self.contrast, self.medians)
        self.sigma = scan.noise_sigma()
        self.mask = np.zeros(scan.arr.shape, np.uint8)

    # -- placement
    def centre(self, depth_min: float = 0.0, depth_max: float = np.inf, tissues=(GM, WM), extra=None):
        depth, lab, _ = self.s.coarse()
        base = np.isin(lab, tissues) & (depth > 0)
        cand = base & (depth >= depth_min) & (depth <= depth_max)
        if extra is not None:
            cand &= extra
        c = self.s.pick(self.rng, cand)
        if c is None and extra is not None:
            c = self.s.pick(self.rng, base & (depth >= depth_min) & (depth <= depth_max))
        if c is None:  # nothing deep enough: the deepest tissue voxels
            c = self.s.pick(self.rng, base & (depth >= 0.8 * depth[base].max()))
        return c

    # -- intensity helpers on a crop
    def under(self, lab: np.ndarray) -> np.ndarray:
        """Expected intensity of each voxel's tissue (0 outside the brain)."""
        lut = np.array([0.0, self.medians["csf"], self.medians["gm"], self.medians["wm"]], np.float32)
        return lut[np.minimum(lab, 3)]

    def local_bias(self, arr: np.ndarray, lab: np.ndarray) -> np.ndarray:
        """Smooth multiplicative bias estimate: smoothed image over smoothed expected image (brain only)."""
        brain = (lab > 0).astype(np.float32)
        sig = np.maximum(8.0 / self.s.spacing_zyx, 0.5)
        num = ndi.gaussian_filter(arr * brain, sig, mode="nearest")
        den = ndi.gaussian_filter(self.under(lab) * brain, sig, mode="nearest")
        bias = np.where(den > 1e-3 * max(self.medians.values()), num / np.maximum(den, 1e-6), 1.0)
        return np.clip(bias, 0.5, 2.0).astype(np.float32)

    def noise(self, shape) -> np.ndarray:
        return self.rng.standard_normal(shape, dtype=np.float32) * np.float32(self.sigma)


# ---------------------------------------------------------------------------- anomaly kinds

def _radial_warp(ins: _Inserter, sl, off, centre, r, s_of_r, region) -> np.ndarray:
    """Resample the crop so that the voxel at radius r shows the content from radius s(r) (same direction),
    inside `region` (brain voxels). Labels follow. Returns the displacement magnitude (mm)."""
    s = s_of_r(r)
    disp = np.where(region, np.abs(r - s), 0.0).astype(np.float32)
    moved = disp > 1e-3 * ins.s.min_spacing
    if not moved.any():
        return disp
    scale = np.where(r > 0, s / np.maximum(r, 1e-6), 0.0).astype(np.float32)
    src_off = off[:, moved] * scale[moved]
    lo = np.array([a.start for a in sl])
    coords = ins.s.offsets_to_index(src_off, np.asarray(centre, dtype=np.float32))
    coords -= lo[:, None].astype(np.float32)
    crop = ins.s.arr[sl]
    lab = ins.s.lab[sl]
    crop_vals = ndi.map_coordinates(crop, coords, order=1, mode="nearest")
    lab_vals = ndi.map_coordinates(lab, coords, order=0, mode="nearest")
    crop[moved] = crop_vals
    lab[moved] = lab_vals
    return disp


def _tumour(ins: _Inserter, size_mm: float):
    s, rng = ins.s, ins.rng
    R = size_mm / 2
    depth, clab, _ = s.coarse()
    prefer_wm = rng.random() < 0.75
    centre = ins.centre(depth_min=max(0.6 * R, 3.0), tissues=(WM,) if prefer_wm else (GM, WM))
    r_support = 2.0 * R
    sl, off = s.crop(centre, r_support + 2 * s.spacing.max())
    r = np.sqrt((off ** 2).sum(0))
    brain0 = s.brain[sl].copy()

    rc = R * rng.uniform(0.45, 0.65)
    core_shape = r / (rc * np.clip(1 + 0.2 * _field(r.shape, s.spacing_zyx, max(0.35 * rc, 1.0), rng), 0.6, 1.3))
    # mass effect: the core's volume pushes tissue outward, s(r) = (r^3 - rm^3)^(1/3), tapered beyond R
    rm = rc * rng.uniform(0.45, 0.7)

    def s_of_r(rr):
        inner = np.cbrt(np.maximum(rr ** 3 - rm ** 3, 0.0))
        u = rr - inner
        t = np.clip((r_support - rr) / (r_support - R), 0.0, 1.0)
        taper = np.where(rr <= R, 1.0, np.sin(0.5 * np.pi * t) ** 2)
        return rr - u * taper

    disp = _radial_warp(ins, sl, off, centre, r, s_of_r, brain0)

    arr, lab = s.arr[sl], s.lab[sl]
    bias = ins.local_bias(arr, lab)
    core = (core_shape < 1) & (r <= R) & brain0
    # oedema: irregular shell out to R, strongest near the core, spreading in WM, weaker in GM, none in CSF
    r_oed = R * np.clip(1 + 0.15 * _field(r.shape, s.spacing_zyx, max(0.3 * R, 1.5), rng), 0.75, 1.0)
    w = np.clip((r_oed - r) / np.maximum(0.4 * (r_oed - rc), s.min_spacing), 0, 1)
    tissue_w = np.select([lab == WM, lab == GM], [1.0, 0.35], 0.0).astype(np.float32)
    w_oed = (w * tissue_w * ~core).astype(np.float32)
    under = ins.under(lab)
    tex = 1 + 0.06 * _field(r.shape, s.spacing_zyx, 2.0, rng)
    arr += w_oed * (ins.t["oedema"] * tex - under) * bias
    # core: heterogeneous solid tumour, fluid-like necrosis in the centre of larger ones
    solid = ins.t["solid"] * (1 + 0.15 * _field(r.shape, s.spacing_zyx, 1.5, rng))
    value = solid
    if rc > 4.0:
        rn = rc * rng.uniform(0.3, 0.6)
        necro_w = np.clip((rn * (1 + 0.2 * _field(r.shape, s.spacing_zyx, 2.0, rng)) - r) / 1.5, 0, 1)
        value = solid * (1 - necro_w) + ins.t["necrosis"] * necro_w
    # soft edge (about one voxel wide) so the core does not look pasted in
    wc = np.clip((1 - core_shape) * rc / max(s.min_spacing, 0.7) + 0.5, 0, 1) * (r <= R) * brain0
    arr[:] = arr * (1 - wc) + (value * bias + ins.noise(r.shape)) * wc
    m = core | (w_oed > _WEIGHT_THRESHOLD) | (disp > _DISPLACEMENT_THRESHOLD_VOXELS * s.min_spacing)
    ins.mask[sl] = m & brain0
    return {"centre_index": centre.tolist()}


def _stroke(ins: _Inserter, size_mm: float):
    s, rng = ins.s, ins.rng
    R = size_mm / 2
    depth, clab, _ = s.coarse()
    pts = s.coarse_phys()
    brain_pts = pts[:, depth > 0]
    lo, hi = brain_pts.min(axis=1), brain_pts.max(axis=1)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    d = (pts - mid[:, None, None, None]) / half[:, None, None, None]     # LPS, -1..1 across the brain
    territory = str(rng.choice(["MCA", "ACA", "PCA"], p=[0.6, 0.2, 0.2]))
    if territory == "MCA":    # lateral convexity
        where = (np.abs(d[0]) > 0.45) & (d[2] > -0.3) & (d[1] > -0.6) & (d[1] < 0.45)
    elif territory == "ACA":  # medial frontal and parietal, high
        where = (np.abs(d[0]) < 0.25) & (d[1] < 0.3) & (d[2] > 0.1)
    else:                     # occipital and inferior temporal, posterior
        where = (d[1] > 0.45) & (d[2] > -0.2) & (d[2] < 0.55)     # above the cerebellum
    centre = ins.centre(depth_max=6.0, tissues=(GM,), extra=where)
    sl, off = s.crop(centre, R + 2 * s.spacing.max() + 4)
    arr, lab = s.arr[sl], s.lab[sl]
    r = np.sqrt((off ** 2).sum(0))
    # inward axis: towards the white matter under this piece of cortex
    near_wm = (lab == WM) & (r < max(R, 8.0) + 4)
    inward = off[:, near_wm].mean(axis=1) if near_wm.any() else -(s.phys(centre) - mid)
    inward = inward / max(np.linalg.norm(inward), 1e-6)
    apex = inward * (1.1 * R + 1.0)                                   # deep apex, base at the cortex
    to_pt = off - apex[:, None, None, None]
    cos = -(to_pt * inward[:, None, None, None]).sum(0) / np.maximum(np.sqrt((to_pt ** 2).sum(0)), 1e-6)
    theta = np.deg2rad(rng.uniform(30, 45)) * np.clip(1 + 0.2 * _field(r.shape, s.spacing_zyx, 3.0, rng), 0.6, 1.4)
    ball = r < R * np.clip(1 + 0.12 * _field(r.shape, s.spacing_zyx, max(0.3 * R, 1.5), rng), 0.75, 1.0)
    wedge = ball & (cos > np.cos(theta))
    # one hemisphere: a vascular territory does not cross the midline
    side = np.sign(s.phys(centre)[0] - mid[0]) or 1.0
    wedge &= (side * (off[0] + (s.phys(centre)[0] - mid[0])) > 0)
    # grey matter, and white matter within 3 mm of it (juxtacortical)
    dist_gm = ndi.distance_transform_edt(lab != GM, sampling=s.spacing_zyx)
    tissue = np.select([lab == GM, (lab == WM) & (dist_gm <= 3.0)], [1.0, 0.8], 0.0).astype(np.float32)
    w = np.clip(1.4 * ndi.gaussian_filter(wedge.astype(np.float32), np.maximum(0.6 / s.spacing_zyx, 0.3)), 0, 1)
    w *= tissue
    w[r <= s.min_spacing] = np.maximum(w[r <= s.min_spacing], 1.0 * (lab[r <= s.min_spacing] == GM))
    bias = ins.local_bias(arr, lab)
    tex = 1 + 0.05 * _field(r.shape, s.spacing_zyx, 2.0, rng)
    arr += w * (ins.t["stroke"] * tex - ins.under(lab)) * bias
    ins.mask[sl] = (w > _WEIGHT_THRESHOLD) & (lab > 0)
    return {"centre_index": centre.tolist(), "territory": territory}


def _wm_lesions(ins: _Inserter, size_mm: float):
    s, rng = ins.s, ins.rng
    R = size_mm / 2
    depth, clab, strides = s.coarse()
    coarse_sp = s.spacing_zyx * strides
    ventricles = (clab == CSF) & (depth >= 15.0)
    dist_v = (ndi.distance_transform_edt(~ventricles, sampling=coarse_sp) if ventricles.any()
              else np.full(depth.shape, np.inf))
    periventricular = (clab == WM) & (dist_v <= 12.0)
    centre = ins.centre(depth_min=8.0, tissues=(WM,), extra=periventricular)
    n_lesions = int(np.clip(1 + size_mm // 8, 1, 8))
    sl, off = s.crop(centre, R + 2 * s.spacing.max())
    arr, lab = s.arr[sl], s.lab[sl]
    r = np.sqrt((off ** 2).sum(0))
    lo = np.array([a.start for a in sl])
    cand = (lab == WM)
    w = np.zeros(r.shape, np.float32)
    irregular = 0.1 * _field(r.shape, s.spacing_zyx, 1.5, rng)
    for n in range(n_lesions):
        dl = rng.uniform(3.0, min(10.0, max(size_mm, 3.0)))
        if n == 0:
            cl = np.asarray(centre) - lo
        else:
            room = cand & (r <= max(R - dl / 2, 0.0))
            idx = np.flatnonzero(room)
            if idx.size == 0:
                continue
            cl = np.array(np.unravel_index(idx[int(rng.integers(idx.size))], r.shape))
        c_off = off[(slice(None),) + tuple(int(v) for v in cl)]
        axes = dl / 2 * np.array([1.0, rng.uniform(0.55, 1.0), rng.uniform(0.5, 1.0)])
        nrm = _ellipsoid_norm(off - c_off[:, None, None, None], axes, _random_rotation(rng)) + irregular
        w = np.maximum(w, np.clip((1.05 - nrm) / 0.15, 0, 1))
    w *= (lab == WM) & (r <= R)
    bias = ins.local_bias(arr, lab)
    tex = 1 + 0.08 * _field(r.shape, s.spacing_zyx, 1.0, rng)
    arr += w * (ins.t["wml"] * tex - ins.under(lab)) * bias
    ins.mask[sl] = w > _WEIGHT_THRESHOLD
    return {"centre_index": centre.tolist(), "n_lesions": n_lesions}


def _resection(ins: _Inserter, size_mm: float):
    s, rng = ins.s, ins.rng
    R = size_mm / 2
    centre = ins.centre(depth_min=0.3 * R, depth_max=max(0.8 * R, 4.0))
    rim = rng.uniform(1.5, 3.0)
    sl, off = s.crop(centre, R + 2 * s.spacing.max())
    arr, lab = s.arr[sl], s.lab[sl]
    r = np.sqrt((off ** 2).sum(0))
    brain = lab > 0
    r_cav = (R - rim) * np.clip(1 + 0.15 * _field(r.shape, s.spacing_zyx, max(0.3 * R, 1.5), rng), 0.7, 1.15)
    r_cav = np.maximum(np.minimum(r_cav, R - rim), 0.6 * R)
    cavity = np.clip((r_cav - r) / max(s.min_spacing, 0.5) + 0.5, 0, 1) * brain
    gliosis = np.clip((r_cav + rim - r) / max(s.min_spacing, 0.5) + 0.5, 0, 1) * brain * (1 - cavity)
    gliosis *= (r <= R)
    bias = ins.local_bias(arr, lab)
    arr += gliosis * (ins.t["gliosis"] - ins.under(lab)) * bias
    fluid = ins.t["fluid"] * bias + ins.noise(r.shape)
    arr[:] = arr * (1 - cavity) + fluid * cavity
    ins.mask[sl] = ((cavity > _WEIGHT_THRESHOLD) | (gliosis > _WEIGHT_THRESHOLD)) & brain
    return {"centre_index": centre.tolist(), "rim_mm": rim}


def _ellipsoid_region(ins: _Inserter, size_mm: float, depth_frac: float = 0.6):
    s, rng = ins.s, ins.rng
    R = size_mm / 2
    centre = ins.centre(depth_min=depth_frac * R, tissues=(CSF, GM, WM))
    sl, off = s.crop(centre, R + 2 * s.spacing.max())
    axes = R * np.array([1.0, rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0)])
    region = (_ellipsoid_norm(off, axes, _random_rotation(rng)) <= 1.0) & s.brain[sl]
    region[tuple(np.asarray(centre) - [a.start for a in sl])] = True
    return centre, sl, off, region


def _blob(ins: _Inserter, size_mm: float):
    centre, sl, off, region = _ellipsoid_region(ins, size_mm)
    arr = ins.s.arr[sl]
    top = float(np.percentile(ins.s.arr[ins.s.brain][::7], 99))
    local = float(np.median(arr[region]))
    for _ in range(20):  # a level clearly different from what it covers
        value = ins.rng.uniform(0.05, 1.2) * top
        if abs(value - local) > 0.25 * top:
            break
    arr[region] = value
    ins.mask[sl] = region
    return {"centre_index": centre.tolist(), "value": float(value)}


def _noise_patch(ins: _Inserter, size_mm: float):
    centre, sl, off, region = _ellipsoid_region(ins, size_mm)
    arr = ins.s.arr[sl]
    top = float(np.percentile(ins.s.arr[ins.s.brain][::7], 99))
    alpha = ins.rng.uniform(0.6, 1.0)
    noise = ins.rng.uniform(0.0, top, size=arr.shape).astype(np.float32)
    arr[region] = ((1 - alpha) * arr + alpha * noise)[region]
    ins.mask[sl] = region
    return {"centre_index": centre.tolist(), "alpha": float(alpha)}


def _deformation(ins: _Inserter, size_mm: float):
    s, rng = ins.s, ins.rng
    R = size_mm / 2
    centre = ins.centre(depth_min=0.4 * R, tissues=(CSF, GM, WM))
    sl, off = s.crop(centre, R + 2 * s.spacing.max())
    r = np.sqrt((off ** 2).sum(0))
    gamma = rng.uniform(2.2, 3.2)
    kind = "source" if rng.random() < 0.5 else "sink"
    # source: content near the centre is blown up (sample from closer in); sink: pulled in.
    power = gamma if kind == "source" else 1.0 / gamma

    def s_of_r(rr):
        return np.where(rr < R, R * (np.minimum(rr, R) / R) ** power, rr)

    brain0 = s.brain[sl].copy()
    disp = _radial_warp(ins, sl, off, centre, r, s_of_r, brain0 & (r < R))
    # the few voxels at the very centre of a source barely move but are magnified: holes are filled
    moved = ndi.binary_fill_holes(disp > _DISPLACEMENT_THRESHOLD_VOXELS * s.min_spacing)
    ins.mask[sl] = moved & brain0
    return {"centre_index": centre.tolist(), "kind": kind, "power": float(power),
            "max_displacement_mm": float(disp.max())}


def _copy_patch(ins: _Inserter, size_mm: float):
    s, rng = ins.s, ins.rng
    centre, sl, off, region = _ellipsoid_region(ins, size_mm, depth_frac=0.5)
    depth, clab, _ = s.coarse()
    pts = s.coarse_phys()
    dist = np.sqrt(((pts - s.phys(centre)[:, None, None, None]) ** 2).sum(0))
    far = dist >= max(size_mm, 25.0)
    src = ins.centre(depth_min=0.5 * size_mm / 2, tissues=(CSF, GM, WM), extra=far)
    shift = np.asarray(src) - np.asarray(centre)
    lo = np.array([a.start for a in sl])
    grids = np.meshgrid(*[np.arange(a.start, a.stop) for a in sl], indexing="ij")
    flip_axis = int(rng.integers(-1, 3))     # -1: no flip
    src_idx = []
    for a in range(3):
        g = grids[a] - lo[a]
        if a == flip_axis:
            g = (sl[a].stop - sl[a].start - 1) - g
        src_idx.append(np.clip(g + lo[a] + shift[a], 0, s.arr.shape[a] - 1))
    patch = s.arr[tuple(src_idx)]
    arr = s.arr[sl]
    arr[region] = patch[region]
    ins.mask[sl] = region
    return {"centre_index": centre.tolist(), "source_index": np.asarray(src).tolist(), "flip_axis": flip_axis}


_KINDS = {"tumour": _tumour, "stroke": _stroke, "wm_lesions": _wm_lesions, "resection": _resection,
          "blob": _blob, "noise_patch": _noise_patch, "deformation": _deformation, "copy_patch": _copy_patch}


def insert_anomaly(image: sitk.Image, labels: sitk.Image, kind: str, size_mm: float, rng: np.random.Generator,
                   contrast: str | None = None, info: dict | None = None) -> tuple[sitk.Image, sitk.Image]:
    """Returns (abnormal image, uint8 voxel mask of the anomaly) on the input grid. Never modifies the input.

    `labels` is the tissue map (0 background, 1 CSF, 2 GM, 3 WM) on the image's grid; `size_mm` the
    anomaly's diameter (for wm_lesions: of the region holding the lesions); `contrast` 't1', 't2',
    'flair' or None (inferred from the tissue levels). `info`, when given, receives details of the
    insertion (centre, type-specific parameters).
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown anomaly type {kind!r}; choose from {ANOMALY_TYPES}")
    if not size_mm > 0:
        raise ValueError("size_mm must be positive")
    for _ in range(10):  # an insertion can come out empty (nothing changed): try fresh random choices
        ins = _Inserter(_Scan(image, labels), contrast, rng)
        details = _KINDS[kind](ins, float(size_mm))
        if ins.mask.any():
            break
    ins.s.arr = np.maximum(ins.s.arr, 0.0)
    out = sitk.GetImageFromArray(ins.s.arr)
    out.CopyInformation(image)
    mask = sitk.GetImageFromArray(ins.mask)
    mask.CopyInformation(image)
    if info is not None:
        info.update(details)
        info["contrast"] = ins.contrast
    return out, mask
