"""The end-to-end benchmark (`benchmark`) and the scoring of one model on a labelled set (`evaluate`).

The benchmark makes everything from one seed (normal scans, held-out anomalies, the model unless one is
given, the baselines), scores the test set (`scoring`) and writes the results and their tables (`report`).
Steps whose outputs already exist in the output folder are reused, so a rerun resumes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..manifest import PLAIN_GRADIENT_LOCALIZATION
from ..synthetic.lesions import ANOMALY_TYPES
from .report import results_meta, targets, write_results
from .scoring import evaluate_cases, report_methods

log = logging.getLogger("cradl.evaluate")


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
    # TrainConfig overrides when the benchmark trains its model; its synthetic normals mix T1, T2 and FLAIR
    recipe: dict = field(default_factory=lambda: {"localization": PLAIN_GRADIENT_LOCALIZATION})
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
                    name="cradl-benchmark-small", version="0.0.1", localization=PLAIN_GRADIENT_LOCALIZATION),
        ks=(1, 2), head_short_epochs=1, vae={"width": 8, "latent": 8, "epochs": 2}, n_boot=50),
    # the README table: 8 types x 5 sizes + 20 clean scans, all baselines (about 30-40 min of CPU
    # with a trained model; training one from scratch adds the model's own training time)
    "full": BenchmarkConfig(name="full"),
}


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
    write_results(results, Path(out_json) if out_json else None, Path(out_md) if out_md else None)
    return results


# ----------------------------------------------------------------------------- benchmark


class _Steps:
    """Seconds per benchmark step, logged as each one ends."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 1)
        log.info("benchmark step %s: %.0f s", name, self.seconds[name])


def _synthetic_normals(config: BenchmarkConfig, out: Path, normals, train: bool, progress: bool) -> tuple:
    """Normal scans to train on (when the model is to be trained here and none are given) and held-out
    normals for the test set (another seed). Returns (training normals or None, test normals)."""
    from ..synthetic.sets import generate_normal_cohort

    if train and normals is None:
        normals = out / "normals_train"
        if not (normals / "cohort.json").exists():
            generate_normal_cohort(normals, config.n_train, config.seed, progress=progress)
    test_normals = out / "normals_test"
    if not (test_normals / "cohort.json").exists():
        generate_normal_cohort(test_normals, config.n_test_normals, config.seed + 7919, progress=progress)
    return normals, test_normals


def _test_set(config: BenchmarkConfig, out: Path, test_normals: Path, progress: bool) -> Path:
    """Labelled anomalies inserted into the held-out normals, with clean cases beside them."""
    from ..synthetic.sets import generate_anomaly_set

    test_set = out / "test_set"
    if not (test_set / "manifest.json").exists():
        generate_anomaly_set(test_normals, test_set, config.seed, sizes_mm=config.sizes_mm, types=config.types,
                             n_per_combo=config.n_per_combo, n_normals=config.n_clean, progress=progress)
    return test_set


def _trained_model(config: BenchmarkConfig, out: Path, normals: Path, device: str, progress: bool) -> Path:
    """The benchmark's own model, trained with resume so the checkpoint keeps the projection head."""
    from ..train.trainer import TrainConfig, train_model

    model = out / "model.cradl"
    if not model.exists():
        recipe = dict(config.recipe)
        if "gmm_components" in recipe:
            recipe["gmm_components"] = tuple(recipe["gmm_components"])
        train_model([normals], model, TrainConfig(**{"seed": config.seed, **recipe}), device=device, resume=True,
                    progress=progress)
    return model


def _cohort(detector, model: Path, out: Path, normals, progress: bool):
    """The model's normal cohort and split, prepared once (through the trainer's cache when it can be used)."""
    from . import baselines as bl

    cache = model.with_suffix(".prep.npz")
    if not cache.exists() or not os.access(cache.parent, os.W_OK):
        cache = out / "cohort.prep.npz"
    return bl.load_cohort(detector, [normals] if normals else None, cache=cache, progress=progress)


def _cradl_variants(config: BenchmarkConfig, detector, cohort, model: Path) -> list:
    from . import baselines as bl

    variant_ks = [k for k in config.ks if k != detector.gmm.n_components]
    methods = bl.cradl_k_variants(detector, cohort, variant_ks)
    if config.head_variant:
        methods += bl.projection_head_variants(detector, cohort, model.with_suffix(".ckpt"),
                                               short_epochs=config.head_short_epochs)
    return methods


def _baselines(config: BenchmarkConfig, detector, cohort, steps: _Steps) -> tuple[list, dict[str, str]]:
    """The intensity z-score and the VAE, as the configuration asks; returns them and their names by kind."""
    from . import baselines as bl

    methods, names = [], {}
    with steps("zscore_baseline"):
        if config.zscore:
            z = bl.ZScoreBaseline(detector.localization).fit(cohort)
            methods.append(z)
            names["zscore"] = z.name
    with steps("vae_baseline"):
        if config.vae:
            vae = bl.VAEBaseline(detector.bundle.grid.size[0], detector.localization, seed=config.seed,
                                 device=detector.device, **config.vae).fit(cohort)
            methods.append(vae)
            names["vae"] = vae.name
    return methods, names


def run_benchmark(config: BenchmarkConfig, out_dir, model=None, normals=None, device: str = "cpu",
                  progress: bool = True, command: str = "") -> dict:
    """Everything end to end from config.seed: normals, held-out anomalies, model, baselines, metrics, tables.

    Steps whose outputs already exist in out_dir are reused (a rerun resumes). `model` reuses a trained
    bundle (its training normals are taken from `normals` or from the folders its manifest names)."""
    from ..detector import AnomalyDetector

    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = _Steps()
    with steps("synth_normals"):
        normals, test_normals = _synthetic_normals(config, out, normals, model is None, progress)
    with steps("synth_anomalies"):
        test_set = _test_set(config, out, test_normals, progress)
    with steps("model"):
        model = Path(model) if model is not None else _trained_model(config, out, normals, device, progress)
        detector = AnomalyDetector.load(model, device=device)
    with steps("cradl_variants"):
        cohort = _cohort(detector, model, out, normals, progress)
        methods = _cradl_variants(config, detector, cohort, model)
    baselines, names = _baselines(config, detector, cohort, steps)
    methods += baselines
    with steps("evaluate"):
        records, rows = evaluate_cases(detector, test_set, methods, variant_heatmaps=config.variant_heatmaps,
                                       progress=progress)
    with steps("metrics"):
        results = {"meta": results_meta(command, started, detector, test_set, len(rows)),
                   "config": dataclasses.asdict(config),
                   "methods": report_methods(records, config.n_boot, config.seed),
                   "method_details": {m.name: m.describe() for m in methods}, "cases": rows}
        results["targets"] = targets(results, next(iter(results["methods"])), names)
    results["meta"]["timings_s"] = steps.seconds
    results["meta"]["seconds"] = time.perf_counter() - started
    write_results(results, out / "results.json", out / "results.md")
    return results
