"""The real-data evaluation set, written as a labelled set folder (manifest.json, images, masks) that
`cradl evaluate` and `cradl benchmark-real` read:

* `normal`: the held-out IXI test subjects (T1 heads with skull), untouched;
* `stroke`: the same subjects with a real stroke lesion shape (SOOP, MNI space) mapped in through the
  subject's affine alignment and painted as a T1-hypointense infarct with soft edges;
* synthetic lesion types (`tumour`, `resection`, ...) inserted into the same real anatomy, one per subject;
* `brats` and `ms`: the real patients with their expert masks, as they are.

Each case names its evaluation brain mask (`brain`): the DLMUSE label mask for IXI subjects, the
data set's own brain mask for BraTS, the scan's foreground for the (skull-stripped) MS patient.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from sklearn.mixture import GaussianMixture

from .. import realdata
from ..io import write_image, write_json
from ..preprocess import DEFAULT_NORMALISATION, brain_only
from ..space import ReferenceSpace, resample
from ..synthetic.lesions import ANOMALY_TYPES, insert_anomaly

MIN_STROKE_ML = 1.0  # smaller acute lesions are below what a 2 mm model can be asked to find
SYNTHETIC_TYPES = tuple(t for t in ANOMALY_TYPES if t != "stroke")  # real stroke shapes stand for strokes
SYNTHETIC_SIZES = (15.0, 25.0, 35.0)


def equivalent_diameter_mm(volume_mm3: float) -> float:
    return float((6.0 * volume_mm3 / np.pi) ** (1.0 / 3.0))


def stroke_library(root=None, min_ml: float = MIN_STROKE_ML) -> list[tuple[Path, float]]:
    """Real stroke shapes of at least `min_ml` millilitres, with their volumes in mm3."""
    shapes = []
    for path in realdata.stroke_shapes(root):
        image = sitk.ReadImage(str(path))
        volume = float((sitk.GetArrayViewFromImage(image) > 0).sum() * np.prod(image.GetSpacing()))
        if volume >= min_ml * 1000:
            shapes.append((path, volume))
    return shapes


def paint_infarct(image: sitk.Image, shape_mni: sitk.Image, to_mni: sitk.Transform, brain: np.ndarray,
                  rng: np.random.Generator) -> tuple[sitk.Image, np.ndarray]:
    """A T1-hypointense infarct of the MNI-space `shape_mni` painted into `image` (never modified).

    `to_mni` maps the scan's points to MNI points. The mask is mapped with linear interpolation and
    smoothed (soft edges); inside it, intensities move towards the brain's darkest tissue (CSF).
    Returns the new image and the lesion mask (weight > 0.5 inside the brain) on the image's grid.
    """
    weight = resample(sitk.Cast(shape_mni > 0, sitk.sitkFloat32), sitk.Cast(image, sitk.sitkFloat32), to_mni)
    sigma_vox = 1.0 / np.array(image.GetSpacing()[::-1])  # 1 mm soft edge
    weight = ndimage.gaussian_filter(sitk.GetArrayFromImage(weight), sigma_vox) * brain
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    csf = float(np.percentile(array[brain], 2))
    strength = float(rng.uniform(0.6, 0.9))
    painted = array - weight * strength * (array - csf)
    out = sitk.GetImageFromArray(painted.astype(np.float32))
    out.CopyInformation(image)
    return out, (weight > 0.5) & brain


def tissue_map(image: sitk.Image, brain: np.ndarray, seed: int = 0) -> sitk.Image:
    """0 background, 1 CSF, 2 GM, 3 WM from a T1's intensities in the brain (3-class Gaussian mixture)."""
    array = sitk.GetArrayViewFromImage(image)
    values = array[brain].reshape(-1, 1).astype(np.float64)
    mixture = GaussianMixture(3, random_state=seed).fit(values[:: max(1, len(values) // 50000)])
    order = np.argsort(mixture.means_.ravel())  # T1: CSF < GM < WM
    classes = np.zeros(array.shape, np.uint8)
    classes[brain] = np.argsort(order)[mixture.predict(values)] + 1
    out = sitk.GetImageFromArray(classes)
    out.CopyInformation(image)
    return out


def write_real_set(out_dir: str | Path, root=None, mask_cache: str | Path | None = None, seed: int = 0,
                   progress: bool = True, split: str = "test") -> Path:
    """Write the real-data evaluation set from the subjects of `split`; returns the manifest path.

    `split="validation"` writes the same kinds of cases from the validation subjects: the set to tune
    localization settings on, so that the held-out test subjects are only ever measured.
    Patients are part of the test set only.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    for sub in ("images", "masks", "brains"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    mask_cache = Path(mask_cache) if mask_cache else out / "brainmasks"
    rng = np.random.default_rng(seed)
    shapes = stroke_library(root)
    order = rng.permutation(len(shapes))
    space = ReferenceSpace.from_mni(96, 2.0)
    cases = []
    subjects = realdata.subjects_in(split, root)
    for k, subject in enumerate(tqdm(subjects, desc="real evaluation set", unit="subject", disable=not progress)):
        image = sitk.ReadImage(str(subject.t1), sitk.sitkFloat32)
        brain = sitk.GetArrayFromImage(sitk.ReadImage(str(subject.labels))) > 0
        brain_image = sitk.GetImageFromArray(brain.astype(np.uint8))
        brain_image.CopyInformation(image)
        write_image(brain_image, out / "brains" / f"{subject.id}.nii.gz")
        common = {"subject": subject.id, "contrast": "t1", "brain": f"brains/{subject.id}.nii.gz"}
        shutil.copyfile(subject.t1, out / "images" / f"{subject.id}_normal.nii.gz")
        cases.append({"id": f"{subject.id}_normal", "type": "normal", "image": f"images/{subject.id}_normal.nii.gz",
                      **common})

        extracted, _ = realdata.cached_brain_mask(subject.t1, mask_cache)
        to_scan = space.align(brain_only(image, extracted, DEFAULT_NORMALISATION, 2.0), seed=seed)
        shape_path, volume = shapes[int(order[k % len(order)])]
        painted, lesion = paint_infarct(image, sitk.ReadImage(str(shape_path)), to_scan.GetInverse(), brain, rng)
        stem = f"{subject.id}_stroke"
        _write_case(out, stem, painted, lesion, image)
        cases.append({"id": stem, "type": "stroke", "image": f"images/{stem}.nii.gz", "mask": f"masks/{stem}.nii.gz",
                      "size_mm": round(equivalent_diameter_mm(lesion.sum() * np.prod(image.GetSpacing())), 1),
                      "shape": shape_path.name, "shape_ml": round(volume / 1000, 2), **common})

        kind = SYNTHETIC_TYPES[k % len(SYNTHETIC_TYPES)]
        size = SYNTHETIC_SIZES[(k // len(SYNTHETIC_TYPES)) % len(SYNTHETIC_SIZES)]
        abnormal, mask = insert_anomaly(image, tissue_map(image, brain, seed), kind, size, rng, contrast="t1")
        stem = f"{subject.id}_{kind}"
        _write_case(out, stem, abnormal, sitk.GetArrayFromImage(mask) > 0, image)
        cases.append({"id": stem, "type": kind, "image": f"images/{stem}.nii.gz", "mask": f"masks/{stem}.nii.gz",
                      "size_mm": size, **common})

    for patient in realdata.patients(root) if split == "test" else []:
        stem = patient.name.replace("/", "_").replace(" ", "_")
        image = sitk.ReadImage(str(patient.image))
        lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(patient.lesion))) > 0
        own_mask = patient.image.parent / "brainmask.nii.gz"
        brain = (sitk.GetArrayFromImage(sitk.ReadImage(str(own_mask))) > 0) if own_mask.is_file() \
            else ndimage.binary_fill_holes(sitk.GetArrayViewFromImage(image) != 0)
        brain_image = sitk.GetImageFromArray(brain.astype(np.uint8))
        brain_image.CopyInformation(image)
        write_image(brain_image, out / "brains" / f"{stem}.nii.gz")
        _write_case(out, stem, image, lesion, image)
        kind = "brats" if patient.name.startswith("brats") else "ms"
        cases.append({"id": stem, "type": kind, "image": f"images/{stem}.nii.gz", "mask": f"masks/{stem}.nii.gz",
                      "size_mm": round(equivalent_diameter_mm(lesion.sum() * np.prod(image.GetSpacing())), 1),
                      "contrast": patient.contrast, "subject": patient.name.split()[0],
                      "brain": f"brains/{stem}.nii.gz"})
    manifest = out / "manifest.json"
    write_json({"description": "real-data evaluation set: held-out IXI test subjects (normal, with real stroke "
                "shapes painted in, with synthetic lesion types), real BraTS and MS patients",
                "seed": seed, "split": realdata.SPLIT_FILE.name, "subjects": split, "cases": cases}, manifest)
    return manifest


def _write_case(out: Path, stem: str, image: sitk.Image, lesion: np.ndarray, geometry: sitk.Image) -> None:
    mask = sitk.GetImageFromArray(lesion.astype(np.uint8))
    mask.CopyInformation(geometry)
    write_image(image, out / "images" / f"{stem}.nii.gz")
    write_image(mask, out / "masks" / f"{stem}.nii.gz")
