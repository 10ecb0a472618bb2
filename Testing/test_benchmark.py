"""The benchmark's small configuration end to end, and the `evaluate` / `benchmark` commands."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from cradl.cli import main
from cradl.evaluate.benchmark import CONFIGS, run_benchmark
from cradl.evaluate.report import markdown_tables


@pytest.fixture(scope="module")
def small_run(tiny_model, normal_cohort, tmp_path_factory):
    """The small benchmark reusing the session's tiny model and its normal cohort (no extra CRADL training)."""
    out = tmp_path_factory.mktemp("benchmark")
    config = dataclasses.replace(CONFIGS["small"], n_boot=20, variant_heatmaps=False,
                                 vae=dict(CONFIGS["small"].vae, epochs=1))
    console = io.StringIO()
    with contextlib.redirect_stderr(console):
        results = run_benchmark(config, out, model=tiny_model, normals=normal_cohort, device="cpu", progress=False,
                                command="pytest")
    out.joinpath("console.txt").write_text(console.getvalue())
    return out, results


def _in_unit(value):
    return value is None or (isinstance(value, float) and (math.isnan(value) or 0.0 <= value <= 1.0))


@pytest.mark.integration
def test_small_benchmark_writes_every_method_and_metric(small_run):
    out, results = small_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["meta"]["n_cases"] == 4  # 2 clean + tumour + blob
    names = list(on_disk["methods"])
    assert names[0].startswith("CRADL K=") and names[0].endswith("(model)")
    assert any(n.startswith("CRADL K=") and "(model)" not in n for n in names)  # the other K
    assert any("head" in n for n in names)  # the projection-head variant (short run: no checkpoint)
    assert "Intensity z-score" in names and "VAE" in names
    for name, rep in on_disk["methods"].items():
        o = rep["overall"]
        assert o["n_abnormal"] == 2 and o["n_normal"] == 2
        assert set(rep["by_type"]) == {"tumour", "blob"}
        assert "volume_auroc" in o["ci95"]
        for value in (o["volume"]["auroc"], o["volume"]["ap"], o["slice"]["auroc"], o["slice"]["ap"]):
            assert _in_unit(value), (name, value)
        if "K=" in name and "(model)" not in name:  # CRADL variants: sample level only in this configuration
            assert "voxel" not in o
            continue
        for value in (o["voxel"]["auroc"], o["voxel"]["ap"], o["voxel"]["best_dice"], o["dice_at_threshold"],
                      o["detection_rate"]):
            assert _in_unit(value), (name, value)
        assert o["fp_regions_per_normal_scan"] >= 0
        assert "voxel_ap" in o["ci95"]
    from cradl.calibration import AGGREGATES
    assert set(on_disk["methods"][names[0]]["aggregates"]) == set(AGGREGATES)
    assert len(on_disk["cases"][0]["methods"][names[0]]["slice_scores"]) == len(on_disk["cases"][0]["slice_indices"])
    assert {t["target"].split(",")[0] for t in on_disk["targets"]} >= {"volume AUROC >= 0.85"}
    table = (out / "results.md").read_text()
    assert table == markdown_tables(results)
    assert "| Method | Volume AUROC |" in table and "Intensity z-score" in table and "VAE" in table
    for case in on_disk["cases"]:
        assert case["brain_mask"] == "tissue labels"
        if case["type"] != "normal":
            assert case["lesion_voxels"] > 0 and case["anomalous_slices"] > 0
    assert on_disk["meta"]["timings_s"]["evaluate"] > 0


@pytest.mark.integration
def test_a_quiet_benchmark_shows_no_progress_bars(small_run):
    out, _ = small_run
    console = (out / "console.txt").read_text()
    assert "it/s" not in console and "calibrating" not in console and "epoch" not in console.lower()


@pytest.mark.integration
def test_evaluate_command(small_run, tiny_model, tmp_path, capsys):
    out, _ = small_run
    # a two-case subset of the benchmark's test set (one clean, one abnormal), images referenced by absolute path
    manifest = json.loads((out / "test_set" / "manifest.json").read_text())
    cases = [next(c for c in manifest["cases"] if c["type"] == "normal"),
             next(c for c in manifest["cases"] if c["type"] != "normal")]
    for c in cases:
        c["image"] = str(out / "test_set" / c["image"])
        c["mask"] = c["mask"] and str(out / "test_set" / c["mask"])
    subset = tmp_path / "subset"
    subset.mkdir()
    (subset / "manifest.json").write_text(json.dumps(dict(manifest, cases=cases)))
    report = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(tiny_model), "--data", str(subset), "--out", str(report),
                 "--markdown", str(tmp_path / "eval.md"), "--bootstrap", "20", "--device", "cpu", "--quiet"]) == 0
    data = json.loads(report.read_text())
    assert list(data["methods"]) == [next(iter(json.loads((out / "results.json").read_text())["methods"]))]
    main_row = next(iter(data["methods"].values()))["overall"]
    bench = json.loads((out / "results.json").read_text())
    bench_row = next(iter(bench["methods"].values()))["overall"]
    # the same cases, labels and counts through both commands (scores themselves may move slightly: the
    # affine registration is multi-threaded and not bit-reproducible)
    bench_cases = {c["id"]: c for c in bench["cases"]}
    assert [c["lesion_voxels"] for c in data["cases"]] == [bench_cases[c["id"]]["lesion_voxels"] for c in cases]
    assert main_row["n_abnormal"] == 1 and main_row["n_normal"] == 1
    assert main_row["voxel"]["n_pos"] == bench_cases[cases[1]["id"]]["lesion_voxels"]
    assert bench_row["voxel"]["n_pos"] > main_row["voxel"]["n_pos"]
    assert _in_unit(main_row["volume"]["auroc"]) and _in_unit(main_row["voxel"]["ap"])
    assert "| Method |" in capsys.readouterr().out


def test_commands_refuse_bad_input(tmp_path, capsys):
    assert main(["evaluate", "--data", str(tmp_path)]) == 2
    assert "manifest.json" in capsys.readouterr().err
    assert main(["benchmark", "--out-dir", str(tmp_path), "--model", str(tmp_path / "missing.cradl")]) == 2
    with pytest.raises(SystemExit) as exit_info:  # argparse: one usage line, status 2
        main(["benchmark", "--config", "huge", "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2


def test_evaluate_names_the_case_it_cannot_score_and_writes_nothing(tiny_model, tmp_path, capsys):
    noise = sitk.GetImageFromArray(np.random.default_rng(0).random((40, 40, 40)).astype(np.float32))
    noise.SetSpacing((4.0, 4.0, 4.0))
    sitk.WriteImage(noise, str(tmp_path / "case_000.nii.gz"))
    (tmp_path / "manifest.json").write_text(json.dumps({"cases": [
        {"id": "case_000", "image": "case_000.nii.gz", "mask": None, "type": "normal", "size_mm": None}]}))
    report = tmp_path / "out.json"
    assert main(["evaluate", "--model", str(tiny_model), "--data", str(tmp_path), "--out", str(report),
                 "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "case case_000 (case_000.nii.gz)" in err and "does not resemble a brain" in err
    assert not report.exists()


def test_the_short_simclr_run_builds_the_models_own_encoder(tiny_detector):
    """The projection-head variant's short run trains an encoder shaped like the model's, pooling grid included
    (the tiny model keeps a 4 x 4 layout; a global-pooling encoder would compare unlike with like)."""
    from cradl.evaluate.baselines import fresh_encoder

    encoder, model = fresh_encoder(tiny_detector), tiny_detector.bundle.encoder
    assert (encoder.width, encoder.feature_dim, encoder.grid) == (model.width, model.feature_dim, model.grid)
    assert model.grid == 4
    shapes = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in model.state_dict().items()}
