"""The model bundle: one zip file holding a JSON manifest and plain .npy arrays.

Nothing in it is ever unpickled: arrays are read with `allow_pickle=False`, the encoder is rebuilt from
the manifest and filled from those arrays. Every array carries a SHA-256 in the manifest, so a
truncated, edited or foreign file is refused with one clear message before anything is used.
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .encoder import SliceEncoder
from .errors import ModelError
from .gmm import GaussianMixtureNLL
from .io import atomic_path
from .space import ReferenceGrid

FORMAT = "cradl-bundle"
FORMAT_VERSION = 1
BUNDLE_SUFFIX = ".cradl"
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "Resources" / "Models" / "cradl_default.cradl"
_MAX_MANIFEST_BYTES = 4 << 20


@dataclass
class ModelBundle:
    """Everything detection needs, loaded and validated."""

    manifest: dict
    encoder: SliceEncoder
    gmm: GaussianMixtureNLL
    template: np.ndarray  # reference-grid T1 template, [z, y, x] float32
    template_mask: np.ndarray  # reference-grid brain mask, [z, y, x] uint8
    path: Path | None = field(default=None)

    @property
    def grid(self) -> ReferenceGrid:
        return ReferenceGrid.from_json(self.manifest["reference"]["grid"])

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    def template_image(self) -> sitk.Image:
        return self.grid.image_from_array(self.template.astype(np.float32))

    def template_mask_image(self) -> sitk.Image:
        return self.grid.image_from_array(self.template_mask.astype(np.uint8))

    def save(self, path: str | Path) -> None:
        save_bundle(path, self.manifest, self.encoder, self.gmm, self.template, self.template_mask)


def save_bundle(path, manifest: dict, encoder: SliceEncoder, gmm: GaussianMixtureNLL,
                template: np.ndarray, template_mask: np.ndarray) -> None:
    arrays = {f"encoder.{k}": v.detach().cpu().numpy() for k, v in encoder.state_dict().items()}
    arrays.update(gmm.to_arrays())
    arrays["template"] = np.asarray(template, dtype=np.float32)
    arrays["template_mask"] = np.asarray(template_mask, dtype=np.uint8)
    manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION,
                    encoder=dict(manifest.get("encoder", {}), width=encoder.width,
                                 feature_dim=encoder.feature_dim, grid=encoder.grid))
    payloads = {name: _npy_bytes(value) for name, value in arrays.items()}
    manifest["arrays"] = {name: {"shape": list(arrays[name].shape), "dtype": str(arrays[name].dtype),
                                 "sha256": hashlib.sha256(data).hexdigest()}
                          for name, data in payloads.items()}
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("manifest.json", json.dumps(manifest, indent=1))
            for name, data in payloads.items():
                archive.writestr(f"arrays/{name}.npy", data)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, order="C"), allow_pickle=False)
    return buffer.getvalue()


def load_bundle(path: str | Path | None = None) -> ModelBundle:
    """Load and validate a bundle; `None` loads the bundled default model."""
    path = Path(path) if path is not None else DEFAULT_MODEL
    if not path.is_file():
        hint = " (the bundled default model is missing from this installation)" if path == DEFAULT_MODEL else ""
        raise ModelError(f"model file not found: {path}{hint}")
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = _read_manifest(archive, path)
            arrays = {name: _read_array(archive, name, spec, path) for name, spec in manifest["arrays"].items()}
    except ModelError:
        raise
    except zipfile.BadZipFile:
        raise ModelError(f"{path} is not a CRADL model bundle (not a valid bundle archive; truncated or foreign)") from None
    except Exception as exc:  # noqa: BLE001 - a damaged archive fails in zipfile/zlib in many ways; all mean the same
        raise ModelError(f"{path} is damaged ({type(exc).__name__}: {exc})") from None
    return _assemble(manifest, arrays, path)


def _read_manifest(archive: zipfile.ZipFile, path: Path) -> dict:
    try:
        info = archive.getinfo("manifest.json")
    except KeyError:
        raise ModelError(f"{path} is not a CRADL model bundle (no manifest)") from None
    if info.file_size > _MAX_MANIFEST_BYTES:
        raise ModelError(f"{path} is not a CRADL model bundle (manifest too large)")
    try:
        manifest = json.loads(archive.read(info).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"{path} has an unreadable manifest") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelError(f"{path} is not a CRADL model bundle (manifest format is not {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{path} has bundle format version {manifest.get('format_version')!r}; "
                         f"this version of cradl reads version {FORMAT_VERSION}")
    for key in ("name", "version", "arrays", "reference", "normalisation", "localization", "calibration"):
        if key not in manifest:
            raise ModelError(f"{path} manifest lacks {key!r}")
    return manifest


def _read_array(archive: zipfile.ZipFile, name: str, spec: dict, path: Path) -> np.ndarray:
    member = f"arrays/{name}.npy"
    try:
        data = archive.read(member)
    except KeyError:
        raise ModelError(f"{path} lacks array {name!r}") from None
    if hashlib.sha256(data).hexdigest() != spec.get("sha256"):
        raise ModelError(f"{path} failed its checksum for {name!r}: the file was modified or damaged")
    array = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    if list(array.shape) != list(spec["shape"]) or str(array.dtype) != spec["dtype"]:
        raise ModelError(f"{path}: array {name!r} has shape {array.shape}, manifest says {spec['shape']}")
    return array


def _assemble(manifest: dict, arrays: dict, path: Path) -> ModelBundle:
    try:
        spec = manifest["encoder"]
        encoder = SliceEncoder(int(spec["width"]), int(spec["feature_dim"]), int(spec.get("grid", 1)))
        state = {k[len("encoder."):]: torch.from_numpy(v.copy()) for k, v in arrays.items() if k.startswith("encoder.")}
        encoder.load_state_dict(state, strict=True)
        gmm = GaussianMixtureNLL.from_arrays(arrays)
        grid = ReferenceGrid.from_json(manifest["reference"]["grid"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise ModelError(f"{path} does not describe a consistent model: {str(exc).splitlines()[0][:160]}") from None
    expected = tuple(reversed(grid.size))
    for name in ("template", "template_mask"):
        if arrays[name].shape != expected:
            raise ModelError(f"{path}: {name} shape {arrays[name].shape} does not match the reference grid {expected}")
    if gmm.means.shape[1] != encoder.feature_dim:
        raise ModelError(f"{path}: mixture dimension {gmm.means.shape[1]} != encoder features {encoder.feature_dim}")
    encoder.eval()
    gmm.eval()
    return ModelBundle(manifest, encoder, gmm, arrays["template"], arrays["template_mask"], path)
