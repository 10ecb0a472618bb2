"""Issue 11 from the command line: an output never replaces an input, a failed write never leaves a file,
every user-caused failure is exit 2 with one line (library messages captured), a batch reports every
failure and goes on."""
from __future__ import annotations

import hashlib
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk


def cradl(*args, cwd=None, fsize=None, timeout=600):
    env = dict(os.environ, PYTHONWARNINGS="ignore")

    def limit():  # `ulimit -f`: writes past it fail with EFBIG (Python ignores SIGXFSZ)
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return subprocess.run([sys.executable, "-m", "cradl", *map(str, args)], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", cwd=cwd, env=env, timeout=timeout, preexec_fn=limit)


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def one_line_exit_2(run, expected=""):
    assert run.returncode == 2, (run.returncode, run.stderr)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], run.stderr
    return lines[0]


def small_scan(path, shape=(40, 48, 48), spacing=(2.0, 2.0, 2.0)):
    image = sitk.GetImageFromArray(np.random.default_rng(0).uniform(0, 100, shape).astype(np.float32))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


# ---------------------------------------------------------------- data loss (items 1-4, 7)

@pytest.mark.parametrize("how", ["heatmap", "report", "png", "dotted", "symlink", "hardlink", "mask"])
def test_an_output_that_names_an_input_is_refused_before_any_work(tmp_path, how):
    """Item 1: the input (however spelled: d/../d/./in, through a symlink, a hard link) or the mask."""
    d = tmp_path / "d"
    d.mkdir()
    scan = small_scan(d / "in.nii.gz")
    mask = small_scan(d / "mask.nii.gz")
    before = digest(scan), digest(mask)
    given, target = scan, scan
    if how == "symlink":
        given = d / "link.nii.gz"
        given.symlink_to(scan)
    if how == "hardlink":
        target = d / "hard.nii.gz"
        os.link(scan, target)
    if how == "dotted":
        target = Path(f"{d}/../d/./in.nii.gz")
    args = ["detect", given, "--mask", mask]
    flag = {"report": "--report", "png": "--png"}.get(how, "--heatmap")
    args += [flag, mask if how == "mask" else target]
    line = one_line_exit_2(cradl(*args), "it would be overwritten")
    assert (digest(scan), digest(mask)) == before
    assert sorted(p.name for p in d.iterdir()) == sorted(["in.nii.gz", "mask.nii.gz"] + (
        ["link.nii.gz"] if how == "symlink" else ["hard.nii.gz"] if how == "hardlink" else [])), line


def test_the_model_is_never_an_output(tmp_path):
    scan = small_scan(tmp_path / "in.nii.gz")
    model = tmp_path / "m.cradl"
    model.write_bytes(b"not read")
    one_line_exit_2(cradl("detect", scan, "--model", model, "--report", model), "it would be overwritten")
    assert model.read_bytes() == b"not read"


def test_two_outputs_with_one_name_are_refused(tmp_path):
    """Item 2: --heatmap X --report X lost the heatmap."""
    scan = small_scan(tmp_path / "in.nii.gz")
    one_line_exit_2(cradl("detect", scan, "--heatmap", tmp_path / "x", "--report", tmp_path / "x"),
                    "name the same file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nii.gz"]


def test_an_output_naming_a_folder_is_refused_before_any_work(tmp_path):
    """Item 7: --report naming a folder failed after the heatmap had been written."""
    scan = small_scan(tmp_path / "in.nii.gz")
    (tmp_path / "r").mkdir()
    one_line_exit_2(cradl("detect", scan, "--heatmap", tmp_path / "h.nii.gz", "--report", tmp_path / "r"),
                    "it is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nii.gz", "r"]


def test_out_dir_naming_a_file_is_refused(tmp_path):
    scan = small_scan(tmp_path / "in.nii.gz")
    (tmp_path / "results").write_text("a file")
    one_line_exit_2(cradl("detect", scan, "--out-dir", tmp_path / "results"), "is a file, not a folder")


def test_batch_names_cannot_collide_with_each_other_or_with_inputs(tmp_path):
    """Items 1 and 3: scan.nii.gz, scan.nrrd and scan_2.nii.gz gave two result sets for three scans; an
    input named a_anomaly_heatmap.nii.gz beside a.nii.gz was replaced by a's heatmap."""
    from cradl.outputs import CLI_KINDS, batch_plan, protected_files

    names = ["scan.nii.gz", "scan.nrrd", "scan_2.nii.gz", "a.nii.gz", "a_anomaly_heatmap.nii.gz",
             "A_anomaly_report.json.nii.gz"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    paths = [tmp_path / n for n in names]
    plan = batch_plan(paths, tmp_path, CLI_KINDS, protected_files([("input", p) for p in paths]))
    outputs = [o.name.lower() for entry in plan for o in entry.values()]
    assert len(outputs) == len(set(outputs)) == 3 * len(names)
    assert not set(outputs) & {n.lower() for n in names}
    assert plan[0]["report"].name == "scan_anomaly_report.json"
    assert plan[2]["report"].name == "scan_2_anomaly_report.json"


@pytest.mark.integration
def test_batch_over_its_own_output_folder_keeps_every_input(tiny_model, sample_case, tmp_path):
    """Item 1 (batch): `detect o --out-dir o` where o holds a.nii.gz and a_anomaly_heatmap.nii.gz."""
    o = tmp_path / "o"
    o.mkdir()
    shutil.copy(sample_case[0], o / "a.nii.gz")
    shutil.copy(sample_case[2], o / "a_anomaly_heatmap.nii.gz")
    before = digest(o / "a_anomaly_heatmap.nii.gz")
    run = cradl("detect", o, "--out-dir", o, "--model", tiny_model, "--quiet", "--no-heatmap")
    assert run.returncode == 0, run.stderr
    assert digest(o / "a_anomaly_heatmap.nii.gz") == before
    assert "2 of 2 scans done" in run.stdout
    reports = sorted(p.name for p in o.glob("*_anomaly_report.json"))
    assert len(reports) == 2, reports


def test_train_log_or_out_naming_a_normal_scan_is_refused(tmp_path):
    """Item 4: --log pointing at a normal scan appended log text to it."""
    normals = tmp_path / "normals"
    normals.mkdir()
    scans = [small_scan(normals / f"n{i}.nii.gz") for i in range(2)]
    before = digest(scans[0])
    one_line_exit_2(cradl("train", "--normal", normals, "--out", tmp_path / "m.cradl", "--log", scans[0]),
                    "it would be overwritten")
    assert digest(scans[0]) == before
    one_line_exit_2(cradl("train", "--normal", normals, "--out", tmp_path / "m.cradl", "--log", normals),
                    "it is a folder")


def test_calibrate_out_naming_its_model_is_refused(tmp_path):
    normals = tmp_path / "normals"
    normals.mkdir()
    small_scan(normals / "n.nii.gz")
    model = tmp_path / "m.cradl"
    model.write_bytes(b"model")
    one_line_exit_2(cradl("calibrate", "--normal", normals, "--model", model, "--out", model),
                    "it would be overwritten")
    assert model.read_bytes() == b"model"


def test_a_pickle_in_the_resume_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    normals = tmp_path / "normals"
    normals.mkdir()
    small_scan(normals / "n.nii.gz")
    (tmp_path / "m.ckpt").write_bytes(pickle.dumps({"encoder": Payload()}))
    one_line_exit_2(cradl("train", "--normal", normals, "--out", tmp_path / "m.cradl"), "--no-resume")
    assert not marker.exists()


# ---------------------------------------------------------------- half-written results (items 5-7)

def test_a_full_disk_leaves_no_file_and_exits_2_with_one_line(tiny_model, sample_case, tmp_path):
    """Item 5: with `ulimit -f` the heatmap was kept truncated (exit 0), the report failed with exit 1."""
    out = tmp_path / "out"
    out.mkdir()
    run = cradl("detect", sample_case[0], "--model", tiny_model, "--heatmap", out / "h.nii.gz",
                "--report", out / "r.json", "--png", out / "q.png", "--quiet", fsize=64 * 1024)
    one_line_exit_2(run, "h.nii.gz")
    assert list(out.iterdir()) == []


@pytest.mark.integration
def test_a_full_disk_in_batch_mode_reports_each_scan_and_goes_on(tiny_model, sample_case, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        shutil.copy(sample_case[0], inputs / name)
    out = tmp_path / "out"
    run = cradl("detect", inputs, "--out-dir", out, "--model", tiny_model, "--quiet", fsize=64 * 1024)
    assert run.returncode == 2, run.stderr
    assert "2 scan(s) failed" in run.stderr and "a.nii.gz" in run.stderr and "b.nii.gz" in run.stderr
    assert "internal error" not in run.stderr and "Traceback" not in run.stderr
    assert list(out.iterdir()) == []


def test_sigterm_removes_temporaries_as_sigint_does(tiny_model, sample_case, tmp_path, monkeypatch):
    """Item 6: SIGTERM while a temporary file exists left hidden 0-byte temporaries."""
    import cradl.quicklook
    from cradl.cli import EXIT_TERMINATED, main

    out = tmp_path / "out"
    out.mkdir()
    seen = []

    def terminated_while_writing(image, heatmap, path, *args, **kwargs):
        seen.extend(p.name for p in out.iterdir())  # the heatmap's and the PNG's temporaries exist now
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cradl.quicklook, "write_quicklook", terminated_while_writing)
    status = main(["detect", str(sample_case[0]), "--model", str(tiny_model), "--heatmap", str(out / "h.nii.gz"),
                   "--png", str(out / "q.png"), "--quiet"])
    assert status == EXIT_TERMINATED
    assert len(seen) == 2 and all(name.startswith(".") for name in seen)
    assert list(out.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_a_250_byte_output_name_is_written(tiny_model, sample_case, tmp_path):
    """The temporary name used to be longer than the file system allows."""
    from cradl.cli import EXIT_OK, main

    name = "r" * 245 + ".json"
    assert main(["detect", str(sample_case[2]), "--model", str(tiny_model), "--report", str(tmp_path / name),
                 "--no-heatmap", "--quiet"]) == EXIT_OK  # in this process: its brain mask is reused
    assert [p.name for p in tmp_path.iterdir()] == [name]
    one_line_exit_2(cradl("detect", sample_case[2], "--report", tmp_path / ("r" * 300 + ".json")),
                    "file name too long")


# ---------------------------------------------------------------- contract: exit 2, one line

def test_bad_scans_exit_2_with_one_line_and_library_messages_captured(tiny_model, tmp_path):
    """A sheared direction made ITK print warnings; a complex image and a DICOM folder with a gap gave exit 1
    or several lines; a FIFO hung."""
    from test_io import _dicom_series

    sheared = sitk.GetImageFromArray(np.random.default_rng(0).uniform(0, 100, (40, 48, 48)).astype(np.float32))
    sheared.SetSpacing((2.0, 2.0, 2.0))
    sheared.SetDirection([1, 0.08, 0, 0, 1, 0, 0, 0, 1])
    sitk.WriteImage(sheared, str(tmp_path / "sheared.mha"))  # NIfTI would store it orthonormalised
    complex_ = sitk.GetImageFromArray(np.ones((40, 48, 48), np.complex64))
    sitk.WriteImage(complex_, str(tmp_path / "complex.nii"))
    os.mkfifo(tmp_path / "pipe.nii.gz")
    series = _dicom_series(tmp_path / "series", drop=range(5, 35), renumber=True)
    out = tmp_path / "out"
    out.mkdir()
    for path, expected in [(tmp_path / "sheared.mha", "non-orthogonal"), (tmp_path / "complex.nii", "complex"),
                           (tmp_path / "pipe.nii.gz", "not a regular file"), (series, "unevenly spaced")]:
        run = cradl("detect", path, "--model", tiny_model, "--report", out / "r.json", timeout=120)
        one_line_exit_2(run, expected)
    assert list(out.iterdir()) == []


def test_the_api_refuses_non_images_with_an_input_error(tiny_detector):
    from cradl.errors import InputError

    for thing in (42, np.zeros((32, 32, 32), np.float32), None):
        with pytest.raises(InputError):
            tiny_detector.detect(thing)


def test_info_shows_one_fingerprint_and_refuses_a_bundle_bomb_with_one_line(tmp_path):
    """Item 14 through `cradl info` (it used to build the 10 GB network too); the fingerprint users compare."""
    import hashlib
    import json
    import zipfile

    from measure_bombs import MODEL, rewrite_bundle

    run = cradl("info")
    assert run.returncode == 0, run.stderr
    raw = zipfile.ZipFile(MODEL).read("manifest.json")
    assert json.loads(run.stdout)["fingerprint"] == "sha256:" + hashlib.sha256(raw).hexdigest()
    bomb = rewrite_bundle(MODEL, tmp_path / "bomb.cradl", edit_manifest=lambda m: m["encoder"].update(grid=400))
    one_line_exit_2(cradl("info", "--model", bomb), "encoder.grid must be an integer")


def test_a_preparation_cache_written_by_numpy_is_accepted_and_an_object_array_refused(tmp_path):
    import numpy as np

    from cradl.cli import _check_resume_files
    from cradl.errors import InputError

    out = tmp_path / "model.cradl"
    np.savez(out.with_suffix(".prep.npz"), paths=np.array(["a.nii.gz"]), v0=np.zeros((2, 3, 3), np.float16))
    _check_resume_files(out)  # a cache as cradl train writes it: resumed from
    np.savez(out.with_suffix(".prep.npz"), v0=np.array([{"x": 1}], dtype=object))
    with pytest.raises(InputError, match="preparation cache"):
        _check_resume_files(out)
