"""The model bundle: one zip file holding a JSON manifest and plain .npy arrays.

Nothing in it is ever unpickled: arrays are read with `allow_pickle=False`, the encoder is rebuilt from
the manifest and filled from those arrays. Every array carries a SHA-256 in the manifest and (format 2)
the manifest's own SHA-256 is stored beside it, so a truncated, edited or foreign file is refused with
one clear message before anything is used. That digest is the bundle's fingerprint (`cradl info`).
A checksum shows that a file is the one that was written; it cannot show who wrote it: anyone who edits a
bundle can recompute every checksum. Compare the fingerprint with one published by a source you trust.

Nothing is allocated on trust: the manifest is validated field by field, the network sizes it declares
must match the arrays' declared shapes (checked on a shapeless `meta` copy of the encoder), every
member's declared size must match its array before it is read, and members are read with a size cap.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .atomic import atomic_path, writing
from .calibration import check_loose, validate_calibration
from .errors import ModelError
from .manifest import ATTRIBUTIONS, ModelManifest, complete_localization, uses_normal_mean
from .space import ReferenceGrid

if TYPE_CHECKING:  # torch is imported where a network is built: `cradl info` reads a bundle without it
    from .encoder import SliceEncoder
    from .gmm import GaussianMixtureNLL

FORMAT = "cradl-bundle"
FORMAT_VERSION = 2  # 2: the manifest's SHA-256 is stored in `manifest.sha256`; 1 (still read): arrays only
READABLE_VERSIONS = (1, 2)
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "Resources" / "Models" / "cradl_default.cradl"
MANIFEST_CHECKSUM = "manifest.sha256"
_MAX_MANIFEST_BYTES = 4 << 20
_MAX_MEMBERS = 1024
_MAX_ARRAY_BYTES = 1 << 30  # all arrays together; the default model holds 11 MB
_MAX_NPY_HEADER = 4096 + 16
_DTYPES = {"float32", "float64", "float16", "uint8", "int8", "int16", "uint16", "int32", "int64", "bool"}
LIMITS = {"width": (1, 512), "feature_dim": (1, 2048), "grid": (1, 16), "slice_size": (8, 1024),
          "n_slices": (1, 1024), "components": (1, 256)}


@dataclass
class ModelBundle:
    """Everything detection needs, loaded and validated."""

    manifest: ModelManifest
    encoder: SliceEncoder
    gmm: GaussianMixtureNLL
    template: np.ndarray  # reference-grid T1 template, [z, y, x] float32
    template_mask: np.ndarray  # reference-grid brain mask, [z, y, x] uint8
    path: Path | None = field(default=None)
    fingerprint: str | None = field(default=None)  # "sha256:<hex>" of the manifest, which holds every array's digest
    # reference-grid mean of the calibration's normal scans, NaN where they have no brain; only for heatmap
    # settings that read it (`manifest.uses_normal_mean`)
    normal_mean: np.ndarray | None = field(default=None)

    @property
    def grid(self) -> ReferenceGrid:
        return self.manifest.reference.grid

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def save(self, path: str | Path) -> None:
        save_bundle(path, self.manifest.stored, self.encoder, self.gmm, self.template, self.template_mask,
                    self.normal_mean)


def save_bundle(path, manifest: dict, encoder: SliceEncoder, gmm: GaussianMixtureNLL,
                template: np.ndarray, template_mask: np.ndarray, normal_mean: np.ndarray | None = None) -> None:
    arrays = {f"encoder.{k}": v.detach().cpu().numpy() for k, v in encoder.state_dict().items()}
    arrays.update(gmm.to_arrays())
    arrays["template"] = np.asarray(template, dtype=np.float32)
    arrays["template_mask"] = np.asarray(template_mask, dtype=np.uint8)
    if normal_mean is not None:  # stored finite (arrays with NaN are refused): the mean, and where it holds
        arrays["normal_mean"] = np.nan_to_num(np.asarray(normal_mean, dtype=np.float32), nan=0.0)
        arrays["normal_mean_mask"] = np.isfinite(normal_mean).astype(np.uint8)
    manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION,
                    encoder=dict(manifest.get("encoder", {}), width=encoder.width,
                                 feature_dim=encoder.feature_dim, grid=encoder.grid))
    payloads = {name: _npy_bytes(value) for name, value in arrays.items()}
    manifest["arrays"] = {name: {"shape": list(arrays[name].shape), "dtype": str(arrays[name].dtype),
                                 "sha256": hashlib.sha256(data).hexdigest()}
                          for name, data in payloads.items()}
    try:
        manifest_bytes = json.dumps(manifest, indent=1, allow_nan=False).encode("utf-8")
    except ValueError:
        raise ModelError("cannot save the model: its manifest holds NaN or infinite numbers") from None
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    with atomic_path(path) as tmp, writing(path):
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("manifest.json", manifest_bytes)
            archive.writestr(MANIFEST_CHECKSUM, digest + "\n")
            for name, data in payloads.items():
                archive.writestr(f"arrays/{name}.npy", data)
        try:  # verified before the rename: every member's CRC, and the manifest's digest
            with zipfile.ZipFile(tmp) as archive:
                bad = archive.testzip()
                stored = archive.read(MANIFEST_CHECKSUM).decode().strip()
        except (zipfile.BadZipFile, OSError, EOFError):
            bad, stored = "the archive", None
        if bad is not None or stored != digest:
            raise ModelError(f"writing {path} failed: {bad or 'the manifest'} did not read back intact "
                             "(disk full or over the file size limit?)")


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, order="C"), allow_pickle=False)
    return buffer.getvalue()


def load_bundle(path: str | Path | None = None) -> ModelBundle:
    """Load and validate a bundle; `None` loads the bundled default model."""
    path, manifest, fingerprint, arrays = _read_bundle(path, check_network=True)
    return _assemble(manifest, arrays, path, fingerprint)


def read_manifest(path: str | Path | None = None) -> tuple[ModelManifest, str]:
    """A bundle's validated manifest and its fingerprint, every array's checksum verified, without torch (for
    `cradl info`): `load_bundle` also builds the network, checking the encoder's layer shapes and the values."""
    _, manifest, fingerprint, _ = _read_bundle(path, check_network=False)
    return ModelManifest.from_dict(manifest), fingerprint


def _read_bundle(path, check_network: bool) -> tuple[Path, dict, str, dict[str, np.ndarray]]:
    path = Path(path) if path is not None else DEFAULT_MODEL
    if not path.exists() or path.is_dir():
        hint = " (the bundled default model is missing from this installation)" if path == DEFAULT_MODEL else ""
        raise ModelError(f"model file not found: {path}{hint}" if not path.is_dir() else f"model {path} is a folder")
    if not stat.S_ISREG(path.stat().st_mode):
        raise ModelError(f"model {path} is not a regular file")
    try:
        with zipfile.ZipFile(path) as archive:
            manifest, fingerprint = _read_manifest(archive, path)
            specs = _validate_manifest(manifest, path, check_network)
            _check_members(archive, specs, path)
            arrays = {name: _read_array(archive, name, spec, path) for name, spec in specs.items()}
    except ModelError:
        raise
    except zipfile.BadZipFile:
        raise ModelError(f"{path} is not a CRADL model bundle (not a valid bundle archive; truncated or "
                         "foreign)") from None
    except Exception as exc:  # noqa: BLE001 - a damaged archive fails in zipfile/zlib in many ways; all mean the same
        raise ModelError(f"{path} is damaged ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None
    return path, manifest, fingerprint, arrays


def _read_capped(archive: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int) -> bytes:
    """A member's bytes, never more than `cap` of them whatever its header claims."""
    with archive.open(info) as stream:
        data = stream.read(cap + 1)
    if len(data) > cap:
        raise ModelError(f"{archive.filename}: member {info.filename} inflates beyond its declared size")
    return data


def _reject_constant(name):
    raise ValueError(f"{name} is not a number JSON allows")


def _read_manifest(archive: zipfile.ZipFile, path: Path) -> tuple[dict, str]:
    if len(archive.infolist()) > _MAX_MEMBERS:
        raise ModelError(f"{path} is not a CRADL model bundle (too many members)")
    try:
        info = archive.getinfo("manifest.json")
    except KeyError:
        raise ModelError(f"{path} is not a CRADL model bundle (no manifest)") from None
    if info.file_size > _MAX_MANIFEST_BYTES:
        raise ModelError(f"{path} is not a CRADL model bundle (manifest too large)")
    raw = _read_capped(archive, info, _MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ModelError(f"{path} has an unreadable manifest (not JSON, or NaN/Infinity in it)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelError(f"{path} is not a CRADL model bundle (manifest format is not {FORMAT!r})")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise ModelError(f"{path} has bundle format version {version!r}; "
                         f"this version of cradl reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    digest = hashlib.sha256(raw).hexdigest()
    if version >= 2:
        try:
            stored = _read_capped(archive, archive.getinfo(MANIFEST_CHECKSUM), 256).decode("ascii").strip()
        except (KeyError, UnicodeDecodeError):
            raise ModelError(f"{path} lacks its manifest checksum: the file was modified or damaged") from None
        if stored != digest:
            raise ModelError(f"{path} failed its checksum for the manifest: the file was modified or damaged")
    return manifest, f"sha256:{digest}"


def _validate_manifest(manifest: dict, path: Path, check_network: bool = True) -> dict[str, dict]:
    """Every field the model uses, by type, range, finiteness and length; the arrays the manifest's network
    sizes imply must be exactly those it lists (the encoder's only with `check_network`, which needs torch).
    Returns the array specs. Nothing large is built."""
    try:
        return _validated(manifest, check_network)
    except ValueError as exc:
        raise ModelError(f"{path} manifest is invalid: {exc}") from None


def _integer(value, where, low, high) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{where} must be an integer in [{low}, {high}], not {value!r}")
    return value


def _number(value, where, low, high, low_open=False) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value) \
            or not low <= value <= high or (low_open and value == low):
        raise ValueError(f"{where} must be a finite number in {'(' if low_open else '['}{low:g}, {high:g}], "
                         f"not {value!r}")
    return float(value)


def _mapping(manifest, key, required=True) -> dict:
    value = manifest.get(key, None if required else {})
    if not isinstance(value, dict):
        raise ValueError(f"{key!r} is missing or not a mapping")
    return value


def _string(value, where, required=True, longest=1000):
    if value is None and not required:
        return
    if not isinstance(value, str) or (required and not value) or len(value) > longest:
        raise ValueError(f"{where} must be a string of at most {longest} characters")


def _validated(m: dict, check_network: bool = True) -> dict[str, dict]:
    _string(m.get("name"), "name", longest=200)
    _string(m.get("version"), "version", longest=100)
    for key in ("description", "created", "cradl_version"):
        _string(m.get(key), key, required=False, longest=20000)
    size = _validated_reference(_mapping(m, "reference"))
    _validate_normalisation(_mapping(m, "normalisation"))
    localization = _mapping(m, "localization")
    _validate_localization(localization)
    validate_calibration(_mapping(m, "calibration"), size[2])
    encoder = _mapping(m, "encoder")
    width = _integer(encoder.get("width"), "encoder.width", *LIMITS["width"])
    features = _integer(encoder.get("feature_dim"), "encoder.feature_dim", *LIMITS["feature_dim"])
    pool = _integer(encoder.get("grid", 1), "encoder.grid", *LIMITS["grid"])
    for key in ("training", "gmm"):
        check_loose(_mapping(m, key, required=False), key)
    for key in ("contrasts", "recalibrations"):
        if key in m:
            if not isinstance(m[key], list):
                raise ValueError(f"{key} must be a list")
            check_loose(m[key], key)

    specs = _validated_array_specs(m.get("arrays"))
    _check_network_arrays(specs, width, features, pool, size, check_network)
    if uses_normal_mean(complete_localization(localization)) and "normal_mean" not in specs:
        raise ValueError("its heatmap settings read the normal mean image, which it lacks")
    return specs


def _validated_reference(reference: dict) -> list[int]:
    grid = reference.get("grid")
    if not isinstance(grid, dict):
        raise ValueError("reference.grid is missing")
    size = grid.get("size")
    if not isinstance(size, list) or len(size) != 3:
        raise ValueError("reference.grid.size must list 3 integers")
    for i, n in enumerate(size):
        _integer(n, f"reference.grid.size[{i}]", *(LIMITS["slice_size"] if i < 2 else LIMITS["n_slices"]))
    if size[0] != size[1]:
        raise ValueError("reference.grid.size must have square slices")
    _number(grid.get("spacing"), "reference.grid.spacing", 0.0, 20.0, low_open=True)
    origin = grid.get("origin")
    if not isinstance(origin, list) or len(origin) != 3:
        raise ValueError("reference.grid.origin must list 3 numbers")
    for i, v in enumerate(origin):
        _number(v, f"reference.grid.origin[{i}]", -1e4, 1e4)
    _number(reference.get("min_brain_fraction"), "reference.min_brain_fraction", 0.0, 1.0)
    check_loose(reference, "reference")  # e.g. brain_extraction, template: strings, finite numbers
    return size


def _validate_normalisation(normalisation: dict) -> None:
    _string(normalisation.get("method"), "normalisation.method", required=False, longest=100)
    for key in ("low_percentile", "high_percentile"):
        if key in normalisation:
            _number(normalisation[key], f"normalisation.{key}", 0.0, 100.0)
    if normalisation.get("low_percentile", 0) >= normalisation.get("high_percentile", 100):
        raise ValueError("normalisation.low_percentile must be below high_percentile")
    if "clip" in normalisation:
        clip = normalisation["clip"]
        if not isinstance(clip, list) or len(clip) != 2 or _number(clip[0], "normalisation.clip", -1e6, 1e6) \
                >= _number(clip[1], "normalisation.clip", -1e6, 1e6):
            raise ValueError("normalisation.clip must be two increasing numbers")
    if normalisation.get("bias_correction") not in (None, "n4"):
        raise ValueError("normalisation.bias_correction must be 'n4' or absent")
    check_loose(normalisation, "normalisation")


def _validate_localization(localization: dict) -> None:
    if localization:  # an empty mapping takes the defaults
        _integer(localization.get("smoothgrad_samples"), "localization.smoothgrad_samples", 1, 64)
        _number(localization.get("noise_std"), "localization.noise_std", 0.0, 10.0)
        _integer(localization.get("median_size"), "localization.median_size", 1, 31)
        _number(localization.get("gaussian_sigma_px"), "localization.gaussian_sigma_px", 0.0, 50.0)
        if "gaussian_sigma_z_px" in localization:
            _number(localization["gaussian_sigma_z_px"], "localization.gaussian_sigma_z_px", 0.0, 50.0)
        if "slice_weight_z_scale" in localization:
            _number(localization["slice_weight_z_scale"], "localization.slice_weight_z_scale", 0.0, 100.0)
        if "seed" in localization:
            _integer(localization["seed"], "localization.seed", 0, 2**32 - 1)
        if localization.get("attribution", "gradient") not in ATTRIBUTIONS:
            raise ValueError(f"localization.attribution must be one of {', '.join(ATTRIBUTIONS)}")
    check_loose(localization, "localization")


def _validated_array_specs(specs) -> dict[str, dict]:
    if not isinstance(specs, dict) or not 0 < len(specs) <= _MAX_MEMBERS:
        raise ValueError("'arrays' is missing or not a mapping")
    total = 0
    for name, spec in specs.items():
        if not isinstance(spec, dict) or not re.fullmatch(r"[A-Za-z0-9_.]{1,200}", name):
            raise ValueError(f"array entry {name!r} is malformed")
        shape, dtype, digest = spec.get("shape"), spec.get("dtype"), spec.get("sha256")
        if not isinstance(shape, list) or len(shape) > 5 or not all(
                isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 1 << 30 for n in shape):
            raise ValueError(f"array {name!r} has a malformed shape {shape!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"array {name!r} has an unsupported dtype {dtype!r}")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"array {name!r} has a malformed checksum")
        total += int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
    if total > _MAX_ARRAY_BYTES:
        raise ValueError(f"its arrays declare {total:,} bytes, more than a model needs ({_MAX_ARRAY_BYTES:,})")
    return specs


def _check_network_arrays(specs: dict, width: int, features: int, pool: int, size: list[int],
                          check_network: bool) -> None:
    """The arrays must be exactly those of the network, mixture and templates the manifest describes."""
    listed = {k: v["shape"] for k, v in specs.items() if k.startswith("encoder.")}
    if check_network:  # the network the manifest describes, built without memory, must have exactly these weights
        import torch

        from .encoder import SliceEncoder

        with torch.device("meta"):
            expected = {f"encoder.{k}": list(v.shape)
                        for k, v in SliceEncoder(width, features, pool).state_dict().items()}
        if listed != expected:
            differ = sorted(set(listed) ^ set(expected)) or [k for k in expected if listed[k] != expected[k]]
            raise ValueError(f"the encoder it describes (width {width}, {features} features, grid {pool}) does not "
                             f"match its weights ({differ[0]})")
    mixture = {k: specs.get(f"gmm.{k}", {}).get("shape") for k in
               ("feature_mean", "feature_std", "weights", "means", "precisions_cholesky")}
    means = mixture["means"]
    if not (isinstance(means, list) and len(means) == 2 and means[1] == features
            and LIMITS["components"][0] <= means[0] <= LIMITS["components"][1]):
        raise ValueError(f"the mixture's means {means} do not match the encoder's {features} features")
    k = means[0]
    if mixture != {"feature_mean": [features], "feature_std": [features], "weights": [k], "means": [k, features],
                   "precisions_cholesky": [k, features, features]}:
        raise ValueError("the mixture's arrays have inconsistent shapes")
    grid_shape = [size[2], size[1], size[0]]
    grid_arrays = ["template", "template_mask"]
    if "normal_mean" in specs or "normal_mean_mask" in specs:
        grid_arrays += ["normal_mean", "normal_mean_mask"]
    for name in grid_arrays:
        if specs.get(name, {}).get("shape") != grid_shape:
            raise ValueError(f"{name} shape {specs.get(name, {}).get('shape')} does not match the reference grid "
                             f"{grid_shape}")
    known = set(listed) | {f"gmm.{k}" for k in mixture} | set(grid_arrays)
    if set(specs) - known:
        raise ValueError(f"unknown array {sorted(set(specs) - known)[0]!r}")


def _check_members(archive: zipfile.ZipFile, specs: dict, path: Path) -> None:
    """Each array member's declared size must fit its array (plus an .npy header) before anything is read."""
    for name, spec in specs.items():
        try:
            info = archive.getinfo(f"arrays/{name}.npy")
        except KeyError:
            raise ModelError(f"{path} lacks array {name!r}") from None
        data = int(np.prod(spec["shape"], dtype=np.float64)) * np.dtype(spec["dtype"]).itemsize
        if not data < info.file_size <= data + _MAX_NPY_HEADER:
            raise ModelError(f"{path}: member for array {name!r} declares {info.file_size:,} bytes, its array needs "
                             f"{data:,}: the file was modified or damaged")


def _read_array(archive: zipfile.ZipFile, name: str, spec: dict, path: Path) -> np.ndarray:
    info = archive.getinfo(f"arrays/{name}.npy")
    data = _read_capped(archive, info, info.file_size)
    if hashlib.sha256(data).hexdigest() != spec.get("sha256"):
        raise ModelError(f"{path} failed its checksum for {name!r}: the file was modified or damaged")
    array = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    if list(array.shape) != list(spec["shape"]) or str(array.dtype) != spec["dtype"]:
        raise ModelError(f"{path}: array {name!r} has shape {array.shape}, manifest says {spec['shape']}")
    return array


def _assemble(stored: dict, arrays: dict, path: Path, fingerprint: str | None = None) -> ModelBundle:
    import torch

    from .encoder import SliceEncoder
    from .gmm import GaussianMixtureNLL

    try:
        manifest = ModelManifest.from_dict(stored)
        spec = manifest.encoder
        encoder = SliceEncoder(spec.width, spec.feature_dim, spec.grid)
        state = {k[len("encoder."):]: torch.from_numpy(v.copy()) for k, v in arrays.items() if k.startswith("encoder.")}
        encoder.load_state_dict(state, strict=True)
        gmm = GaussianMixtureNLL.from_arrays(arrays)
        grid = manifest.reference.grid
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise ModelError(f"{path} does not describe a consistent model: {str(exc).splitlines()[0][:160]}") from None
    expected = tuple(reversed(grid.size))
    for name in ("template", "template_mask"):
        if arrays[name].shape != expected:
            raise ModelError(f"{path}: {name} shape {arrays[name].shape} does not match the reference grid {expected}")
    if gmm.means.shape[1] != encoder.feature_dim:
        raise ModelError(f"{path}: mixture dimension {gmm.means.shape[1]} != encoder features {encoder.feature_dim}")
    for name, value in arrays.items():
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise ModelError(f"{path}: array {name!r} holds NaN or infinite values")
    if not np.all(np.asarray(arrays["gmm.feature_std"]) > 0) or not np.all(np.asarray(arrays["gmm.weights"]) > 0):
        raise ModelError(f"{path}: the mixture has zero feature spreads or component weights")
    normal_mean = None
    if "normal_mean" in arrays:
        normal_mean = np.where(arrays["normal_mean_mask"] > 0, arrays["normal_mean"], np.nan).astype(np.float32)
    encoder.eval()
    gmm.eval()
    return ModelBundle(manifest, encoder, gmm, arrays["template"], arrays["template_mask"], path, fingerprint,
                       normal_mean)
