"""Shared fixtures: small real data made by the project's own generators, and a tiny trained model.

The tiny model is trained once per test session (about half a minute on 2 CPU cores) with the same
`train_model` the CLI uses; it is small and coarse but real, so tests exercise the real pipeline.
"""
from __future__ import annotations

import locale
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _keep_the_locale():
    """SimpleITK's DICOM writer (used here to make test series) sets the C locale and leaves it, which turns
    Python's default text encoding into ASCII for every later test in the process: put it back."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    if locale.setlocale(locale.LC_ALL) != saved:
        locale.setlocale(locale.LC_ALL, saved)

TINY_RECIPE = dict(slice_size=64, spacing_mm=3.0, width=12, feature_dim=32, grid=4, geometry="light",
                   projection_dim=32, epochs=6,
                   batch_size=64, learning_rate=3e-3, gmm_components=(1, 2), min_region_mm3=200.0,
                   name="cradl-tiny-test", version="0.0.1", description="tiny model trained by the test suite")


@pytest.fixture(scope="session")
def normal_cohort(tmp_path_factory) -> Path:
    """Ten synthetic normal brains (written by the project's generator)."""
    from cradl.synthetic.sets import generate_normal_cohort

    folder = tmp_path_factory.mktemp("normals")
    generate_normal_cohort(folder, n=10, seed=11, progress=False)
    return folder


@pytest.fixture(scope="session")
def tiny_model(normal_cohort, tmp_path_factory) -> Path:
    """Path to a tiny CRADL bundle trained on `normal_cohort`."""
    from cradl.train.trainer import TrainConfig, train_model

    out = tmp_path_factory.mktemp("model") / "tiny.cradl"
    return train_model([normal_cohort], out, TrainConfig(**TINY_RECIPE), device="cpu", resume=False)


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
