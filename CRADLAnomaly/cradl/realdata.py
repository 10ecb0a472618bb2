"""The real data on these machines (`../shared/data`, see its README): healthy IXI heads, real patients,
real stroke lesion shapes; the one recorded split of the IXI subjects; cached brain masks.

The split is by subject ID, seeded, and written once to `ixi_split.json` beside this file: training
(encoder and mixture), validation (mixture size, per-position slice statistics), calibration (volume
percentiles, heatmap scale and threshold) and a held-out test set that nothing is trained or
calibrated on.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

SPLIT_FILE = Path(__file__).with_name("ixi_split.json")
SPLIT_SIZES = {"test": 36, "calibration": 22, "validation": 16}  # the rest trains
SPLIT_SEED = 9


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The shared real-data folder: `root`, $CRADL_REAL_DATA, or `shared/data` beside the checkout."""
    if root is not None:
        return Path(root)
    if os.environ.get("CRADL_REAL_DATA"):
        return Path(os.environ["CRADL_REAL_DATA"])
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def available(root: str | os.PathLike | None = None) -> bool:
    return (data_root(root) / "ixi" / "T1").is_dir()


@dataclass(frozen=True)
class Subject:
    id: str  # IXI###-HH-####
    t1: Path
    labels: Path  # DLMUSE parcellation; > 0 is the brain


def ixi_subjects(root=None) -> list[Subject]:
    folder = data_root(root) / "ixi"
    if not (folder / "T1").is_dir():
        raise InputError(f"real data not found: {folder / 'T1'} (set CRADL_REAL_DATA to the shared data folder)")
    subjects = []
    for t1 in sorted((folder / "T1").glob("*_T1.nii.gz")):
        sid = t1.name[: -len("_T1.nii.gz")]
        subjects.append(Subject(sid, t1, folder / "labels" / f"{sid}_DLMUSE.nii.gz"))
    return subjects


def make_split(ids: list[str], seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """Disjoint subject groups, seeded; every ID in exactly one group."""
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    split, start = {}, 0
    for group, n in SPLIT_SIZES.items():
        split[group] = sorted(order[start:start + n])
        start += n
    split["train"] = sorted(order[start:])
    return split


def recorded_split() -> dict[str, list[str]]:
    """The split every model and benchmark of this project uses (ixi_split.json)."""
    return json.loads(SPLIT_FILE.read_text())["groups"]


def subjects_in(group: str, root=None) -> list[Subject]:
    wanted = set(recorded_split()[group])
    return [s for s in ixi_subjects(root) if s.id in wanted]


@dataclass(frozen=True)
class Patient:
    name: str  # e.g. brats2013/pat0001 flair
    image: Path
    lesion: Path  # expert mask; > 0 is lesion
    contrast: str


def patients(root=None) -> list[Patient]:
    lesions = data_root(root) / "lesions"
    found = []
    for folder in sorted((lesions / "brats2013").glob("pat*")):
        for contrast, file in (("flair", "flair.nii.gz"), ("t1c", "t1c.nii.gz")):
            found.append(Patient(f"brats2013/{folder.name} {contrast}", folder / file,
                                 folder / "tumour_labels.nii.gz", contrast))
    for folder in sorted((lesions / "ms").glob("patient*")):
        for contrast in ("flair", "t1", "t2"):
            found.append(Patient(f"ms/{folder.name} {contrast}", folder / f"{contrast}.nii.gz",
                                 folder / "lesion.nii.gz", contrast))
    return [p for p in found if p.image.is_file()]


def stroke_shapes(root=None) -> list[Path]:
    return sorted((data_root(root) / "stroke_shapes").glob("*_lesion.nii.gz"))


def mask_cache_path(image_path: Path, cache_dir: Path) -> Path:
    """Where the brain mask of `image_path` is cached: named after the scan (and its folder, for patients)."""
    image_path = Path(image_path)
    stem = image_path.name.split(".")[0] if image_path.parent.name == "T1" else \
        "_".join(image_path.parts[-2:]).split(".")[0]
    return Path(cache_dir) / f"{stem}_brainmask.nii.gz"


def cached_brain_mask(image_path: Path, cache_dir: Path) -> tuple[sitk.Image, dict]:
    """The brain mask of a scan, computed once (brain extraction) and kept in `cache_dir`."""
    from .brain import extract_brain
    from .io import read_image, write_image, write_json

    mask_path = mask_cache_path(image_path, cache_dir)
    info_path = mask_path.with_name(mask_path.name.replace(".nii.gz", ".json"))
    if mask_path.is_file() and info_path.is_file():
        return sitk.ReadImage(str(mask_path)), json.loads(info_path.read_text())
    cache_dir.mkdir(parents=True, exist_ok=True)
    image = read_image(image_path)
    started = time.perf_counter()
    mask, method = extract_brain(image)
    info = {"method": method, "seconds": round(time.perf_counter() - started, 2)}
    write_image(mask, mask_path)
    write_json(info, info_path)
    return mask, info


if __name__ == "__main__":  # write the split once: python -m cradl.realdata
    ids = [s.id for s in ixi_subjects()]
    SPLIT_FILE.write_text(json.dumps({"seed": SPLIT_SEED, "sizes": SPLIT_SIZES, "n_subjects": len(ids),
                                      "groups": make_split(ids)}, indent=1) + "\n")
    print(f"wrote {SPLIT_FILE}")
