"""`cradl train ... --nproc 2`: SimCLR on PyTorch DistributedDataParallel with 2 CPU processes (gloo) on a
small real cohort from the project's generator; rank 0 writes the checkpoint and the bundle; resumable."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import TINY_RECIPE

pytestmark = pytest.mark.integration  # a real cluster / process group: CI runs it with -m integration


def train(cohort, out, *extra):
    r = TINY_RECIPE
    args = ["train", "--normal", cohort, "--out", out, "--slice-size", r["slice_size"], "--spacing", r["spacing_mm"],
            "--width", r["width"], "--feature-dim", r["feature_dim"], "--grid", r["grid"], "--geometry", r["geometry"],
            "--batch-size", 32, "--learning-rate", r["learning_rate"], "--components", 1, 2, "--epochs", 2,
            "--attribution", r["localization"]["attribution"], "--name", "cradl-ddp-test", "--version", "0.0.1", *extra]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "cradl", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=900)


@pytest.fixture(scope="module")
def small_cohort(normal_cohort, tmp_path_factory):
    """Five normal scans: the fewest a training split accepts (1 training, 2 validation, 2 calibration)."""
    folder = tmp_path_factory.mktemp("ddp_normals")
    for scan in sorted(normal_cohort.glob("*.nii.gz"))[:5]:
        shutil.copy(scan, folder / scan.name)
    return folder


@pytest.fixture(scope="module")
def ddp_model(small_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "ddp.cradl"
    run = train(small_cohort, out, "--nproc", 2, "--log", out.with_suffix(".log"))
    return run, out


def test_two_processes_train_a_bundle_that_detects(ddp_model, small_cohort):
    from cradl import AnomalyDetector
    from cradl.bundle import load_bundle

    run, out = ddp_model
    assert run.returncode == 0, run.stderr
    assert run.stdout.count(f"wrote {out}") == 1  # rank 0 alone reports and writes
    training = load_bundle(out).manifest.training
    assert training["distributed"]["processes"] == 2 and training["distributed"]["backend"] == "gloo"
    assert len(training["loss_per_epoch"]) == 2
    state = torch.load(out.with_suffix(".ckpt"), weights_only=True)
    assert state["processes"] == 2 and state["epoch"] == 1 and state["history"] == training["loss_per_epoch"]
    log = out.with_suffix(".log").read_text()
    assert "epoch 1/2" in log and "epoch 2/2" in log and "(2 processes)" in log
    result = AnomalyDetector.load(out, device="cpu").detect(sorted(small_cohort.iterdir())[0], heatmap=False)
    assert result.volume_score == result.volume_score  # finite, scored


def test_an_interrupted_two_process_run_resumes_from_its_checkpoint(ddp_model, small_cohort, tmp_path):
    run, first = ddp_model
    assert run.returncode == 0, run.stderr
    out = tmp_path / "ddp.cradl"
    # the state a run killed after its first epoch leaves: a checkpoint at epoch 1 of 2
    state = torch.load(first.with_suffix(".ckpt"), weights_only=True)
    state.update(epoch=0, history=state["history"][:1])
    steps = state["steps_per_epoch"]
    state["schedule"].update(last_epoch=steps, _step_count=steps + 1)  # the learning-rate schedule one epoch in
    torch.save(state, out.with_suffix(".ckpt"))
    run = train(small_cohort, out, "--nproc", 2)
    assert run.returncode == 0, run.stderr
    assert "resuming from" in run.stderr and "at epoch 2" in run.stderr
    from cradl.bundle import load_bundle

    history = load_bundle(out).manifest.training["loss_per_epoch"]
    assert len(history) == 2 and history[0] == state["history"][0]


def test_bad_nproc_is_refused_with_one_line(small_cohort, tmp_path):
    run = train(small_cohort, tmp_path / "m.cradl", "--nproc", 0)
    assert run.returncode == 2 and run.stderr.strip() == "cradl: error: --nproc must be at least 1"
