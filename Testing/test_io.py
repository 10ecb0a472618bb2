"""Reading scans: every supported format opens, every bad file is refused with one clear message."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from cradl.errors import InputError
from cradl.io import atomic_files, atomic_path, read_image, validate_image, write_json


def volume(shape=(20, 24, 22), value=None, dtype=np.float32) -> sitk.Image:
    rng = np.random.default_rng(0)
    array = rng.uniform(0, 100, shape).astype(dtype) if value is None else np.full(shape, value, dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.2, 3.0))
    image.SetOrigin((10.0, -5.0, 2.0))
    return image


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha", ".mhd"])
def test_reads_every_supported_format_with_its_geometry(tmp_path, suffix):
    image = volume(dtype=np.int16)
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(image, str(path))
    read = read_image(path)
    assert read.GetSize() == image.GetSize()
    assert np.allclose(read.GetSpacing(), image.GetSpacing())
    assert np.allclose(read.GetOrigin(), image.GetOrigin(), atol=1e-4)
    assert read.GetPixelID() == sitk.sitkFloat32


def test_reads_a_dicom_series_folder(tmp_path):
    image = sitk.Cast(volume(), sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        slice_.SetMetaData("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))))
        slice_.SetMetaData("0020|0013", str(k))
        slice_.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.42")
        slice_.SetMetaData("0008|0060", "MR")
        writer.SetFileName(str(tmp_path / f"slice{k:03d}.dcm"))
        writer.Execute(slice_)
    read = read_image(tmp_path)
    assert read.GetSize() == image.GetSize()
    assert np.allclose(sitk.GetArrayViewFromImage(read), sitk.GetArrayViewFromImage(image))


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "not found"),
    (lambda p: p.write_text("this is not an image"), "not a readable image"),
    (lambda p: sitk.WriteImage(sitk.GetImageFromArray(np.ones((30, 30), np.float32)), str(p)), "3D volume"),
    (lambda p: sitk.WriteImage(volume(value=0.0), str(p)), "empty or constant"),
    (lambda p: sitk.WriteImage(volume(value=7.0), str(p)), "empty or constant"),
])
def test_refuses_bad_files_with_a_clear_message(tmp_path, make, message):
    path = tmp_path / "bad.nii.gz"
    make(path)
    with pytest.raises(InputError, match=message):
        read_image(path)


def test_refuses_a_4d_series(tmp_path):
    path = tmp_path / "fmri.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([volume(), volume()]), str(path))
    with pytest.raises(InputError, match="4D"):
        read_image(path)


def test_refuses_a_truncated_gzip_file(tmp_path):
    path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(volume((60, 60, 60)), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated"):
        read_image(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_refuses_non_finite_voxels(tmp_path, bad):
    array = sitk.GetArrayFromImage(volume())
    array[3, 4, 5] = bad
    path = tmp_path / "scan.nrrd"  # NRRD keeps inf (NIfTI readers turn it finite)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    with pytest.raises(InputError, match="NaN or infinite"):
        read_image(path)


def test_refuses_vector_images():
    with pytest.raises(InputError, match="components"):
        validate_image(sitk.Compose([volume(), volume()]))


def test_odd_but_valid_geometry_is_accepted():
    image = volume()
    image.SetDirection([0, 0, 1, 1, 0, 0, 0, -1, 0])  # sagittal-first, flipped
    image.SetSpacing((0.4, 2.5, 6.0))
    assert validate_image(image).GetDirection() == image.GetDirection()


def test_atomic_writes_leave_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    write_json({"a": 1}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_written_files_get_ordinary_permissions(tmp_path):
    import os

    target = tmp_path / "report.json"
    write_json({"a": 1}, target)
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_set_of_outputs_is_written_all_or_nothing(tmp_path):
    (tmp_path / "report.json").write_text("earlier run")
    with pytest.raises(RuntimeError):
        with atomic_files() as files:
            write_json({"new": 1}, files.path(tmp_path / "report.json"))
            files.path(tmp_path / "heat.nii.gz").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    assert (tmp_path / "report.json").read_text() == "earlier run"
    with atomic_files() as files:
        write_json({"new": 1}, files.path(tmp_path / "report.json"))
        files.path(tmp_path / "heat.nii.gz").write_bytes(b"whole")
        files.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.nii.gz", "report.json"]
    assert json.loads((tmp_path / "report.json").read_text()) == {"new": 1}
