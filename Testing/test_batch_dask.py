"""Batch detection on Dask (`cradl detect ... --out-dir D --workers N | --scheduler ADDRESS`): a real local
cluster of worker processes and the tiny test model; resume, failures, summary and worker-count independence."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytestmark = pytest.mark.integration  # a real cluster / process group: CI runs it with -m integration


def cradl(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "cradl", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def rows_of(out_dir):
    with open(out_dir / "summary.csv", newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="module")
def inputs(sample_case, tmp_path_factory):
    """Two real scans (a normal one, one with a 30 mm lesion) and one unreadable file."""
    folder = tmp_path_factory.mktemp("batch_in")
    shutil.copy(sample_case[2], folder / "a_normal.nii.gz")
    shutil.copy(sample_case[0], folder / "b_lesion.nii.gz")
    (folder / "c_broken.nii.gz").write_bytes(b"not an image")
    return folder


@pytest.fixture(scope="module")
def two_worker_run(inputs, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch_out2")
    run = cradl("detect", inputs, "--out-dir", out, "--model", tiny_model, "--workers", 2, "--quiet")
    return run, out


def test_two_workers_write_every_output_and_a_summary_row_per_input(two_worker_run, inputs):
    run, out = two_worker_run
    assert run.returncode == 2, run.stderr  # one scan failed: the batch went on and says so
    assert "c_broken.nii.gz" in run.stderr and "Traceback" not in run.stderr
    rows = rows_of(out)
    assert [r["name"] for r in rows] == ["a_normal.nii.gz", "b_lesion.nii.gz", "c_broken.nii.gz"]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert "cannot read" in rows[2]["error"] and rows[2]["report"] == ""
    for row in rows[:2]:
        report = json.loads(Path(row["report"]).read_text())
        assert float(row["volume_score"]) == pytest.approx(report["volume_score"])
        assert float(row["volume_percentile"]) == pytest.approx(report["volume_percentile"])
        assert int(row["n_regions"]) == len(report["regions"])
        assert row["interpretation"] == report["interpretation"]
        assert float(row["t_total_s"]) > 0 and float(row["t_align_s"]) > 0 and float(row["worker_peak_rss_mib"]) > 0
        heatmap, image = sitk.ReadImage(row["heatmap"]), sitk.ReadImage(str(inputs / row["name"]))
        assert heatmap.GetSize() == image.GetSize()
        assert Path(row["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"ok": 2, "failed": 1, "reused": 0} and len(summary["rows"]) == 3
    assert (out / "worklist.html").is_file()
    # nothing half-written or temporary is left beside the outputs
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".cradl-done"]


@pytest.mark.slow
def test_one_worker_loads_the_model_once_and_gives_the_same_results(two_worker_run, inputs, tiny_model, tmp_path):
    _, out2 = two_worker_run
    run = cradl("detect", inputs / "a_normal.nii.gz", inputs / "b_lesion.nii.gz", "--out-dir", tmp_path,
                "--model", tiny_model, "--workers", 1, "--quiet")
    assert run.returncode == 0, run.stderr
    rows1, rows2 = rows_of(tmp_path), rows_of(out2)[:2]
    assert rows1[0]["worker"] == rows1[1]["worker"]  # one worker did both scans ...
    assert [r["worker_model_loads"] for r in rows1] == ["1", "1"]  # ... and loaded the model once
    for r1, r2 in zip(rows1, rows2):
        # 1 worker uses 2 torch threads, 2 workers 1 each: sums run in another order, nothing else differs
        assert float(r1["volume_score"]) == pytest.approx(float(r2["volume_score"]), abs=1e-3)
        assert r1["n_regions"] == r2["n_regions"]
        h1 = sitk.GetArrayFromImage(sitk.ReadImage(r1["heatmap"]))
        h2 = sitk.GetArrayFromImage(sitk.ReadImage(r2["heatmap"]))
        assert np.abs(h1 - h2).max() <= 1e-3 * max(float(h2.max()), 1.0)


def test_rerun_skips_finished_scans_and_redoes_half_written_ones(two_worker_run, inputs, tiny_model, tmp_path):
    _, first = two_worker_run
    out = tmp_path / "out"
    shutil.copytree(first, out)
    a_report = out / "a_normal_anomaly_report.json"
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}

    run = cradl("detect", inputs, "--out-dir", out, "--model", tiny_model, "--workers", 2, "--quiet")
    assert run.returncode == 2 and "c_broken.nii.gz" in run.stderr
    rows = rows_of(out)
    assert [r["reused"] for r in rows] == ["yes", "yes", "no"]
    assert all(p.stat().st_mtime_ns == mtimes[p.name] for p in out.iterdir() if p.name.startswith(("a_", "b_")))

    # a crash half-way: b's heatmap truncated, a's completion record never written, a temporary left behind
    heatmap = out / "b_lesion_anomaly_heatmap.nii.gz"
    heatmap.write_bytes(heatmap.read_bytes()[:1000])
    (out / ".cradl-done" / a_report.name).unlink()
    (out / ".cradl-done" / ".a_normal_anomaly_report-abcd1234.json").write_bytes(b'{"vers')  # its killed write
    (out / ".b_lesion_anomaly_heatmap-abcd1234.nii.gz").write_bytes(b"partial")
    from cradl.batch.runner import completion_records

    assert [p.name for p in completion_records(out)] == ["b_lesion_anomaly_report.json"]
    run = cradl("detect", inputs, "--out-dir", out, "--model", tiny_model, "--workers", 2, "--quiet")
    assert run.returncode == 2
    rows = rows_of(out)
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert [r["reused"] for r in rows] == ["no", "no", "no"]
    assert sitk.ReadImage(str(heatmap)).GetSize() == sitk.ReadImage(str(inputs / "b_lesion.nii.gz")).GetSize()
    assert not (out / ".b_lesion_anomaly_heatmap-abcd1234.nii.gz").exists()
    assert not (out / ".cradl-done" / ".a_normal_anomaly_report-abcd1234.json").exists()
    # and a third run has nothing left to do
    run = cradl("detect", inputs / "a_normal.nii.gz", inputs / "b_lesion.nii.gz", "--out-dir", out,
                "--model", tiny_model, "--workers", 1, "--quiet")
    assert run.returncode == 0 and [r["reused"] for r in rows_of(out)] == ["yes", "yes"]


def test_runs_on_an_existing_cluster_given_its_scheduler_address(inputs, tmp_path):
    """The scan is unreadable, so no detection is paid for: what is checked is that the cluster's own worker
    ran it and that its failure became a summary row."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster, Client(cluster) as client:
        pids = set(client.run(os.getpid).values())
        run = cradl("detect", inputs / "c_broken.nii.gz", "--out-dir", tmp_path, "--scheduler",
                    cluster.scheduler_address, "--quiet")
    assert run.returncode == 2 and "c_broken.nii.gz" in run.stderr
    row = rows_of(tmp_path)[0]
    assert row["status"] == "failed" and int(row["worker"].rsplit(":", 1)[1]) in pids


@pytest.mark.parametrize("extra, message", [
    (["--workers", "0"], "--workers must be at least 1"),
    (["--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "not both"),
    (["--scheduler", "tcp://127.0.0.1:1"], "cannot reach the Dask scheduler"),
])
def test_bad_cluster_options_fail_with_one_line(inputs, tmp_path, extra, message):
    run = cradl("detect", inputs / "a_normal.nii.gz", "--out-dir", tmp_path / "o", *extra)
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], run.stderr


def test_cluster_options_need_batch_mode(inputs, tmp_path):
    run = cradl("detect", inputs / "a_normal.nii.gz", "--report", tmp_path / "r.json", "--workers", "2")
    assert run.returncode == 2 and "--workers and --scheduler run batch mode" in run.stderr


@pytest.mark.slow
def test_a_killed_worker_and_a_killed_run_lose_no_finished_scan(sample_case, tiny_model, tmp_path):
    """The benchmark's resume check on six scans: a worker is killed after 2 finished scans, the whole run
    (client, scheduler, workers) after 3; the rerun reuses every finished scan and completes the rest."""
    from cradl.batch.benchmark import resume_check

    scans = []
    for i in range(6):
        scans.append(tmp_path / f"s{i}.nii.gz")
        shutil.copy(sample_case[2 if i % 2 else 0], scans[-1])
    result = resume_check(scans, tmp_path / "out", str(tiny_model))
    assert result["rerun_exit_status"] == 0
    assert result["finished_scans_redone"] == 0
    assert result["rerun_reused"] == result["finished_before_rerun"] >= 3, result
    assert result["rerun_reused"] + result["rerun_computed"] == 6
    assert result["outputs_valid_after_rerun"] == 6
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".") and p.name != ".cradl-done"]
