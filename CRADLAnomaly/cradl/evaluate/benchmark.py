"""Scoring a labelled test set (`evaluate`) and the end-to-end benchmark (`benchmark`).

Every case goes through `AnomalyDetector.detect` exactly as a user's scan does: the voxel metrics are
computed on the heatmap it returns on the scan's own grid, and regions are the ones it reports. The
reference-space scan it prepared is kept (by wrapping `detect`'s `prepare` step) so the other methods
score the same aligned, normalised scan, and slice labels come from the anomaly mask carried into the
reference space with the same transform.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import CradlError, InputError
from ..io import plain_json, read_image, write_json
from ..regions import find_regions
from ..synthetic.lesions import ANOMALY_TYPES
from .metrics import CaseScores, curve_metrics, dice, full_report, region_outcome, score_histograms

log = logging.getLogger("cradl.evaluate")

MAIN = "CRADL"  # prefix of the model's own row


# ----------------------------------------------------------------------------- configuration


@dataclass
class BenchmarkConfig:
    name: str
    seed: int = 2301
    n_train: int = 60  # synthetic normal scans to train on (when the benchmark trains the model)
    n_test_normals: int = 20  # held-out synthetic normals: hosts of the anomalies and the clean test cases
    n_clean: int = 20  # clean (normal) cases in the test set
    types: tuple = ANOMALY_TYPES
    sizes_mm: tuple = (5.0, 10.0, 20.0, 35.0, 50.0)
    n_per_combo: int = 1
    recipe: dict = field(default_factory=dict)  # TrainConfig overrides when the benchmark trains its model
    ks: tuple = (1, 2, 4, 8)
    head_variant: bool = True
    head_short_epochs: int = 3  # when the training checkpoint's head is not available
    variant_heatmaps: bool = True  # voxel metrics for the CRADL variants too (one SmoothGrad pass each)
    zscore: bool = True
    vae: dict | None = field(default_factory=lambda: {"width": 16, "latent": 32, "epochs": 15})
    n_boot: int = 1000


CONFIGS = {
    # a few minutes at most: the test suite's end-to-end run
    "small": BenchmarkConfig(
        name="small", seed=7, n_train=10, n_test_normals=3, n_clean=2, types=("tumour", "blob"), sizes_mm=(25.0,),
        recipe=dict(slice_size=64, spacing_mm=3.0, width=12, feature_dim=32, projection_dim=32, epochs=4,
                    batch_size=64, learning_rate=3e-3, gmm_components=(1, 2), min_region_mm3=200.0,
                    name="cradl-benchmark-small", version="0.0.1"),
        ks=(1, 2), head_short_epochs=1, vae={"width": 8, "latent": 8, "epochs": 2}, n_boot=50),
    # the README table: 8 types x 5 sizes + 20 clean scans, all baselines (about 30-40 min of CPU
    # with a trained model; training one from scratch adds the model's own training time)
    "full": BenchmarkConfig(name="full"),
}


# ----------------------------------------------------------------------------- scoring a test set


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


def _brain_on_input(case: dict, image: sitk.Image, detector, prepared, data_dir: Path) -> tuple[np.ndarray, str]:
    """The brain mask on the scan's grid: the case's own (`brain`: label or expert mask), the generator's
    tissue labels when they exist, else the model's."""
    if case.get("brain"):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / case["brain"]))) > 0, "case brain mask"
    source = case.get("source")
    if source:
        src = Path(source)
        labels = src.parent / "labels" / (src.name.split(".")[0] + "_labels.nii.gz")
        if labels.is_file():
            lab = sitk.ReadImage(str(labels))
            if lab.GetSize() == image.GetSize():
                return sitk.GetArrayFromImage(lab) > 0, "tissue labels"
    mapped = detector.space.to_input(prepared.mask.astype(np.float32), prepared.transform, image)
    return sitk.GetArrayFromImage(mapped) > 0.5, "model mask"


def _case_scores(case: dict, method_name: str, nll, indices, volume_score, heat_input: sitk.Image | None,
                 region_labels: sitk.Image | None, threshold: float, lesion: np.ndarray, roi: np.ndarray,
                 slice_labels: np.ndarray, seconds: float) -> CaseScores:
    rec = CaseScores(case["id"], case["type"], case.get("size_mm"), float(volume_score), np.asarray(nll, float),
                     slice_labels, seconds=seconds)
    if heat_input is not None:
        heat = sitk.GetArrayViewFromImage(heat_input)
        rec.pos_hist, rec.neg_hist = score_histograms(heat, lesion, roi)
        if rec.abnormal:
            rec.dice_at_threshold = dice((heat > threshold) & roi, lesion)
        ranks = sitk.GetArrayViewFromImage(region_labels)
        outcome = region_outcome(ranks, lesion)
        rec.n_regions, rec.n_false_regions, rec.detected = (outcome["n_regions"], outcome["n_false_regions"],
                                                            outcome["detected"])
        hits = ranks[(ranks > 0) & lesion]
        rec.extra["first_hit_rank"] = int(hits.min()) if hits.size else None  # rank 1 = the top region
    return rec


def evaluate_cases(detector, data_dir, methods=(), variant_heatmaps: bool = True, progress: bool = True,
                   limit: int | None = None) -> tuple[dict[str, list[CaseScores]], list[dict]]:
    """Score every case of a labelled set (a folder with manifest.json) with the detector and `methods`.

    Returns per-method case records and a per-case log (scores, regions, timings) for the JSON output."""
    data_dir = Path(data_dir)
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        raise InputError(f"{data_dir} holds no manifest.json (write one with `python -m cradl synth-anomalies`)")
    cases = json.loads(manifest_path.read_text())["cases"]
    for i, case in enumerate(cases):
        case.setdefault("id", Path(case["image"]).name.split(".")[0] or f"case_{i}")
    if limit:
        cases = cases[:limit]
    main = f"{MAIN} K={detector.gmm.n_components} (model)"
    records: dict[str, list[CaseScores]] = {main: []}
    records.update({m.name: [] for m in methods})
    log_rows = []
    capture = _CapturingDetector(detector)
    iterator = cases
    if progress:
        from tqdm import tqdm
        iterator = tqdm(cases, desc="evaluating cases", unit="case")
    for case in iterator:
        try:
            image = read_image(data_dir / case["image"])
            t = time.perf_counter()
            result, prepared = capture.detect(image)
            detect_seconds = time.perf_counter() - t
        except CradlError as exc:  # one refused case stops the run: metrics over a silent subset would mislead
            raise type(exc)(f"case {case['id']} ({case['image']}): {exc}") from None
        if case.get("mask"):
            lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / case["mask"]))) > 0
            mask_image = sitk.ReadImage(str(data_dir / case["mask"]), sitk.sitkFloat32)
        else:
            lesion, mask_image = np.zeros(image.GetSize()[::-1], bool), None
        brain, brain_source = _brain_on_input(case, image, detector, prepared, data_dir)
        roi = brain | lesion
        idx = prepared.slice_indices
        if mask_image is not None:
            lesion_ref = detector.space.to_reference(mask_image, prepared.transform) > 0.5
            slice_labels = lesion_ref[idx].reshape(len(idx), -1).any(1)
        else:
            slice_labels = np.zeros(len(idx), bool)
        nll = np.array([s.score for s in result.slice_scores])
        records[main].append(_case_scores(case, main, nll, idx, result.volume_score, result.heatmap,
                                          result.region_labels, result.threshold, lesion, roi, slice_labels,
                                          detect_seconds))
        records[main][-1].extra["aggregates"] = _aggregates(nll, idx, detector.calibration)
        row = {"id": case["id"], "type": case["type"], "size_mm": case.get("size_mm"),
               "contrast": case.get("contrast"), "brain_mask": brain_source,
               "lesion_voxels": int(lesion.sum()), "anomalous_slices": int(slice_labels.sum()),
               "slice_indices": [int(i) for i in idx], "slice_labels": [int(v) for v in slice_labels],
               "methods": {main: _row(records[main][-1], result.threshold)}}
        row["methods"][main].update(out_of_distribution=result.out_of_distribution, warnings=result.warnings,
                                    brain_extraction=result.brain_extraction, typicality=result.typicality)
        for method in methods:
            t = time.perf_counter()
            heat_wanted = variant_heatmaps or method.family != "cradl"
            m_nll, heat_ref = method.score(prepared, heatmap=heat_wanted)
            heat_in = labels = None
            if heat_ref is not None:
                heat_in = detector.space.to_input(heat_ref, prepared.transform, image)
                _, labels = find_regions(heat_in, method.threshold, method.min_region_mm3)
            rec = _case_scores(case, method.name, m_nll, idx, method.volume_score(m_nll, idx), heat_in, labels,
                               method.threshold, lesion, roi, slice_labels, time.perf_counter() - t)
            rec.extra["aggregates"] = _aggregates(m_nll, idx, method.calibration)
            records[method.name].append(rec)
            row["methods"][method.name] = _row(rec, method.threshold)
        log_rows.append(row)
    return records, log_rows


def _aggregates(nll, idx, calibration) -> dict:
    """The volume score under every aggregate the calibration module offers (to compare them on one run)."""
    from ..calibration import AGGREGATES, aggregate
    return {name: aggregate(nll, idx, calibration, name) for name in AGGREGATES}


def aggregate_comparison(cases: list[CaseScores]) -> dict:
    """Volume AUROC / AP of each aggregate (all types, and the issue's target subset) from the same slice scores."""
    from .metrics import sample_metrics
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


def _row(rec: CaseScores, threshold: float) -> dict:
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


# ----------------------------------------------------------------------------- tables


def _fmt(value, ci=None, digits=3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    text = f"{value:.{digits}f}"
    if ci and ci[0] is not None and ci[1] is not None:
        text += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    return text


def markdown_tables(results: dict) -> str:
    methods = results["methods"]
    lines = ["| Method | Volume AUROC | Volume AP | Slice AUROC | Slice AP | Voxel AUROC | Voxel AP | Best Dice | "
             "Dice @ threshold | Detection rate | FP regions / normal scan |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rep in methods.items():
        o = rep["overall"]
        ci = o.get("ci95", {})
        v = o.get("voxel", {})
        lines.append("| " + " | ".join([
            name, _fmt(o["volume"]["auroc"], ci.get("volume_auroc")), _fmt(o["volume"]["ap"], ci.get("volume_ap")),
            _fmt(o["slice"]["auroc"], ci.get("slice_auroc")), _fmt(o["slice"]["ap"]),
            _fmt(v.get("auroc")), _fmt(v.get("ap"), ci.get("voxel_ap")),
            _fmt(v.get("best_dice"), ci.get("voxel_best_dice")), _fmt(o.get("dice_at_threshold")),
            _fmt(o.get("detection_rate"), digits=2), _fmt(o.get("fp_regions_per_normal_scan"), digits=2)]) + " |")
    out = ["## All methods (all anomaly types and sizes against the clean scans; 95% bootstrap intervals)", "",
           *lines, ""]
    types = sorted({t for rep in methods.values() for t in rep["by_type"]})
    if types:
        out += ["## Volume AUROC / voxel AP (lesion cases only) by anomaly type", "",
                "| Method | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
        for name, rep in methods.items():
            cells = []
            for t in types:
                g = rep["by_type"].get(t)
                if g is None:
                    cells.append("")
                    continue
                vox = (g.get("voxel_lesion_only") or {}).get("ap")
                cells.append(f"{_fmt(g['volume']['auroc'], digits=2)} / {_fmt(vox, digits=2)}")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    sizes = sorted({s for rep in methods.values() for s in rep["by_size"]})
    if sizes:
        out += ["## Volume AUROC / best Dice (lesion cases only) by anomaly size", "",
                "| Method | " + " | ".join(sizes) + " |", "|---|" + "---|" * len(sizes)]
        for name, rep in methods.items():
            cells = []
            for s in sizes:
                g = rep["by_size"].get(s)
                dice_ = (g.get("voxel_lesion_only") or {}).get("best_dice") if g else None
                cells.append(f"{_fmt(g['volume']['auroc'], digits=2)} / {_fmt(dice_, digits=2)}" if g else "")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    first = next(iter(methods.values()), {})
    if first.get("aggregates"):
        out += [f"## Volume AUROC of the model's slice scores under each aggregate (current: "
                f"{results.get('meta', {}).get('volume_aggregate', 'see manifest')})", "",
                "| Aggregate | Volume AUROC | Volume AP | AUROC, tumour + resection >= 15 mm |", "|---|---|---|---|"]
        for name, m in first["aggregates"].items():
            out.append(f"| {name} | {_fmt(m['volume_auroc'])} | {_fmt(m['volume_ap'])} | "
                       f"{_fmt(m['target_subset_auroc'])} |")
        out.append("")
    if results.get("targets"):
        out += ["## Targets of the model", "", "| Target | Measured | Met |", "|---|---|---|"]
        for t in results["targets"]:
            out.append(f"| {t['target']} | {_fmt(t['value'])} | {'yes' if t['met'] else 'no'} |")
        out.append("")
    meta = results.get("meta", {})
    out.append(f"Run {meta.get('date', '')} on {meta.get('machine', '')}; command: `{meta.get('command', '')}`; "
               f"{meta.get('n_cases', '?')} cases; {meta.get('seconds', 0):.0f} s.")
    return "\n".join(out) + "\n"


def targets(results: dict, main: str, baselines: dict[str, str]) -> list[dict]:
    """The issue's quality targets for the model's row, with the measured value and whether each is met."""
    rep = results["methods"][main]
    out = []

    def add(text, value, ok):
        out.append({"target": text, "value": value, "met": bool(ok) if value is not None and
                    math.isfinite(value) else False})

    sub = rep.get("target_subset")
    if sub:
        add("volume AUROC >= 0.95, tumour + resection >= 15 mm", sub["volume"]["auroc"], sub["volume"]["auroc"] >= 0.95)
    add("volume AUROC >= 0.85, all types", rep["overall"]["volume"]["auroc"], rep["overall"]["volume"]["auroc"] >= 0.85)
    tumour = rep["by_type"].get("tumour")
    if tumour and tumour.get("voxel_lesion_only"):
        ap, bd = tumour["voxel_lesion_only"]["ap"], tumour["voxel_lesion_only"]["best_dice"]
        add("voxel AP >= 0.5, tumour-like", ap, ap >= 0.5)
        add("best Dice >= 0.5, tumour-like", bd, bd >= 0.5)
    fp = rep["overall"].get("fp_regions_per_normal_scan")
    if fp is not None:
        add("FP regions per normal scan <= 0.2 at the calibrated threshold", fp, fp <= 0.2)
    vae = baselines.get("vae")
    if vae and vae in results["methods"]:
        ours, theirs = rep["overall"]["volume"]["auroc"], results["methods"][vae]["overall"]["volume"]["auroc"]
        add(f"volume AUROC above the VAE's ({theirs:.3f})", ours, ours > theirs)
        ours, theirs = rep["overall"]["slice"]["auroc"], results["methods"][vae]["overall"]["slice"]["auroc"]
        add(f"slice AUROC above the VAE's ({theirs:.3f})", ours, ours > theirs)
    zs = baselines.get("zscore")
    if zs and zs in results["methods"] and "voxel" in rep["overall"]:
        ours, theirs = rep["overall"]["voxel"]["ap"], results["methods"][zs]["overall"]["voxel"]["ap"]
        add(f"voxel AP above the intensity z-score's ({theirs:.3f})", ours, ours > theirs)
    return out


def machine_description() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    return (f"{platform.system()} {cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), "
            f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")


def _write_outputs(results: dict, out_json: Path | None, out_md: Path | None) -> None:
    if out_json is not None:
        write_json(plain_json(results, digits=5), out_json)
    if out_md is not None:
        from ..io import atomic_path
        with atomic_path(out_md) as tmp:
            Path(tmp).write_text(markdown_tables(results))


# ----------------------------------------------------------------------------- evaluate


def evaluate(model, data_dir, out_json=None, out_md=None, n_boot: int = 1000, device: str = "auto",
             progress: bool = True, command: str = "") -> dict:
    """Score one model on a labelled set; returns (and optionally writes) the results."""
    from ..detector import AnomalyDetector

    started = time.perf_counter()
    detector = AnomalyDetector.load(model, device=device)
    records, rows = evaluate_cases(detector, data_dir, progress=progress)
    results = {"meta": results_meta(command, started, detector, data_dir, len(rows)),
               "methods": report_methods(records, n_boot, 0), "cases": rows}
    main = next(iter(results["methods"]))
    results["targets"] = targets(results, main, {})
    results["meta"]["seconds"] = time.perf_counter() - started
    _write_outputs(results, Path(out_json) if out_json else None, Path(out_md) if out_md else None)
    return results


def results_meta(command, started, detector, data_dir, n_cases) -> dict:
    """The `meta` block of a results file: when, on what machine, by which command, with which model, on what."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_description(), "command": command, "model": detector.info,
            "volume_aggregate": detector.calibration.get("volume_aggregate"),
            "data": str(data_dir), "n_cases": n_cases, "seconds": time.perf_counter() - started}


# ----------------------------------------------------------------------------- benchmark


def run_benchmark(config: BenchmarkConfig, out_dir, model=None, normals=None, device: str = "cpu",
                  progress: bool = True, command: str = "") -> dict:
    """Everything end to end from config.seed: normals, held-out anomalies, model, baselines, metrics, tables.

    Steps whose outputs already exist in out_dir are reused (a rerun resumes). `model` reuses a trained
    bundle (its training normals are taken from `normals` or from the folders its manifest names)."""
    from ..detector import AnomalyDetector
    from ..synthetic.sets import generate_anomaly_set, generate_normal_cohort
    from ..train.trainer import TrainConfig, train_model
    from . import baselines as bl

    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    def step(name, t0):
        timings[name] = round(time.perf_counter() - t0, 1)
        log.info("benchmark step %s: %.0f s", name, timings[name])

    # 1. normal scans for training (unless given) and held-out normals for the test set (another seed)
    t = time.perf_counter()
    if model is None and normals is None:
        normals = out / "normals_train"
        if not (normals / "cohort.json").exists():
            generate_normal_cohort(normals, config.n_train, config.seed, progress=progress)
    test_normals = out / "normals_test"
    if not (test_normals / "cohort.json").exists():
        generate_normal_cohort(test_normals, config.n_test_normals, config.seed + 7919, progress=progress)
    step("synth_normals", t)

    # 2. labelled anomalies inserted into the held-out normals
    t = time.perf_counter()
    test_set = out / "test_set"
    if not (test_set / "manifest.json").exists():
        generate_anomaly_set(test_normals, test_set, config.seed, sizes_mm=config.sizes_mm, types=config.types,
                             n_per_combo=config.n_per_combo, n_normals=config.n_clean, progress=progress)
    step("synth_anomalies", t)

    # 3. the model: reuse or train (with resume, so the checkpoint keeps the projection head)
    t = time.perf_counter()
    if model is None:
        model = out / "model.cradl"
        if not model.exists():
            recipe = dict(config.recipe)
            if "gmm_components" in recipe:
                recipe["gmm_components"] = tuple(recipe["gmm_components"])
            train_model([normals], model, TrainConfig(**{"seed": config.seed, **recipe}), device=device, resume=True,
                        progress=progress)
    model = Path(model)
    detector = AnomalyDetector.load(model, device=device)
    step("model", t)

    # 4. baselines and variants, on the model's own normal cohort and split
    t = time.perf_counter()
    cache = model.with_suffix(".prep.npz")
    if not cache.exists() or not os.access(cache.parent, os.W_OK):
        cache = out / "cohort.prep.npz"
    cohort = bl.load_cohort(detector, [normals] if normals else None, cache=cache, progress=progress)
    methods, names = [], {}
    variant_ks = [k for k in config.ks if k != detector.gmm.n_components]
    methods += bl.cradl_k_variants(detector, cohort, variant_ks)
    if config.head_variant:
        methods += bl.projection_head_variants(detector, cohort, model.with_suffix(".ckpt"),
                                               short_epochs=config.head_short_epochs)
    step("cradl_variants", t)
    t = time.perf_counter()
    if config.zscore:
        z = bl.ZScoreBaseline(detector.localization).fit(cohort)
        methods.append(z)
        names["zscore"] = z.name
    step("zscore_baseline", t)
    t = time.perf_counter()
    if config.vae:
        vae = bl.VAEBaseline(detector.bundle.grid.size[0], detector.localization, seed=config.seed,
                             device=detector.device, **config.vae).fit(cohort)
        methods.append(vae)
        names["vae"] = vae.name
    step("vae_baseline", t)

    # 5. score the test set with everything
    t = time.perf_counter()
    records, rows = evaluate_cases(detector, test_set, methods, variant_heatmaps=config.variant_heatmaps,
                                   progress=progress)
    step("evaluate", t)
    t = time.perf_counter()
    results = {"meta": results_meta(command, started, detector, test_set, len(rows)),
               "config": dataclasses.asdict(config),
               "methods": report_methods(records, config.n_boot, config.seed),
               "method_details": {m.name: m.describe() for m in methods}, "cases": rows}
    main = next(iter(results["methods"]))
    results["targets"] = targets(results, main, names)
    step("metrics", t)
    results["meta"]["timings_s"] = timings
    results["meta"]["seconds"] = time.perf_counter() - started
    _write_outputs(results, out / "results.json", out / "results.md")
    return results
