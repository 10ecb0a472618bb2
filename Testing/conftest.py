"""Shared fixtures: small real data made by the project's own generators, and a tiny trained model.

The tiny model is trained once per test session (about half a minute on 2 CPU cores) with the same
`train_model` the CLI uses; it is small and coarse but real, so tests exercise the real pipeline.
"""
from __future__ import annotations

import locale
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from filelock import FileLock

from cradl.manifest import PLAIN_GRADIENT_LOCALIZATION

# Under pytest-xdist (`-n 2`) each worker process gets one core's share of threads, for torch and ITK alike
# (subprocesses inherit them), so that two workers do not fight over two cores.
_THREADS = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"
os.environ.setdefault("OMP_NUM_THREADS", _THREADS)
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", _THREADS)


@pytest.fixture(autouse=True)
def _keep_the_locale():
    """SimpleITK's DICOM writer (used here to make test series) sets the C locale and leaves it, which turns
    Python's default text encoding into ASCII for every later test in the process: put it back."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    if locale.setlocale(locale.LC_ALL) != saved:
        locale.setlocale(locale.LC_ALL, saved)


@pytest.hookimpl(trylast=True)  # after -m has deselected: the first file must be one that runs
def pytest_collection_modifyitems(config, items):
    """With pytest-xdist (`-n 2 --dist loadfile`) whole files go to the workers in collection order. Put first
    one file that needs the tiny model (its worker trains it, about a minute), then every file that does not,
    then the rest: the other worker runs the model-free files meanwhile instead of waiting for the model."""
    needs = {}
    for item in items:
        needs[item.path] = needs.get(item.path, False) or "tiny_model" in item.fixturenames
    first = next((path for path, needed in needs.items() if needed), None)
    items.sort(key=lambda item: 0 if item.path == first else (2 if needs[item.path] else 1))  # stable sort


# Its cohort mixes T1, T2 and FLAIR, so its heatmaps are the plain gradient: a mean over contrasts is no
# normal reference (calibration refuses one; the bundled model, T1 only, reads the deviation from it).
TINY_RECIPE = dict(slice_size=64, spacing_mm=3.0, width=12, feature_dim=32, grid=4, geometry="light",
                   projection_dim=32, epochs=6, localization=PLAIN_GRADIENT_LOCALIZATION,
                   batch_size=64, learning_rate=3e-3, gmm_components=(1, 2), min_region_mm3=200.0,
                   name="cradl-tiny-test", version="0.0.1", description="tiny model trained by the test suite")


def made_once(tmp_path_factory, name: str, make) -> Path:
    """The folder `name`, filled by `make(folder)` once per test run: under pytest-xdist the first worker
    to ask makes it (the others wait for it) in the folder all workers of the run share."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def normal_cohort(tmp_path_factory) -> Path:
    """Ten synthetic normal brains (written by the project's generator)."""
    from cradl.synthetic.sets import generate_normal_cohort

    return made_once(tmp_path_factory, "normals",
                     lambda folder: generate_normal_cohort(folder, n=10, seed=11, progress=False))


def label_masks(scans: list[Path]) -> list[Path]:
    """The generator's label map of each cohort scan (`labels > 0` is its brain), as `cohort.json` names it."""
    return [scan.parent / "labels" / scan.name.replace(".nii.gz", "_labels.nii.gz") for scan in scans]


@pytest.fixture(scope="session")
def tiny_model(normal_cohort, tmp_path_factory) -> Path:
    """Path to a tiny CRADL bundle trained on `normal_cohort`.

    Its brain masks are the generator's label maps (a documented option of training), which spares ten runs
    of the brain-extraction network on the suite's critical path; they agree with the network's masks on
    these scans to Dice 0.95-0.98, and every detection in the tests still extracts the brain itself."""
    from cradl.train.trainer import TrainConfig, train_model

    def train(folder):
        scans = sorted(normal_cohort.glob("normal_*.nii.gz"))
        train_model([normal_cohort], folder / "tiny.cradl", TrainConfig(**TINY_RECIPE), device="cpu", resume=False,
                    scans=scans, masks=label_masks(scans))

    return made_once(tmp_path_factory, "model", train) / "tiny.cradl"


@pytest.fixture(scope="session")
def tiny_detector(tiny_model):
    from cradl import AnomalyDetector

    return AnomalyDetector.load(tiny_model, device="cpu")


@pytest.fixture(scope="session")
def sample_case(tmp_path_factory):
    """A held-out synthetic normal scan with a 30 mm tumour-like lesion: (image path, mask image, normal image)."""
    from cradl.synthetic.lesions import insert_anomaly
    from cradl.synthetic.scans import make_normal_scan

    rng = np.random.default_rng(2024)
    normal, labels = make_normal_scan(rng, contrast="t1")
    abnormal, lesion = insert_anomaly(normal, labels, "tumour", 30.0, rng, contrast="t1")
    folder = tmp_path_factory.mktemp("case")
    sitk.WriteImage(abnormal, str(folder / "abnormal.nii.gz"))
    sitk.WriteImage(normal, str(folder / "normal.nii.gz"))
    return folder / "abnormal.nii.gz", lesion, folder / "normal.nii.gz"
