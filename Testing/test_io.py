"""Reading scans: every supported format opens, every bad file is refused with one clear message."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from cradl.atomic import atomic_files, atomic_path
from cradl.errors import InputError, OutputError
from cradl.io import plain_json, read_image, scan_stem, validate_image, write_json


def volume(shape=(24, 40, 64), value=None, dtype=np.float32, spacing=(1.0, 1.6, 3.0)) -> sitk.Image:
    """A small scan large enough to pass the brain-size checks (64 x 64 x 72 mm)."""
    rng = np.random.default_rng(0)
    array = rng.uniform(0, 100, shape).astype(dtype) if value is None else np.full(shape, value, dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
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
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(volume())
    sitk.WriteImage(image, str(path))
    with pytest.raises(InputError, match="NaN or infinite"):
        read_image(path)


def test_refuses_vector_images():
    with pytest.raises(InputError, match="components"):
        validate_image(sitk.Compose([volume(), volume()]))


def test_odd_but_valid_geometry_is_accepted():
    image = volume()
    image.SetDirection([0, 0, 1, 1, 0, 0, 0, -1, 0])  # sagittal-first, flipped
    image.SetSpacing((1.0, 2.5, 6.0))
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


def test_a_folder_output_is_written_whole_or_not_at_all(tmp_path):
    import os

    final = tmp_path / "overlay"
    final.mkdir()
    (final / "a.dcm").write_text("earlier run")
    with pytest.raises(RuntimeError):
        with atomic_files() as files:
            (files.folder(final, lambda name: name.endswith(".dcm")) / "a.dcm").write_text("half")
            raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["overlay"] and (final / "a.dcm").read_text() == "earlier run"
    with atomic_files() as files:
        folder = files.folder(final, lambda name: name.endswith(".dcm"))
        for name in ("b.dcm", "c.dcm"):
            (folder / name).write_text("new")
        files.commit()
    assert [p.name for p in tmp_path.iterdir()] == ["overlay"]  # the earlier folder replaced whole, none aside
    assert sorted(p.name for p in final.iterdir()) == ["b.dcm", "c.dcm"]
    mask = os.umask(0)
    os.umask(mask)
    assert final.stat().st_mode & 0o777 == 0o777 & ~mask
    (final / "keep.txt").write_text("not ours")
    with pytest.raises(OutputError, match="keep.txt"):
        with atomic_files() as files:
            files.folder(final, lambda name: name.endswith(".dcm"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        with atomic_files() as files:
            files.folder(tmp_path / "file", lambda name: True)


# ---------------------------------------------------------------- issue 11: broken input never scored as whole

def _nifti_header(shape, dtype=np.float32, zooms=(1.0, 1.0, 1.0)):
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header.set_zooms(zooms)
    header.set_qform(np.diag([*zooms, 1.0]), code=1)
    return header


def _no_voxel_read(monkeypatch):
    """Fail the test if any image is read in full: proof that a refusal came before the allocation."""
    def refuse(*args, **kwargs):
        raise AssertionError("the voxel data were read (allocated) before the refusal")

    monkeypatch.setattr(sitk, "ReadImage", refuse)
    monkeypatch.setattr(sitk.ImageFileReader, "Execute", refuse)


@pytest.mark.parametrize("suffix", [".nii", ".mha", ".nrrd", ".mhd"])
def test_a_truncated_uncompressed_file_is_refused_not_zero_filled(tmp_path, suffix, monkeypatch):
    """Item 8: ITK zero-fills a short uncompressed file; the byte count the header declares is checked."""
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(volume(dtype=np.int16), str(path), False)
    data_file = path.with_suffix(".raw") if suffix == ".mhd" else path
    data = data_file.read_bytes()
    data_file.write_bytes(data[: int(len(data) * 0.9)])
    _no_voxel_read(monkeypatch)
    with pytest.raises(InputError, match="truncated"):
        read_image(path)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_truncated_compressed_data_inside_nrrd_and_mha_is_refused(tmp_path, suffix):
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(volume(), str(path), True)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.8)])
    with pytest.raises(InputError, match="truncated|corrupt"):
        read_image(path)


def test_header_bomb_is_refused_before_any_allocation(tmp_path, monkeypatch):
    """Item 13: a 416-byte .nii claiming 600^3 float32 (864 MB, under the voxel limit: refused by the file's
    size) and one claiming 1500^3 (13.5 GB: over the voxel limit)."""
    small = tmp_path / "bomb.nii"
    small.write_bytes(_nifti_header((600, 600, 600)).binaryblock + b"\0" * 68)
    assert small.stat().st_size == 416
    huge = tmp_path / "huge.nii"
    huge.write_bytes(_nifti_header((1500, 1500, 1500)).binaryblock + b"\0" * 68)
    _no_voxel_read(monkeypatch)
    with pytest.raises(InputError, match="truncated: its header declares 864,000,000 bytes"):
        read_image(small)
    with pytest.raises(InputError, match="more than this tool reads"):
        read_image(huge)


def test_compressed_header_bomb_is_refused_before_decompressing(tmp_path, monkeypatch):
    """Item 13: a small .nii.gz whose header claims 1200^3 uint8, and one claiming more than deflate can hold."""
    import gzip

    import cradl.io

    over = tmp_path / "over.nii.gz"
    over.write_bytes(gzip.compress(_nifti_header((1200, 1200, 1200), np.uint8).binaryblock + b"\0" * 4))
    dense = tmp_path / "dense.nii.gz"
    dense.write_bytes(gzip.compress(_nifti_header((600, 600, 600)).binaryblock + b"\0" * 100_000))
    _no_voxel_read(monkeypatch)
    monkeypatch.setattr(cradl.io, "_decompressed_length", lambda *a: pytest.fail("decompressed a bomb"))
    with pytest.raises(InputError, match="more than this tool reads"):
        read_image(over)
    with pytest.raises(InputError, match="more than .* compressed bytes can hold"):
        read_image(dense)


def test_zero_spacing_in_a_nifti_header_is_refused(tmp_path):
    """Item 12: pixdim 0 with a qform was read as 1 mm without a word."""
    import gzip

    import nibabel as nib

    array = np.random.default_rng(0).uniform(0, 100, (64, 64, 40)).astype(np.float32)
    plain = tmp_path / "zero.nii"
    nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 2.0, 1.0])), str(plain))
    data = bytearray(plain.read_bytes())
    data[76 + 8:76 + 12] = np.float32(0.0).tobytes()  # pixdim[2] = 0; the qform stays
    path = tmp_path / "zero.nii.gz"
    path.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(InputError, match="invalid voxel spacing"):
        read_image(path)


def test_a_sheared_direction_is_refused(tmp_path):
    """Item 10: a slightly non-orthogonal direction (shear 0.08) would be written back as another direction."""
    image = volume()
    image.SetDirection([1, 0.08, 0, 0, 1, 0, 0, 0, 1])
    path = tmp_path / "sheared.mha"
    sitk.WriteImage(image, str(path))
    with pytest.raises(InputError, match="non-orthogonal"):
        read_image(path)


def test_a_volume_too_small_or_too_coarse_for_a_brain_is_refused():
    """Item 11: 9 x 9 x 9 voxels at 22 mm (a 526,749 mm3 'region'), and 64 x 64 x 20 at 1 mm (20 mm thick)."""
    coarse = volume((9, 9, 9), spacing=(22.0, 22.0, 22.0))
    with pytest.raises(InputError, match="too small"):
        validate_image(coarse)
    thin = volume((20, 64, 64), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="covers only"):
        validate_image(thin)


@pytest.mark.parametrize("spacing", [(0.0, 1.0, 1.0), (1.0, float("nan"), 1.0), (1.0, 1.0, float("inf"))])
def test_zero_or_non_finite_spacing_is_refused(spacing):
    image = volume()
    image.SetSpacing(spacing) if np.all(np.isfinite(spacing)) and min(spacing) > 0 else None
    try:
        image.SetSpacing(spacing)
    except RuntimeError:  # SimpleITK itself refuses zero spacing on some versions
        return
    with pytest.raises(InputError, match="spacing"):
        validate_image(image)


def test_complex_voxels_are_refused_with_a_clear_message(tmp_path):
    array = sitk.GetArrayFromImage(volume()).astype(np.complex64)
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(volume())
    path = tmp_path / "complex.nii"
    sitk.WriteImage(image, str(path))
    with pytest.raises(InputError, match="complex-valued"):
        read_image(path)
    with pytest.raises(InputError, match="complex-valued"):
        validate_image(image)


def test_a_fifo_is_refused_at_once_not_read(tmp_path):
    import os

    path = tmp_path / "pipe.nii.gz"
    os.mkfifo(path)
    with pytest.raises(InputError, match="not a regular file"):
        read_image(path)  # opening it would block forever


@pytest.mark.parametrize("thing", [42, None, np.zeros((32, 32, 32)), "not/a/path.nii.gz"])
def test_the_api_refuses_non_images_with_an_input_error(thing):
    with pytest.raises(InputError):
        validate_image(thing) if not isinstance(thing, str) else read_image(thing)
    if thing is not None and not isinstance(thing, str):
        with pytest.raises(InputError):
            read_image(thing)


def _dicom_series(folder, n=40, gap=2.0, drop=(), shape=(64, 64), declare=False, renumber=False):
    folder.mkdir()
    rng = np.random.default_rng(0)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    kept = [k for k in range(n) if k not in drop]
    for k in kept:
        slice_ = sitk.Cast(sitk.GetImageFromArray(rng.uniform(0, 1000, shape).astype(np.float32)), sitk.sitkInt16)
        slice_ = sitk.JoinSeries(slice_)
        slice_.SetSpacing((1.5, 1.5, gap))
        slice_.SetMetaData("0020|0032", f"0\\0\\{k * gap}")
        slice_.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        slice_.SetMetaData("0020|0013", str((kept.index(k) if renumber else k) + 1))
        slice_.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.43")
        slice_.SetMetaData("0008|0060", "MR")
        if declare:
            slice_.SetMetaData("0020|1002", str(n))  # Images in Acquisition
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_)
    return folder


def test_a_complete_dicom_series_reads_with_its_slice_gap(tmp_path):
    image = read_image(_dicom_series(tmp_path / "ok"))
    assert image.GetSize() == (64, 64, 40) and abs(image.GetSpacing()[2] - 2.0) < 1e-3


@pytest.mark.parametrize("damage, message", [
    ("dangling", "broken link"), ("loop", "link loop"), ("gap", "30 slice.s. missing"), ("end", "declares 40"),
])
def test_a_damaged_dicom_series_is_refused_not_read_on_a_wrong_grid(tmp_path, damage, message):
    """Item 9: a dangling link (GDCM stopped listing part-way), a link loop, 30 slices missing in the
    middle (read at a uniform wrong spacing; instance numbers renumbered, so only positions tell), slices
    missing at the end (only the declared number of images tells)."""
    drop = range(5, 35) if damage == "gap" else range(30, 40) if damage == "end" else ()
    folder = _dicom_series(tmp_path / "series", drop=drop, declare=damage == "end", renumber=damage == "gap")
    if damage == "dangling":
        (folder / "slice020b.dcm").symlink_to(tmp_path / "gone.dcm")
    if damage == "loop":
        (folder / "a.dcm").symlink_to(folder / "b.dcm")
        (folder / "b.dcm").symlink_to(folder / "a.dcm")
    with pytest.raises(InputError, match=message):
        read_image(folder)


# ---------------------------------------------------------------- issue 11: writes verified before the rename

def _file_size_limit(limit):
    import contextlib
    import resource

    @contextlib.contextmanager
    def limited():  # `ulimit -f`: Python ignores SIGXFSZ, so writes past it fail with EFBIG
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    return limited()


@pytest.mark.parametrize("name", ["h.nii.gz", "h.nii", "h.nrrd", "h.mha", "r.json"])
def test_a_full_disk_is_an_output_error_and_leaves_nothing(tmp_path, name):
    """Item 5: ITK printed "wrote only 0" and carried on; the truncated .nii.gz was kept with exit 0."""
    from cradl.errors import OutputError
    from cradl.io import write_image

    with _file_size_limit(32 * 1024):
        with pytest.raises(OutputError, match=f"{name}"):
            if name.endswith(".json"):
                write_json({"x": "y" * 100_000}, tmp_path / name)
            else:
                write_image(volume(), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_an_image_written_with_another_geometry_is_refused(tmp_path, monkeypatch):
    """A heatmap is always written with the input's exact geometry: the written header is compared."""
    from cradl.errors import OutputError
    from cradl.io import write_image

    real = sitk.WriteImage

    def shifted(image, path, *args):
        moved = sitk.Image(image)
        moved.SetOrigin([v + 1.0 for v in image.GetOrigin()])
        real(moved, path, *args)

    monkeypatch.setattr(sitk, "WriteImage", shifted)
    with pytest.raises(OutputError, match="exact geometry"):
        write_image(volume(), tmp_path / "h.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_a_250_byte_name_gets_a_temporary_the_file_system_allows(tmp_path):
    from cradl.errors import OutputError

    name = "h" * 243 + ".nii.gz"
    with atomic_path(tmp_path / name) as tmp:
        assert len(tmp.name.encode()) <= 255 and tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"data")
    assert [p.name for p in tmp_path.iterdir()] == [name]
    with pytest.raises(OutputError, match="file name too long"):
        with atomic_path(tmp_path / ("h" * 300 + ".json")):
            pass


def test_scan_stem_drops_the_image_suffix_only():
    assert scan_stem("/data/sub-01_T1w.nii.gz") == "sub-01_T1w"
    assert scan_stem("a/b/Scan.NRRD") == "Scan"
    assert scan_stem("x.nhdr") == scan_stem("x.mhd") == scan_stem("x.dcm") == "x"
    assert scan_stem("/data/dicom/series7/") == "series7"  # a DICOM series folder keeps its name
    assert scan_stem("notes.v2.txt") == "notes.v2.txt"


def test_plain_json_makes_numpy_values_plain():
    value = {1: np.float32(0.5), "a": (np.int64(3), np.bool_(True)), "b": np.arange(3), "c": [np.inf, 1.234567]}
    plain = plain_json(value)
    assert plain == {"1": 0.5, "a": [3, True], "b": [0, 1, 2], "c": [float("inf"), 1.234567]}
    assert [type(v) for v in plain["a"]] == [int, bool] and type(plain["1"]) is float
    assert plain_json(value, digits=2)["c"] == [None, 1.23]  # evaluation tables: NaN/inf become null
    json.dumps(plain_json(value, digits=2), allow_nan=False)
