"""Scoring a labelled test set: every case through the detector and the other methods, reduced to `CaseScores`.

Every case goes through `AnomalyDetector.detect` exactly as a user's scan does: the voxel metrics are
computed on the heatmap it returns on the scan's own grid, and regions are the ones it reports. The
reference-space scan it prepared is kept (by wrapping `detect`'s `prepare` step) so the other methods
score the same aligned, normalised scan, and slice labels come from the anomaly mask carried into the
reference space with the same transform.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import CradlError, InputError
from ..io import read_image, scan_stem
from ..regions import find_regions
from .metrics import CaseScores, curve_metrics, dice, full_report, region_outcome, sample_metrics, score_histograms

MAIN = "CRADL"  # prefix of the model's own row


class _CapturingDetector:
    """Runs `detector.detect` unchanged and keeps the PreparedScan it made (for the reference-space steps)."""

    def __init__(self, detector):
        self.detector = detector
        self.prepared = None
        original = detector.prepare

        def prepare(image, mask=None):
            self.prepared = original(image, mask)
            return self.prepared

        detector.prepare = prepare  # instance attribute: only this detector object is affected

    def detect(self, image):
        self.prepared = None
        result = self.detector.detect(image, heatmap=True)
        return result, self.prepared


@dataclass
class _Truth:
    """What a case's labels say, on the scan's grid and on the model's reference slices."""
    lesion: np.ndarray  # anomaly voxels on the scan's grid
    roi: np.ndarray  # the voxels scored: brain and anomaly
    slice_labels: np.ndarray  # per reference slice: the anomaly touches it
    brain_source: str  # where the brain mask came from


def load_cases(data_dir: Path, limit: int | None = None) -> list[dict]:
    """The cases of a labelled set's manifest.json, each with an id."""
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        raise InputError(f"{data_dir} holds no manifest.json (write one with `python -m cradl synth-anomalies`)")
    cases = json.loads(manifest_path.read_text())["cases"]
    for i, case in enumerate(cases):
        case.setdefault("id", Path(case["image"]).name.split(".")[0] or f"case_{i}")
    return cases[:limit] if limit else cases


def _brain_on_input(case: dict, image: sitk.Image, detector, prepared, data_dir: Path) -> tuple[np.ndarray, str]:
    """The brain mask on the scan's grid: the case's own (`brain`: label or expert mask), the generator's
    tissue labels when they exist, else the model's."""
    if case.get("brain"):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / case["brain"]))) > 0, "case brain mask"
    source = case.get("source")
    if source:
        src = Path(source)
        labels = src.parent / "labels" / f"{scan_stem(src)}_labels.nii.gz"
        if labels.is_file():
            lab = sitk.ReadImage(str(labels))
            if lab.GetSize() == image.GetSize():
                return sitk.GetArrayFromImage(lab) > 0, "tissue labels"
    mapped = detector.space.to_input(prepared.mask.astype(np.float32), prepared.transform, image)
    return sitk.GetArrayFromImage(mapped) > 0.5, "model mask"


def _truth(case: dict, image: sitk.Image, detector, prepared, data_dir: Path) -> _Truth:
    idx = prepared.slice_indices
    if case.get("mask"):
        lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / case["mask"]))) > 0
        mask_image = sitk.ReadImage(str(data_dir / case["mask"]), sitk.sitkFloat32)
        lesion_ref = detector.space.to_reference(mask_image, prepared.transform) > 0.5
        slice_labels = lesion_ref[idx].reshape(len(idx), -1).any(1)
    else:
        lesion, slice_labels = np.zeros(image.GetSize()[::-1], bool), np.zeros(len(idx), bool)
    brain, brain_source = _brain_on_input(case, image, detector, prepared, data_dir)
    return _Truth(lesion, brain | lesion, slice_labels, brain_source)


def _case_scores(case: dict, truth: _Truth, nll, volume_score, heat_input: sitk.Image | None,
                 region_labels: sitk.Image | None, threshold: float, seconds: float) -> CaseScores:
    rec = CaseScores(case["id"], case["type"], case.get("size_mm"), float(volume_score), np.asarray(nll, float),
                     truth.slice_labels, seconds=seconds)
    if heat_input is not None:
        heat = sitk.GetArrayViewFromImage(heat_input)
        rec.pos_hist, rec.neg_hist = score_histograms(heat, truth.lesion, truth.roi)
        if rec.abnormal:
            rec.dice_at_threshold = dice((heat > threshold) & truth.roi, truth.lesion)
        ranks = sitk.GetArrayViewFromImage(region_labels)
        outcome = region_outcome(ranks, truth.lesion)
        rec.n_regions, rec.n_false_regions, rec.detected = (outcome["n_regions"], outcome["n_false_regions"],
                                                            outcome["detected"])
        hits = ranks[(ranks > 0) & truth.lesion]
        rec.extra["first_hit_rank"] = int(hits.min()) if hits.size else None  # rank 1 = the top region
    return rec


def _detect_case(capture: _CapturingDetector, data_dir: Path, case: dict):
    """The case's image, the detector's result on it, the scan it prepared, and the seconds detection took."""
    try:
        image = read_image(data_dir / case["image"])
        t = time.perf_counter()
        result, prepared = capture.detect(image)
        return image, result, prepared, time.perf_counter() - t
    except CradlError as exc:  # one refused case stops the run: metrics over a silent subset would mislead
        raise type(exc)(f"case {case['id']} ({case['image']}): {exc}") from None


def _model_scores(case: dict, result, prepared, truth: _Truth, calibration: dict, seconds: float) -> CaseScores:
    nll = np.array([s.score for s in result.slice_scores])
    rec = _case_scores(case, truth, nll, result.volume_score, result.heatmap, result.region_labels, result.threshold,
                       seconds)
    rec.extra["aggregates"] = _aggregates(nll, prepared.slice_indices, calibration)
    return rec


def _method_scores(method, case: dict, image: sitk.Image, prepared, truth: _Truth, detector,
                   variant_heatmaps: bool) -> CaseScores:
    """One other method on the scan the detector prepared; its heatmap is carried back to the scan's grid."""
    t = time.perf_counter()
    idx = prepared.slice_indices
    heat_wanted = variant_heatmaps or method.family != "cradl"
    nll, heat_ref = method.score(prepared, heatmap=heat_wanted)
    heat_in = labels = None
    if heat_ref is not None:
        heat_in = detector.space.to_input(heat_ref, prepared.transform, image)
        _, labels = find_regions(heat_in, method.threshold, method.min_region_mm3)
    rec = _case_scores(case, truth, nll, method.volume_score(nll, idx), heat_in, labels, method.threshold,
                       time.perf_counter() - t)
    rec.extra["aggregates"] = _aggregates(nll, idx, method.calibration)
    return rec


def _case_row(case: dict, truth: _Truth, idx) -> dict:
    return {"id": case["id"], "type": case["type"], "size_mm": case.get("size_mm"),
            "contrast": case.get("contrast"), "brain_mask": truth.brain_source,
            "lesion_voxels": int(truth.lesion.sum()), "anomalous_slices": int(truth.slice_labels.sum()),
            "slice_indices": [int(i) for i in idx], "slice_labels": [int(v) for v in truth.slice_labels],
            "methods": {}}


def _model_row(rec: CaseScores, result) -> dict:
    return _row(rec) | {"out_of_distribution": result.out_of_distribution, "warnings": result.warnings,
                        "brain_extraction": result.brain_extraction, "typicality": result.typicality}


def _with_progress(cases: list[dict], progress: bool):
    if not progress:
        return cases
    from tqdm import tqdm

    return tqdm(cases, desc="evaluating cases", unit="case")


def evaluate_cases(detector, data_dir, methods=(), variant_heatmaps: bool = True, progress: bool = True,
                   limit: int | None = None) -> tuple[dict[str, list[CaseScores]], list[dict]]:
    """Score every case of a labelled set (a folder with manifest.json) with the detector and `methods`.

    Returns per-method case records and a per-case log (scores, regions, timings) for the JSON output."""
    data_dir = Path(data_dir)
    cases = load_cases(data_dir, limit)
    main = f"{MAIN} K={detector.gmm.n_components} (model)"
    records: dict[str, list[CaseScores]] = {main: [], **{m.name: [] for m in methods}}
    log_rows = []
    capture = _CapturingDetector(detector)
    for case in _with_progress(cases, progress):
        image, result, prepared, seconds = _detect_case(capture, data_dir, case)
        truth = _truth(case, image, detector, prepared, data_dir)
        row = _case_row(case, truth, prepared.slice_indices)
        rec = _model_scores(case, result, prepared, truth, detector.calibration, seconds)
        records[main].append(rec)
        row["methods"][main] = _model_row(rec, result)
        for method in methods:
            rec = _method_scores(method, case, image, prepared, truth, detector, variant_heatmaps)
            records[method.name].append(rec)
            row["methods"][method.name] = _row(rec)
        log_rows.append(row)
    return records, log_rows


def _aggregates(nll, idx, calibration) -> dict:
    """The volume score under every aggregate the calibration module offers (to compare them on one run)."""
    from ..calibration import AGGREGATES, aggregate
    return {name: aggregate(nll, idx, calibration, name) for name in AGGREGATES}


def aggregate_comparison(cases: list[CaseScores]) -> dict:
    """Volume AUROC / AP of each aggregate (all types, and the issue's target subset) from the same slice scores."""
    if not cases or "aggregates" not in cases[0].extra:
        return {}
    labels = np.array([c.abnormal for c in cases])
    target = np.array([not c.abnormal or (c.type in ("tumour", "resection") and (c.size_mm or 0) >= 15)
                       for c in cases])
    out = {}
    for name in cases[0].extra["aggregates"]:
        scores = np.array([c.extra["aggregates"][name] for c in cases])
        m = sample_metrics(labels, scores)
        t = sample_metrics(labels[target], scores[target])
        out[name] = {"volume_auroc": m["auroc"], "volume_ap": m["ap"], "target_subset_auroc": t["auroc"]}
    return out


def _row(rec: CaseScores) -> dict:
    row = {"slice_scores": [round(float(v), 3) for v in rec.slice_scores], "volume_score": round(rec.volume_score, 4),
           "max_slice_score": round(float(np.max(rec.slice_scores)), 4),
           "dice_at_threshold": None if rec.dice_at_threshold is None else round(rec.dice_at_threshold, 4),
           "n_regions": rec.n_regions, "n_false_regions": rec.n_false_regions, "detected": rec.detected,
           "first_hit_rank": rec.extra.get("first_hit_rank"), "seconds": round(rec.seconds, 2)}
    if rec.abnormal and rec.pos_hist is not None:  # this case's own voxel AP and best Dice
        own = curve_metrics(rec.pos_hist, rec.neg_hist)
        row.update(voxel_ap=round(own["ap"], 4), best_dice=round(own["best_dice"], 4))
    return row


def report_methods(records: dict[str, list[CaseScores]], n_boot: int, seed: int) -> dict:
    out = {}
    for name, cases in records.items():
        out[name] = full_report(cases, n_boot=n_boot, seed=seed)
        out[name]["aggregates"] = aggregate_comparison(cases)
    return out
