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
from cradl.space import ReferenceGrid

GRID = ReferenceGrid((16, 16, 6), 3.0, (-24.0, -24.0, -9.0))


@pytest.fixture
def bundle_path(tmp_path):
    torch.manual_seed(0)
    encoder = SliceEncoder(width=4, feature_dim=8)
    mixture = GaussianMixture(2, random_state=0).fit(np.random.default_rng(0).normal(size=(100, 8)))
    gmm = GaussianMixtureNLL.from_sklearn(mixture, np.zeros(8), np.ones(8))
    manifest = {"name": "unit", "version": "9.9", "reference": {"grid": GRID.to_json(), "min_brain_fraction": 0.1},
                "normalisation": {}, "localization": {}, "calibration": {"volume_scores": [1.0]}}
    template = np.random.default_rng(1).random((6, 16, 16)).astype(np.float32)
    path = tmp_path / "unit.cradl"
    save_bundle(path, manifest, encoder, gmm, template, (template > 0.5).astype(np.uint8))
    return path


def test_round_trip_restores_weights_mixture_and_template(bundle_path):
    bundle = load_bundle(bundle_path)
    again = load_bundle(bundle_path)
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(bundle.encoder(x), again.encoder(x))
    assert bundle.name == "unit" and bundle.version == "9.9" and bundle.grid == GRID
    assert bundle.template.shape == (6, 16, 16) and bundle.template_mask.dtype == np.uint8
    assert bundle.gmm.n_components == 2


def test_a_bundle_is_one_zip_of_json_and_npy_only(bundle_path):
    names = zipfile.ZipFile(bundle_path).namelist()
    assert names[0] == "manifest.json"
    assert all(n == "manifest.json" or (n.startswith("arrays/") and n.endswith(".npy")) for n in names)


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


def _edit_manifest(path, edit):
    def apply(members):
        manifest = json.loads(members["manifest.json"])
        edit(manifest)
        members["manifest.json"] = json.dumps(manifest).encode()

    _rewrite(path, apply)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["encoder"].update(feature_dim=16), "consistent"),  # lies about the weights' shapes
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
