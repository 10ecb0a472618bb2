"""Labelled synthetic set folders on disk, written atomically and reproducibly from a seed.

* `generate_normal_cohort`: NORMAL scans (`scans.make_normal_scan`) with their tissue label maps and
  cohort.json (seed, per-scan contrast, grid and augmentation parameters): training data for a model.
* `generate_anomaly_set`: ABNORMAL cases (`lesions.insert_anomaly`) inserted into the scans of such a
  cohort, plus untouched normal cases, with voxel masks and manifest.json: what `cradl evaluate` and the
  benchmark read.

The same seed gives the same files: every normal scan and every case draws from its own generator, seeded
by the set's seed and its index.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..atomic import atomic_path
from ..io import scan_stem, write_image, write_json
from .lesions import ANOMALY_TYPES, insert_anomaly
from .scans import CONTRASTS, make_normal_scan


def write_image_atomic(image: sitk.Image, path: str | os.PathLike) -> None:
    """Write `image` to `path` through a temporary file in the same folder, renamed when complete.

    Whole-number float images within the int16 range are stored as int16 (4x faster to compress).
    """
    if image.GetPixelID() == sitk.sitkFloat32:
        arr = sitk.GetArrayViewFromImage(image)
        if arr.size and np.all(np.abs(arr) < 32767) and np.array_equal(arr, np.rint(arr)):
            image = sitk.Cast(image, sitk.sitkInt16)
    write_image(image, path)


def scan_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of scan `index` in a cohort: independent of the other scans, so runs can be resumed."""
    return np.random.default_rng([int(seed), int(index)])


def generate_normal_cohort(out_dir, n: int, seed: int, progress: bool = True) -> list[Path]:
    """Writes out_dir/normal_000.nii.gz ... and out_dir/labels/normal_000_labels.nii.gz, plus out_dir/cohort.json
    (seed, n, per-scan contrast, resolution, augmentation parameters). Returns the image paths."""
    out_dir = Path(out_dir)
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(n - 1)))
    # contrasts balanced across the cohort, cycling in a seeded order (scan i's contrast does not depend on n)
    cycle = [CONTRASTS[k] for k in np.random.default_rng([int(seed), 2**31]).permutation(len(CONTRASTS))]
    contrasts = [cycle[i % len(cycle)] for i in range(n)]
    records, paths = [], []
    iterator = range(n)
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc="synthetic normals", unit="scan")
    for idx in iterator:
        name = f"normal_{idx:0{width}d}"
        params: dict = {}
        image, labels = make_normal_scan(scan_rng(seed, idx), contrasts[idx], _params_out=params)
        path = out_dir / f"{name}.nii.gz"
        label_path = out_dir / "labels" / f"{name}_labels.nii.gz"
        write_image_atomic(labels, label_path)
        write_image_atomic(image, path)
        records.append({"image": path.name, "labels": f"labels/{label_path.name}", "contrast": params["contrast"],
                        "spacing": params["spacing"], "size": params["size"],
                        "orientation": sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
                            image.GetDirection()),
                        "resolution": params["resolution"], "augmentation": params})
        paths.append(path)
        del image, labels
    write_json({"generator": "cradl.synthetic.scans", "template": "MNI152 2009a (nilearn)",
                "seed": int(seed), "n": int(n), "scans": records}, out_dir / "cohort.json")
    return paths


def _normal_scans(normal_dir: Path) -> list[dict]:
    """The scans of a normal cohort folder: as its cohort.json lists them, else every NAME.nii.gz in it with
    labels/NAME_labels.nii.gz (contrast unknown)."""
    cohort = normal_dir / "cohort.json"
    if cohort.exists():
        data = json.loads(cohort.read_text())
        return [{"image": normal_dir / rec["image"], "labels": normal_dir / rec["labels"],
                 "contrast": rec.get("contrast")} for rec in data["scans"]]
    scans = []
    for path in sorted(normal_dir.glob("*.nii.gz")):
        labels = normal_dir / "labels" / f"{scan_stem(path)}_labels.nii.gz"
        scans.append({"image": path, "labels": labels, "contrast": None})
    return scans


def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def generate_anomaly_set(normal_dir, out_dir, seed: int, sizes_mm=(5, 10, 20, 35, 50), types=ANOMALY_TYPES,
                         n_per_combo: int = 1, n_normals: int = 10, progress: bool = True) -> Path:
    """Inserts anomalies into the scans of normal_dir (a folder written by generate_normal_cohort, using its labels/
    subfolder), writes out_dir/case_000.nii.gz + out_dir/masks/case_000_mask.nii.gz and out_dir/manifest.json
    listing every case {image, mask (null for normals), type ('normal' for clean scans), size_mm, contrast,
    source}. Normal (unmodified) scans are included as their own cases. Returns the manifest path."""
    normal_dir, out_dir = Path(normal_dir), Path(out_dir)
    scans = _normal_scans(normal_dir)
    if not scans:
        raise ValueError(f"no normal scans found in {normal_dir}")
    for t in types:
        if t not in ANOMALY_TYPES:
            raise ValueError(f"unknown anomaly type {t!r}; choose from {ANOMALY_TYPES}")
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng([int(seed), 2**31]).permutation(len(scans))
    plan = [("normal", None) for _ in range(min(int(n_normals), len(scans)))]
    plan += [(t, float(size)) for t in types for size in sizes_mm for _ in range(int(n_per_combo))]
    width = max(3, len(str(len(plan) - 1)))
    cases: list[dict | None] = [None] * len(plan)
    by_host: dict[int, list[int]] = {}
    for case, (kind, _) in enumerate(plan):
        host = int(order[case % len(scans)]) if kind != "normal" else int(order[case])
        by_host.setdefault(host, []).append(case)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(plan), desc="anomaly cases", unit="case")
    for host, case_ids in sorted(by_host.items()):
        scan = scans[host]
        image = labels = None
        for case in case_ids:
            kind, size = plan[case]
            name = f"case_{case:0{width}d}"
            entry = {"id": name, "image": f"{name}.nii.gz", "mask": None, "type": kind, "size_mm": size,
                     "contrast": scan["contrast"], "source": str(scan["image"])}
            if kind == "normal":
                _copy_atomic(scan["image"], out_dir / entry["image"])
            else:
                if image is None:
                    image = sitk.ReadImage(str(scan["image"]))
                    labels = sitk.ReadImage(str(scan["labels"]), sitk.sitkUInt8)
                info: dict = {}
                abnormal, mask = insert_anomaly(sitk.Cast(image, sitk.sitkFloat32), labels, kind, size,
                                                np.random.default_rng([int(seed), case]), scan["contrast"], info)
                if image.GetPixelID() in (sitk.sitkInt16, sitk.sitkUInt16, sitk.sitkInt32, sitk.sitkUInt8):
                    abnormal = sitk.Cast(sitk.Round(abnormal), image.GetPixelID())
                entry["mask"] = f"masks/{name}_mask.nii.gz"
                entry["contrast"] = info["contrast"]
                m = sitk.GetArrayViewFromImage(mask)
                entry["volume_mm3"] = float(m.sum() * np.prod(mask.GetSpacing()))
                idx = np.argwhere(m).mean(axis=0)[::-1]
                centre = mask.TransformContinuousIndexToPhysicalPoint(idx.tolist())
                entry["centre_lps"] = [round(float(v), 2) for v in centre]
                entry["details"] = {k: v for k, v in info.items() if k != "contrast"}
                write_image_atomic(mask, out_dir / entry["mask"])
                write_image_atomic(abnormal, out_dir / entry["image"])
                del abnormal, mask
            cases[case] = entry
            if bar is not None:
                bar.update(1)
        del image, labels
    if bar is not None:
        bar.close()
    manifest = out_dir / "manifest.json"
    write_json({"generator": "cradl.synthetic.lesions", "seed": int(seed), "normal_dir": str(normal_dir),
                "sizes_mm": [float(v) for v in sizes_mm], "types": list(types),
                "n_per_combo": int(n_per_combo), "n_normals": sum(k == "normal" for k, _ in plan),
                "cases": cases}, manifest)
    return manifest
