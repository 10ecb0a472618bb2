"""The real-data benchmark: one model and the two baselines (retrained on the same real training split),
scored on the real evaluation set (`realset.py`), reported per group with bootstrap intervals.

Groups: held-out real normals (false alarms), real stroke shapes painted into the same subjects
(paired volume AUROC: each subject with and without its lesion), synthetic lesion types in the same
real anatomy, and the real BraTS and MS patients (voxel AP, best Dice, where the lesion ranks among
the regions; their volume AUROC against IXI normals would mix scanner and contrast with lesion, so it
is not reported).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import calibration as calib
from .. import realdata
from .report import results_meta
from .scoring import evaluate_cases
from .metrics import CaseScores, bootstrap_ci, curve_metrics, summarise

log = logging.getLogger("cradl.evaluate")

PAIRED_GROUPS = ("stroke", "synthetic")
PATIENT_GROUPS = ("brats", "ms")


def group_of(case_type: str) -> str:
    if case_type in ("normal", "stroke", *PATIENT_GROUPS):
        return case_type
    return "synthetic"


def real_cohort(detector, work_dir: Path, root=None, progress: bool = True, cache: Path | None = None):
    """The recorded split's training, validation and calibration subjects, prepared in the model's space."""
    from ..train.real import brain_masks, normal_subjects
    from ..train.trainer import config_from_manifest, prepare_all
    from .baselines import Cohort, for_scoring

    subjects, groups = normal_subjects(root)
    groups = {name: np.asarray(indices) for name, indices in groups.items()}
    config = config_from_manifest(detector.bundle.manifest)
    masks = brain_masks(subjects, work_dir, progress)
    scans = prepare_all([s.t1 for s in subjects], detector.space, config, cache, progress, masks=masks)
    scans = for_scoring(scans)
    return Cohort(config, [s.t1 for s in subjects], scans, groups["train"], groups["validation"],
                  groups["calibration"], [None] * len(subjects), progress)


def group_table(records: dict[str, list[CaseScores]], rows: list[dict], n_boot: int, seed: int = 0) -> dict:
    """Per method and group: the issue's metrics with bootstrap intervals."""
    table = {}
    for method, cases in records.items():
        normals = [c for c in cases if not c.abnormal]
        out = {"normal": _normal_stats(normals, rows, method)}
        for group in PAIRED_GROUPS + PATIENT_GROUPS:
            members = [c for c in cases if c.abnormal and group_of(c.type) == group]
            if not members:
                continue
            paired = group in PAIRED_GROUPS
            stats = summarise(normals + members if paired else members, n_boot=n_boot if paired else 0, seed=seed)
            if not paired:
                stats.pop("volume", None)
            stats["lesion_voxels_only"] = curve_metrics(sum(c.pos_hist for c in members),
                                                        sum(c.neg_hist for c in members))
            ranks = [c.extra.get("first_hit_rank") for c in members]
            stats["top1_hit_rate"] = float(np.mean([r == 1 for r in ranks]))
            stats["top3_hit_rate"] = float(np.mean([r is not None and r <= 3 for r in ranks]))
            stats["n"] = len(members)
            out[group] = stats
        table[method] = out
    return table


def _normal_stats(normals: list[CaseScores], rows: list[dict], method: str) -> dict:
    pct = np.array([r["methods"][method]["percentile"] for r in rows if r["type"] == "normal"])
    regions = np.array([c.n_regions for c in normals], float)
    flagged = pct >= 95.0
    return {"n": len(normals), "flagged_at_95th": float(flagged.mean()),
            "flagged_ci95": list(bootstrap_ci(lambda i: float(flagged[i].mean()), np.zeros(len(pct)), 1000)),
            "fp_regions_per_scan": float(regions.mean()),
            "fp_regions_ci95": list(bootstrap_ci(lambda i: float(regions[i].mean()), np.zeros(len(regions)), 1000)),
            "out_of_distribution": int(sum(bool(r["methods"][method].get("out_of_distribution"))
                                           for r in rows if r["type"] == "normal"))}


def run_real_benchmark(model, data_dir, out_dir, work_dir, root=None, device: str = "cpu", n_boot: int = 1000,
                       baselines: bool = True, vae_epochs: int = 15, progress: bool = True, command: str = "") -> dict:
    """Fit the baselines on the real training split, score everything on the real set, write results."""
    from ..detector import AnomalyDetector
    from . import baselines as bl

    started = time.perf_counter()
    out, work_dir = Path(out_dir), Path(work_dir)
    out.mkdir(parents=True, exist_ok=True)
    detector = AnomalyDetector.load(model, device=device)
    methods, timings = [], {}
    if baselines:
        t = time.perf_counter()
        model_cache = Path(model).with_suffix(".prep.npz") if model else None
        cache = model_cache if model_cache and model_cache.exists() else work_dir / "cohort.prep.npz"
        cohort = real_cohort(detector, work_dir, root, progress, cache=cache)
        timings["cohort"] = time.perf_counter() - t
        t = time.perf_counter()
        methods.append(bl.ZScoreBaseline(detector.localization).fit(cohort))
        timings["zscore"] = time.perf_counter() - t
        t = time.perf_counter()
        methods.append(bl.VAEBaseline(detector.bundle.grid.size[0], detector.localization, epochs=vae_epochs,
                                      device=detector.device).fit(cohort))
        timings["vae"] = time.perf_counter() - t
    t = time.perf_counter()
    preparation = brain_extraction_and_alignment(detector, root, progress)
    timings["brain_extraction_and_alignment"] = time.perf_counter() - t
    t = time.perf_counter()
    records, rows = evaluate_cases(detector, data_dir, methods, variant_heatmaps=False, progress=progress)
    timings["evaluate"] = time.perf_counter() - t
    main = next(iter(records))
    calibrations = {main: detector.calibration, **{m.name: m.calibration for m in methods}}
    for row in rows:
        for name, entry in row["methods"].items():
            entry["percentile"] = calib.percentile(entry["volume_score"], calibrations[name])
    results = {"meta": results_meta(command, started, detector, data_dir, len(rows)),
               "brain_extraction_and_alignment": preparation,
               "groups": group_table(records, rows, n_boot), "cases": rows}
    results["meta"]["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    results["meta"]["seconds"] = time.perf_counter() - started
    from ..io import plain_json, write_json
    write_json(plain_json(results, digits=5), out / "results.json")
    (out / "results.md").write_text(markdown(results) + "\n")
    return results


def _f(value, ci=None, digits=2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:.{digits}f}"
    if ci and all(v is not None and np.isfinite(v) for v in ci):
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text


def markdown(results: dict) -> str:
    lines = [f"Real-data benchmark ({results['meta']['date']}; {results['meta']['machine']}); "
             f"command: `{results['meta']['command']}`", "",
             "| method | normals flagged >= 95th pct | false regions / normal | stroke: volume AUROC | "
             "stroke: voxel AP | stroke: best Dice | stroke: top region on lesion | synthetic: volume AUROC | "
             "synthetic: voxel AP | patients: lesion in top 3 | patients: voxel AP (lesion scans) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, groups in results["groups"].items():
        n, s, y = groups["normal"], groups.get("stroke", {}), groups.get("synthetic", {})
        patients = [groups[g] for g in PATIENT_GROUPS if g in groups]
        n_patients = sum(p["n"] for p in patients)
        top3 = sum(p["top3_hit_rate"] * p["n"] for p in patients) / n_patients if patients else None
        pap = ", ".join(f"{g} {_f(groups[g]['lesion_voxels_only']['ap'], digits=3)}"
                        for g in PATIENT_GROUPS if g in groups)

        def ci(group, key):
            return group.get("ci95", {}).get(key)

        lines.append(" | ".join([
            f"| {method}", _f(n["flagged_at_95th"], n["flagged_ci95"]),
            _f(n["fp_regions_per_scan"], n["fp_regions_ci95"]),
            _f(s.get("volume", {}).get("auroc"), ci(s, "volume_auroc")),
            _f(s.get("voxel", {}).get("ap"), ci(s, "voxel_ap"), 3), _f(s.get("voxel", {}).get("best_dice")),
            _f(s.get("top1_hit_rate")), _f(y.get("volume", {}).get("auroc"), ci(y, "volume_auroc")),
            _f(y.get("voxel", {}).get("ap"), ci(y, "voxel_ap"), 3), _f(top3), pap or "-"]) + " |")
    prep = results["brain_extraction_and_alignment"]
    lines += ["", f"Brain extraction on the {prep['n_subjects']} held-out heads with skull: Dice against the label "
              f"masks {prep['dice_mean']:.3f} (min {prep['dice_min']:.3f}, max {prep['dice_max']:.3f}), "
              f"{prep['seconds_median']:.1f} s per scan (median). Alignment: each of {prep['n_structures']} labelled "
              f"structures lands {prep['alignment_scatter_mm_median']:.1f} mm (median; 90th percentile "
              f"{prep['alignment_scatter_mm_p90']:.1f} mm) from its mean position over subjects."]
    lines += ["", "Per patient (CRADL): percentile, out of distribution, lesion rank among regions, voxel AP, "
              "best Dice", "",
              "| case | contrast | percentile | out of distribution | first region on lesion | voxel AP | best Dice |",
              "|---|---|---|---|---|---|---|"]
    main = next(iter(results["groups"]))
    for row in results["cases"]:
        if row["type"] in PATIENT_GROUPS:
            m = row["methods"][main]
            lines.append(f"| {row['id']} | {row.get('contrast')} | {m['percentile']:.0f} | "
                         f"{'yes' if m.get('out_of_distribution') else 'no'} | {m.get('first_hit_rank') or 'none'} | "
                         f"{_f(m.get('voxel_ap'), digits=3)} | {_f(m.get('best_dice'))} |")
    return "\n".join(lines)


def brain_extraction_and_alignment(detector, root=None, progress: bool = True) -> dict:
    """On the held-out test subjects: brain extraction's Dice against the DLMUSE label masks and its time;
    then how consistently the brain-only alignment puts anatomy in one place. For every labelled structure,
    its centroid is mapped into the reference space; the distance of each subject's centroid from the
    structures' mean over subjects is the alignment's scatter in mm (affine: anatomy itself varies too)."""
    from tqdm import tqdm

    from ..brain import dice, extract_brain
    from ..preprocess import brain_only

    rows, centroids = [], {}
    for subject in tqdm(realdata.subjects_in("test", root), desc="brain extraction and alignment",
                        unit="scan", disable=not progress):
        image = sitk.ReadImage(str(subject.t1), sitk.sitkFloat32)
        labels = sitk.ReadImage(str(subject.labels))
        started = time.perf_counter()
        mask, method = extract_brain(image)
        seconds = time.perf_counter() - started
        label_array = sitk.GetArrayFromImage(labels)
        rows.append({"id": subject.id, "method": method, "seconds": round(seconds, 2),
                     "dice": round(dice(sitk.GetArrayFromImage(mask) > 0, label_array > 0), 4)})
        to_scan = detector.space.align(brain_only(image, mask, detector.normalisation, detector.space.grid.spacing))
        to_reference = to_scan.GetInverse()
        stats = sitk.LabelShapeStatisticsImageFilter()
        stats.Execute(labels)
        for label in stats.GetLabels():
            if stats.GetNumberOfPixels(label) >= 20:
                centroids.setdefault(label, {})[subject.id] = to_reference.TransformPoint(stats.GetCentroid(label))
    scatter = []
    for per_subject in centroids.values():
        if len(per_subject) >= 10:
            points = np.array(list(per_subject.values()))
            scatter += list(np.linalg.norm(points - points.mean(0), axis=1))
    dices, seconds = [r["dice"] for r in rows], [r["seconds"] for r in rows]
    return {"n_subjects": len(rows), "dice_mean": float(np.mean(dices)), "dice_min": float(np.min(dices)),
            "dice_max": float(np.max(dices)), "seconds_median": float(np.median(seconds)),
            "alignment_scatter_mm_median": float(np.median(scatter)),
            "alignment_scatter_mm_p90": float(np.percentile(scatter, 90)), "n_structures": len(centroids),
            "subjects": rows}
