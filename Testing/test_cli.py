"""`python -m cradl`: exit status 0 on success, 2 with one clear line on bad input, no partial files,
inputs never modified, batch mode carries on past a bad scan."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch


def cradl(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "cradl", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def assert_clean_failure(run, out_dir, expected):
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], run.stderr
    assert "Traceback" not in run.stderr
    leftovers = [p.name for p in out_dir.iterdir()]
    assert leftovers == [], f"partial output left behind: {leftovers}"


def test_detect_writes_heatmap_report_and_png(tiny_model, sample_case, tmp_path):
    scan = sample_case[0]
    before = digest(scan)
    run = cradl("detect", scan, "--model", tiny_model, "--heatmap", tmp_path / "h.nii.gz",
                "--report", tmp_path / "r.json", "--png", tmp_path / "q.png", "--quiet")
    assert run.returncode == 0, run.stderr
    assert digest(scan) == before, "the input was modified"
    heatmap, image = sitk.ReadImage(str(tmp_path / "h.nii.gz")), sitk.ReadImage(str(scan))
    assert heatmap.GetSize() == image.GetSize() and np.allclose(heatmap.GetOrigin(), image.GetOrigin())
    report = json.loads((tmp_path / "r.json").read_text())
    assert {"volume_score", "volume_percentile", "slice_scores", "regions", "model"} <= set(report)
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "percentile" in run.stdout and ("region 1" in run.stdout or "no region above" in run.stdout)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.nii.gz", "q.png", "r.json"]


def test_scores_only(tiny_model, sample_case, tmp_path):
    run = cradl("detect", sample_case[2], "--model", tiny_model, "--report", tmp_path / "r.json", "--no-heatmap",
                "--quiet")
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "r.json").read_text())["regions"] == []


def _scan(array):
    """An image large enough to pass the brain-size checks (64 mm along each axis)."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.0, 2.0, 2.0))
    return image


def _bad_inputs(tmp_path):
    text = tmp_path / "inputs" / "notes.nii.gz"
    text.parent.mkdir()
    text.write_text("not an image")
    flat = tmp_path / "inputs" / "flat.nii.gz"
    sitk.WriteImage(_scan(np.ones((32, 32, 32), np.float32)), str(flat))
    two_d = tmp_path / "inputs" / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(64, 64).astype(np.float32)), str(two_d))
    four_d = tmp_path / "inputs" / "series.nii.gz"
    vol = sitk.GetImageFromArray(np.random.rand(20, 20, 20).astype(np.float32))
    sitk.WriteImage(sitk.JoinSeries([vol, vol]), str(four_d))
    nan = tmp_path / "inputs" / "nan.nrrd"
    array = np.random.rand(32, 32, 32).astype(np.float32)
    array[5, 5, 5] = np.nan
    sitk.WriteImage(_scan(array), str(nan))
    return {"missing": (tmp_path / "inputs" / "none.nii.gz", "not found"), "text": (text, "not a readable image"),
            "constant": (flat, "constant"), "2d": (two_d, "3D volume"), "4d": (four_d, "4D"),
            "nan": (nan, "NaN")}


@pytest.mark.parametrize("case", ["missing", "text", "constant", "2d", "4d", "nan"])
def test_bad_input_exits_2_with_one_line_and_no_output(tiny_model, tmp_path, case):
    path, expected = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    out.mkdir()
    run = cradl("detect", path, "--model", tiny_model, "--heatmap", out / "h.nii.gz", "--report", out / "r.json")
    assert_clean_failure(run, out, expected)


@pytest.mark.parametrize("model_content, expected", [(b"garbage", "not a CRADL model bundle"),
                                                     (None, "not found")])
def test_bad_model_exits_2(sample_case, tmp_path, model_content, expected):
    model = tmp_path / "model.cradl"
    if model_content is not None:
        model.write_bytes(model_content)
    out = tmp_path / "out"
    out.mkdir()
    run = cradl("detect", sample_case[0], "--model", model, "--heatmap", out / "h.nii.gz")
    assert_clean_failure(run, out, expected)


def test_tampered_model_exits_2(tiny_model, sample_case, tmp_path):
    data = bytearray(tiny_model.read_bytes())
    data[len(data) // 2] ^= 0x5A
    model = tmp_path / "tampered.cradl"
    model.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    run = cradl("detect", sample_case[0], "--model", model, "--report", out / "r.json")
    assert_clean_failure(run, out, "cradl: error")


def test_unwritable_output_exits_2_before_any_work(tiny_model, sample_case, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    run = cradl("detect", sample_case[0], "--model", tiny_model, "--heatmap", out / "no" / "such" / "h.nii.gz",
                "--report", out / "r.json")
    assert_clean_failure(run, out, "does not exist")


def test_usage_errors_exit_2(tmp_path):
    assert cradl("detect").returncode == 2
    run = cradl("detect", tmp_path)
    assert run.returncode == 2 and "holds no scans" in run.stderr
    assert cradl("frobnicate").returncode == 2


def test_help_explains_every_subcommand():
    run = cradl("--help")
    assert run.returncode == 0
    for command in ("detect", "train", "synth-normals", "synth-anomalies"):
        assert command in run.stdout
        assert cradl(command, "--help").returncode == 0


@pytest.mark.integration
def test_batch_mode_carries_on_past_a_bad_scan_and_reports_it(tiny_model, sample_case, tmp_path):
    inputs = tmp_path / "scans"
    inputs.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(sample_case[0])), str(inputs / "a.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(str(sample_case[2])), str(inputs / "b.nrrd"))
    (inputs / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    out = tmp_path / "results"
    run = cradl("detect", inputs, "--model", tiny_model, "--out-dir", out, "--quiet")
    assert run.returncode == 2
    assert "broken.nii.gz" in run.stderr and "1 scan(s) failed" in run.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["a_anomaly_heatmap.nii.gz", "a_anomaly_quicklook.png", "a_anomaly_report.json",
                     "b_anomaly_heatmap.nii.gz", "b_anomaly_quicklook.png", "b_anomaly_report.json"]


def test_batch_outputs_of_same_named_scans_do_not_overwrite_each_other():
    from pathlib import Path

    from cradl.outputs import unique_stems as _unique_stems

    paths = [Path("site1/scan.nii.gz"), Path("site1/scan.nrrd"), Path("other.mha"), Path("site2/scan.mha"),
             Path("site1/scan_2.nii.gz")]
    assert _unique_stems(paths) == ["scan", "scan_nrrd", "other", "scan_mha", "scan_2"]
    assert _unique_stems([Path("a/scan.nii.gz"), Path("b/scan.nii.gz")]) == ["scan", "scan_nii_gz"]
    assert _unique_stems([Path("a/s.nii"), Path("b/s.nii"), Path("c/s.nii")]) == ["s", "s_nii", "c_s"]


def _folder_of(paths, folder):
    folder.mkdir()
    for path in paths:
        (folder / path.name).symlink_to(path)
    return folder


@pytest.mark.integration
def test_calibrate_rederives_normal_statistics_and_keeps_the_weights(tiny_model, normal_cohort, tmp_path):
    from cradl.bundle import load_bundle
    from cradl.train.trainer import config_from_manifest

    normals = _folder_of(sorted(normal_cohort.glob("normal_*.nii.gz"))[:4], tmp_path / "site_normals")
    out = tmp_path / "site.cradl"
    run = cradl("calibrate", "--model", tiny_model, "--normal", normals, "--out", out, "--smoothing", "2", "1",
                "--slice-weighting", "0", "--false-alarm-quantile", "0.8", "--quiet")
    assert run.returncode == 0, run.stderr
    assert "aligning" not in run.stderr and "calibrating" not in run.stderr  # --quiet: no progress bars
    before, after = load_bundle(tiny_model), load_bundle(out)
    x = torch.rand(2, 1, 64, 64)
    assert torch.equal(before.encoder(x), after.encoder(x))
    assert after.manifest.localization["gaussian_sigma_px"] == 2.0
    assert after.manifest.localization["gaussian_sigma_z_px"] == 1.0
    assert after.manifest.localization["slice_weight_z_scale"] == 0.0
    assert after.manifest.localization["attribution"] == "gradient" and after.normal_mean is None  # the model's
    assert after.manifest.calibration["n_scans"] == 4  # every scan is a percentile reference
    assert after.manifest.calibration["false_alarm_quantile"] == 0.8
    assert config_from_manifest(after.manifest).false_alarm_quantile == 0.8  # a later recalibration keeps it
    assert after.manifest.calibration["heatmap_scale"] != before.manifest.calibration["heatmap_scale"]
    assert after.manifest.recalibrations[-1]["n_scans"] == 4


def test_calibrate_refuses_a_normal_mean_over_mixed_contrasts_without_writing(tiny_model, normal_cohort, tmp_path):
    normals = _folder_of(sorted(normal_cohort.glob("normal_*.nii.gz"))[:4], tmp_path / "t1_t2_flair")
    out = tmp_path / "site.cradl"
    run = cradl("calibrate", "--model", tiny_model, "--normal", normals, "--out", out,
                "--attribution", "gradient_x_deviation", "--quiet")
    assert run.returncode == 2 and "share one contrast" in run.stderr and "Traceback" not in run.stderr
    assert "normal_00" in run.stderr and not out.exists()  # names the odd scan


def test_training_on_mixed_contrasts_with_the_deviation_heatmap_is_refused_before_training(normal_cohort, tmp_path):
    # five scans, the fewest training takes: its 4 validation and calibration scans hold 2 contrasts at least
    normals = _folder_of(sorted(normal_cohort.glob("normal_*.nii.gz"))[:5], tmp_path / "t1_t2_flair")
    out = tmp_path / "m.cradl"
    run = cradl("train", "--normal", normals, "--out", out, "--epochs", "1", "--slice-size", "32",
                "--spacing", "6", "--width", "4", "--feature-dim", "8", "--components", "1", "--quiet")
    assert run.returncode == 2 and "share one contrast" in run.stderr and "--attribution gradient" in run.stderr
    assert "SimCLR" not in run.stderr and not out.exists() and not out.with_suffix(".ckpt").exists()


def test_calibrate_refuses_too_few_scans_without_writing(tiny_model, normal_cohort, tmp_path):
    normals = _folder_of(sorted(normal_cohort.glob("normal_*.nii.gz"))[:3], tmp_path / "few")
    out = tmp_path / "site.cradl"
    run = cradl("calibrate", "--model", tiny_model, "--normal", normals, "--out", out)
    assert run.returncode == 2 and "at least 4" in run.stderr and not out.exists()


@pytest.mark.integration
def test_quiet_training_keeps_the_console_clean_and_the_log_complete(normal_cohort, tmp_path):
    normals = _folder_of(sorted(normal_cohort.glob("normal_*.nii.gz"))[:6], tmp_path / "normals")
    out, log = tmp_path / "m.cradl", tmp_path / "train.log"
    run = cradl("train", "--normal", normals, "--out", out, "--epochs", "2", "--slice-size", "32", "--spacing", "6",
                "--width", "4", "--feature-dim", "8", "--components", "1", "2", "--batch-size", "32",
                "--attribution", "gradient", "--quiet", "--log", log)  # the cohort mixes contrasts
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip() == "" and out.is_file()
    assert "epoch 1/2" in log.read_text() and "epoch 2/2" in log.read_text()


def test_help_and_info_import_neither_torch_nor_resource():
    """The parser (every subcommand's) and `cradl info` start without torch or the Unix-only `resource`."""
    code = """if True:
        import sys
        from cradl.cli import build_parser, main
        try:
            build_parser().parse_args(["--help"])
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        for command in ("train", "benchmark-speed", "evaluate", "detect"):
            try:
                build_parser().parse_args([command, "--help"])
            except SystemExit as exc:
                assert exc.code == 0, exc.code
        assert main(["info"]) == 0
        loaded = [name for name in ("torch", "resource") if name in sys.modules]
        assert not loaded, loaded
    """
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "usage: cradl" in run.stdout and '"fingerprint": "sha256:' in run.stdout


def test_train_options_not_given_take_the_recipe_defaults():
    from cradl.cli import _train_config, build_parser
    from cradl.train.trainer import TrainConfig

    parse = build_parser().parse_args
    assert _train_config(parse(["train", "--normal", "n", "--out", "m.cradl"])) == TrainConfig()
    given = _train_config(parse(["train", "--normal", "n", "--out", "m.cradl", "--epochs", "3", "--components", "1",
                                 "2", "--geometry", "strong", "--description", "d"]))
    assert given == TrainConfig(epochs=3, gmm_components=(1, 2), geometry="strong", description="d")


def test_bias_correction_is_off_for_train_unless_asked_and_on_for_the_default_recipe():
    """`train` on a user's scans corrects bias fields only with --bias-correction n4; `train-real`, the
    default model's recipe, corrects them unless told not to. The setting travels in the normalisation."""
    from cradl.cli import _train_config, build_parser

    parse = build_parser().parse_args
    plain = _train_config(parse(["train", "--normal", "n", "--out", "m.cradl"]))
    corrected = _train_config(parse(["train", "--normal", "n", "--out", "m.cradl", "--bias-correction", "n4"]))
    assert "bias_correction" not in plain.normalisation
    assert corrected.normalisation == {**plain.normalisation, "bias_correction": "n4"}
    assert parse(["train-real", "--out", "m.cradl"]).bias_correction == "n4"
    assert parse(["train-real", "--out", "m.cradl", "--bias-correction", "none"]).bias_correction == "none"
