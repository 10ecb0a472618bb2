"""The MNI152 2009a template shipped inside the nilearn wheel: T1, grey and white matter, brain mask.

Only the NIfTI files are read (no nilearn import at run time, no download), so detection works without
nilearn; training on the synthetic cohort needs the files to be present.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .pins import NILEARN

# Label values of the tissue maps made from the template's probability maps (synthetic scans, lesion placement).
BACKGROUND, CSF, GM, WM = 0, 1, 2, 3

_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def _data_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise RuntimeError(f"The MNI152 template comes from the nilearn package: pip install {NILEARN}")
    return Path(spec.origin).parent / "datasets" / "data"


@functools.lru_cache(maxsize=None)
def load_mni(kind: str) -> sitk.Image:
    """The 1 mm MNI152 template image `kind` ('t1', 'gm', 'wm') as float32 scaled to [0, 1]."""
    if kind not in _FILES:
        raise ValueError(f"unknown template image {kind!r}; choose from {sorted(_FILES)}")
    image = sitk.Cast(sitk.ReadImage(str(_data_dir() / _FILES[kind])), sitk.sitkFloat32)
    return sitk.RescaleIntensity(image, 0.0, 1.0)


def load_mni_brain_mask() -> sitk.Image:
    """Brain mask of the template (uint8): grey + white matter + CSF inside the skull-stripped T1."""
    t1 = sitk.GetArrayViewFromImage(load_mni("t1"))
    mask = sitk.GetImageFromArray((t1 > 0.02).astype(np.uint8))
    mask.CopyInformation(load_mni("t1"))
    return mask
