"""The model bundle: one file that round-trips exactly and refuses anything it did not write.

No test here needs a trained model: a bundle is built from a freshly initialised encoder and a
mixture fitted on random features, which is all the format cares about.
"""
from __future__ import annotations

import json
import pickle
import zipfile

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture

from cradl.bundle import load_bundle, save_bundle
from cradl.encoder import SliceEncoder
from cradl.errors import ModelError
from cradl.gmm import GaussianMixtureNLL
from cradl.manifest import DEFAULT_LOCALIZATION
from cradl.space import ReferenceGrid

GRID = ReferenceGrid((16, 16, 6), 3.0, (-24.0, -24.0, -9.0))
CALIBRATION = {"slice_nll_mean": [1.0] * 6, "slice_nll_std": [0.5] * 6, "volume_aggregate": "top3_z",
               "volume_scores": [0.1, 0.5, 1.0], "n_scans": 3, "heatmap_scale": 1.5, "voxel_threshold": 2.0,
               "min_region_mm3": 100.0}


@pytest.fixture
def bundle_path(tmp_path):
    torch.manual_seed(0)
    encoder = SliceEncoder(width=4, feature_dim=8)
    mixture = GaussianMixture(2, random_state=0).fit(np.random.default_rng(0).normal(size=(100, 8)))
    gmm = GaussianMixtureNLL.from_sklearn(mixture, np.zeros(8), np.ones(8))
    manifest = {"name": "unit", "version": "9.9", "reference": {"grid": GRID.to_json(), "min_brain_fraction": 0.1},
                "normalisation": {}, "localization": {}, "calibration": CALIBRATION}
    template = np.random.default_rng(1).random((6, 16, 16)).astype(np.float32)
    path = tmp_path / "unit.cradl"
    save_bundle(path, manifest, encoder, gmm, template, (template > 0.5).astype(np.uint8), normal_mean(template))
    return path


def normal_mean(template):
    """A normal mean image as calibration makes it: NaN where the normal scans have no brain."""
    return np.where(template > 0.5, template, np.nan).astype(np.float32)


def test_round_trip_restores_weights_mixture_and_template(bundle_path):
    bundle = load_bundle(bundle_path)
    again = load_bundle(bundle_path)
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(bundle.encoder(x), again.encoder(x))
    assert bundle.name == "unit" and bundle.version == "9.9" and bundle.grid == GRID
    assert bundle.template.shape == (6, 16, 16) and bundle.template_mask.dtype == np.uint8
    assert bundle.gmm.n_components == 2
    np.testing.assert_array_equal(bundle.normal_mean, normal_mean(bundle.template))  # NaN where it was NaN


def test_a_bundle_is_one_zip_of_json_and_npy_only(bundle_path):
    names = zipfile.ZipFile(bundle_path).namelist()
    assert names[:2] == ["manifest.json", "manifest.sha256"]
    assert all(n.startswith("arrays/") and n.endswith(".npy") for n in names[2:])


def test_refuses_a_missing_file(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_bundle(tmp_path / "nothing.cradl")


def test_refuses_a_truncated_file(bundle_path):
    data = bundle_path.read_bytes()
    bundle_path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ModelError):
        load_bundle(bundle_path)


def test_a_flipped_byte_anywhere_is_refused_or_harmless(bundle_path):
    """Corruption inside the compressed stream, the headers or the directory never escapes as a raw error."""
    original = load_bundle(bundle_path)
    data = bundle_path.read_bytes()
    x = torch.randn(2, 1, 16, 16)
    for position in range(0, len(data), max(1, len(data) // 400)):
        damaged = bytearray(data)
        damaged[position] ^= 0x5A
        bundle_path.write_bytes(bytes(damaged))
        try:
            bundle = load_bundle(bundle_path)
        except ModelError:
            continue
        # A flip in bytes the reader never uses (timestamps, comments) must leave the model unchanged.
        assert torch.equal(bundle.encoder(x), original.encoder(x)), position
        assert np.array_equal(bundle.template, original.template), position


def _rewrite(path, edit):
    with zipfile.ZipFile(path) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    edit(members)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_refuses_tampered_weights(bundle_path):
    def flip_a_weight(members):
        name = next(n for n in members if "conv" in n or "stem.0" in n)
        data = bytearray(members[name])
        data[-3] ^= 0xFF
        members[name] = bytes(data)

    _rewrite(bundle_path, flip_a_weight)
    with pytest.raises(ModelError, match="checksum"):
        load_bundle(bundle_path)


def _edit_manifest(path, edit, recompute_checksum=True):
    """Edit the manifest as an attacker would (recomputing its checksum) or as a careless user would."""
    import hashlib

    def apply(members):
        manifest = json.loads(members["manifest.json"])
        edit(manifest)
        members["manifest.json"] = json.dumps(manifest).encode()
        if recompute_checksum:
            members["manifest.sha256"] = hashlib.sha256(members["manifest.json"]).hexdigest().encode()

    _rewrite(path, apply)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["encoder"].update(feature_dim=16), "does not match its weights"),  # lies about the weights
    (lambda m: m.update(format_version=99), "format version 99"),  # written by a newer cradl
    (lambda m: m.update(format="something-else"), "not a CRADL model bundle"),
])
def test_refuses_a_manifest_it_cannot_trust(bundle_path, edit, message):
    _edit_manifest(bundle_path, edit)
    with pytest.raises(ModelError, match=message):
        load_bundle(bundle_path)


@pytest.mark.parametrize("content", [b"", b"\x00" * 1000, b"just some text\n", b"PK\x03\x04broken"])
def test_refuses_foreign_files(tmp_path, content):
    path = tmp_path / "foreign.cradl"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="not a CRADL model bundle|damaged"):
        load_bundle(path)


def test_refuses_a_torch_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ModelError, match="not a CRADL model bundle"):
        load_bundle(path)


class _Payload:
    """Unpickling this would create a file: the proof that a pickle was executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_malicious_pickle_as_the_model_file_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.cradl"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ModelError):
        load_bundle(path)
    assert not marker.exists()


def test_a_malicious_pickle_inside_the_bundle_never_runs(bundle_path, tmp_path):
    marker = tmp_path / "pwned"

    def plant(members):
        import hashlib
        import io

        buffer = io.BytesIO()
        np.save(buffer, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
        members["arrays/template.npy"] = buffer.getvalue()
        manifest = json.loads(members["manifest.json"])  # even with a matching checksum
        manifest["arrays"]["template"]["sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
        members["manifest.json"] = json.dumps(manifest).encode()

    _rewrite(bundle_path, plant)
    with pytest.raises(ModelError):
        load_bundle(bundle_path)
    assert not marker.exists()


# ---------------------------------------------------------------- issue 11: bounded memory, manifest validated

def _nothing_read_or_built(monkeypatch):
    """Fail the test if an array member is read or a network built: the refusal must come first."""
    import cradl.bundle

    monkeypatch.setattr(cradl.bundle, "_read_array", lambda *a: pytest.fail("an array member was read"))
    monkeypatch.setattr(cradl.bundle, "_assemble", lambda *a: pytest.fail("the model was built"))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["encoder"].update(grid=400), "encoder.grid must be an integer in"),  # 10 GB Linear layer
    (lambda m: m["encoder"].update(width=3000), "encoder.width must be an integer in"),
    (lambda m: m["encoder"].update(grid=8), "does not match its weights"),  # in range, but not these weights
    (lambda m: m["reference"]["grid"].update(size=[1024, 1024, 1024]), "calibration.slice_nll_mean has 6 values"),
    (lambda m: m["arrays"]["template"].update(shape=[1 << 30, 1 << 30]), "more than a model needs"),
])
def test_network_and_array_sizes_are_checked_before_anything_is_built(bundle_path, monkeypatch, edit, message):
    """Item 14: a 5 MB bundle whose manifest said encoder grid 400 or width 3000 took 10 GB before refusal."""
    _edit_manifest(bundle_path, edit)
    _nothing_read_or_built(monkeypatch)
    with pytest.raises(ModelError, match=message):
        load_bundle(bundle_path)


def test_a_member_that_inflates_beyond_its_array_is_refused_before_it_is_read(bundle_path, monkeypatch):
    """Item 14: an 8.7 MB member inflating to 5 GiB took 10.7 GB before the checksum failed (here 256 MiB)."""
    def inflate(members):
        members["arrays/template.npy"] = bytes(256 << 20)

    _rewrite_deflated(bundle_path, inflate)
    assert bundle_path.stat().st_size < 2 << 20
    _nothing_read_or_built(monkeypatch)
    with pytest.raises(ModelError, match="declares 268,435,456 bytes"):
        load_bundle(bundle_path)


def test_a_member_read_is_capped_whatever_its_header_says(bundle_path):
    from cradl.bundle import _read_capped

    with zipfile.ZipFile(bundle_path) as archive:
        info = archive.getinfo("arrays/template.npy")
        with pytest.raises(ModelError, match="inflates beyond"):
            _read_capped(archive, info, info.file_size - 1)


def _rewrite_deflated(path, edit):
    with zipfile.ZipFile(path) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    edit(members)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_an_edited_manifest_fails_the_checksum(bundle_path):
    """Item 15: calibration edited to volume scores 1000 and threshold 1e9 read the demo tumour as normal."""
    def edit(m):
        m["calibration"].update(volume_scores=[1000.0] * 3, voxel_threshold=1e9)

    _edit_manifest(bundle_path, edit, recompute_checksum=False)
    with pytest.raises(ModelError, match="checksum for the manifest"):
        load_bundle(bundle_path)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["calibration"].update(voxel_threshold=1e9), "voxel_threshold"),
    (lambda m: m["calibration"].update(voxel_threshold=-1), "voxel_threshold"),
    (lambda m: m["calibration"].update(heatmap_scale=0), "heatmap_scale"),
    (lambda m: m["calibration"].update(false_alarm_quantile=1.5), "false_alarm_quantile"),
    (lambda m: m["calibration"].update(slice_nll_std=[0.0] * 6), "slice_nll_std must be positive"),
    (lambda m: m["calibration"].update(slice_nll_mean=[1.0] * 5), "slice_nll_mean has 5 values"),
    (lambda m: m["calibration"].update(volume_scores=[]), "volume_scores must hold"),
    (lambda m: m["calibration"].update(volume_scores="high"), "volume_scores must be a list"),
    (lambda m: m["calibration"].update(volume_aggregate="median"), "volume_aggregate"),
    (lambda m: m["calibration"].pop("voxel_threshold"), "voxel_threshold"),
    (lambda m: m.pop("calibration"), "'calibration' is missing"),
    (lambda m: m["reference"]["grid"].update(spacing=0), "reference.grid.spacing"),
    (lambda m: m["reference"].update(min_brain_fraction=2), "min_brain_fraction"),
    (lambda m: m["encoder"].update(width="32"), "encoder.width"),
    (lambda m: m.update(name=None), "name must be a string"),
    (lambda m: m["normalisation"].update(bias_correction="n3"), "bias_correction must be 'n4' or absent"),
    (lambda m: m.update(localization={"smoothgrad_samples": 0, "noise_std": 0.05, "median_size": 5,
                                      "gaussian_sigma_px": 1.0}), "smoothgrad_samples"),
    (lambda m: m.update(localization={**DEFAULT_LOCALIZATION, "attribution": "occlusion"}),
     "localization.attribution must be one of"),
    (lambda m: [m["arrays"].pop(k) for k in ("normal_mean", "normal_mean_mask")], "normal mean image, which it lacks"),
    (lambda m: m["arrays"]["normal_mean"].update(shape=[6, 16, 15]), "normal_mean shape"),
    (lambda m: m["calibration"].update(typicality={"mean": "x", "bad": [1.0, {"deep": {"set": [1, None]}}]}), None),
])
def test_every_manifest_field_is_validated_even_with_a_recomputed_checksum(bundle_path, edit, message):
    """Item 15: heatmap_scale 0, threshold NaN or -1, slice std 0 gave all-zero heatmaps, NaN in the report
    or one region covering the image; missing or out-of-range fields gave exit 1 "internal error"."""
    _edit_manifest(bundle_path, edit)
    if message is None:  # fields other work adds (typicality, brain_extraction, data_split) are accepted
        load_bundle(bundle_path)
        return
    with pytest.raises(ModelError, match=message):
        load_bundle(bundle_path)


def test_nan_anywhere_in_the_manifest_is_refused(bundle_path):
    def plant(members):
        import hashlib

        members["manifest.json"] = members["manifest.json"].replace(b'"voxel_threshold": 2.0',
                                                                    b'"voxel_threshold": NaN')
        members["manifest.sha256"] = hashlib.sha256(members["manifest.json"]).hexdigest().encode()

    _rewrite(bundle_path, plant)
    with pytest.raises(ModelError, match="NaN"):
        load_bundle(bundle_path)


def test_optional_fields_of_other_work_are_accepted_loosely(bundle_path):
    def extend(m):
        m["reference"]["brain_extraction"] = {"method": "deepbet", "threshold": 0.5}
        m["calibration"]["typicality"] = {"mean": [0.1, 0.2], "cov_scale": 1.5, "threshold": 3.2}
        m["training"] = {"data_split": {"train": ["IXI002"], "validation": [], "calibration": ["IXI012"]}}
        m["contrasts"] = ["t1", "t2"]

    _edit_manifest(bundle_path, extend)
    assert load_bundle(bundle_path).manifest.contrasts == ("t1", "t2")
    _edit_manifest(bundle_path, lambda m: m.update(contrasts="t1"))
    with pytest.raises(ModelError, match="contrasts must be a list"):
        load_bundle(bundle_path)


def test_fingerprint_is_the_sha256_of_the_manifest_and_format_1_still_loads(bundle_path):
    import hashlib

    with zipfile.ZipFile(bundle_path) as archive:
        raw = archive.read("manifest.json")
    assert load_bundle(bundle_path).fingerprint == "sha256:" + hashlib.sha256(raw).hexdigest()

    def to_format_1(members):  # as bundles written before the manifest checksum (the bundled model today)
        del members["manifest.sha256"]
        manifest = json.loads(members["manifest.json"])
        manifest["format_version"] = 1
        members["manifest.json"] = json.dumps(manifest).encode()

    _rewrite(bundle_path, to_format_1)
    assert load_bundle(bundle_path).fingerprint.startswith("sha256:")


def test_a_format_2_bundle_without_its_checksum_is_refused(bundle_path):
    _rewrite(bundle_path, lambda members: members.pop("manifest.sha256"))
    with pytest.raises(ModelError, match="lacks its manifest checksum"):
        load_bundle(bundle_path)


def test_the_bundled_default_model_loads_and_validates():
    bundle = load_bundle()
    assert bundle.fingerprint.startswith("sha256:") and bundle.manifest.format_version in (1, 2)


def test_a_full_disk_while_saving_a_bundle_leaves_nothing(bundle_path, tmp_path):
    import resource

    bundle = load_bundle(bundle_path)
    out = tmp_path / "out"
    out.mkdir()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(Exception) as caught:
            bundle.save(out / "copy.cradl")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    from cradl.errors import CradlError
    assert isinstance(caught.value, CradlError), caught.value
    assert list(out.iterdir()) == []


def test_a_changed_manifest_is_what_a_saved_bundle_holds(bundle_path, tmp_path):
    bundle = load_bundle(bundle_path)
    calibration = dict(bundle.manifest.calibration, voxel_threshold=3.0)
    bundle.manifest = bundle.manifest.with_fields(calibration=calibration, name="unit:variant")
    assert bundle.manifest.calibration["voxel_threshold"] == 3.0
    bundle.save(tmp_path / "variant.cradl")
    again = load_bundle(tmp_path / "variant.cradl")
    assert again.manifest.calibration["voxel_threshold"] == 3.0 and again.name == "unit:variant"
