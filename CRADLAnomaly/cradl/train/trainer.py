"""Training a CRADL model on normal scans: SimCLR encoder, Gaussian mixture, calibration, bundle."""
from __future__ import annotations

import copy
import datetime
import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from sklearn.mixture import GaussianMixture
from tqdm import tqdm

from .. import __version__
from ..atomic import atomic_path
from ..bundle import load_bundle, save_bundle
from ..calibration import DEFAULT_AGGREGATE, aggregate, fit_slice_statistics, slice_z_scores
from ..detector import resolve_device
from ..encoder import ProjectionHead, SliceEncoder
from ..errors import CradlError, InputError
from ..gmm import GaussianMixtureNLL
from ..io import find_scans, read_image
from ..localize import unweighted_heatmap, weigh_slices
from ..manifest import DEFAULT_LOCALIZATION, ModelManifest, uses_normal_mean
from ..preprocess import DEFAULT_NORMALISATION, PreparedScan, prepare_scan
from ..pins import DEEPBET
from ..space import ReferenceSpace
from ..typicality import fit_typicality
from .simclr import device_name, train_simclr

log = logging.getLogger("cradl.train")


@dataclass
class TrainConfig:
    """The training recipe; it is written into the bundle's manifest as is."""

    slice_size: int = 96
    spacing_mm: float = 2.0
    min_brain_fraction: float = 0.15
    width: int = 32
    feature_dim: int = 128
    grid: int = 4  # measured: 4x4 layout + light geometry beat global pooling + SimCLR crops (README)
    geometry: str = "light"
    projection_dim: int = 64
    epochs: int = 15
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 1e-5
    temperature: float = 0.2
    gmm_components: tuple[int, ...] = (1, 2, 4, 8)
    gmm_reg_covar: float = 1e-3
    calibration_fraction: float = 0.15
    validation_fraction: float = 0.15
    min_region_mm3: float = 100.0
    # Of normal scans' leave-one-out heatmaps (`calibrate`): at 0.95 the threshold is set by the one or two
    # most unusual of 22 validation normals; measured on held-out validation strokes (README), 0.9 showed
    # the lesion in 34 of 48 top regions instead of 22, for 0.19 false regions per normal scan instead of 0.
    false_alarm_quantile: float = 0.9
    volume_aggregate: str = DEFAULT_AGGREGATE
    localization: dict = field(default_factory=lambda: dict(DEFAULT_LOCALIZATION))
    normalisation: dict = field(default_factory=lambda: dict(DEFAULT_NORMALISATION))
    seed: int = 0
    name: str = "cradl-model"
    version: str = "1.0.0"
    description: str = ""


def split_scans(n: int, config: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of training, validation (mixture size) and calibration scans; disjoint, seeded."""
    if n < 5:
        raise InputError(f"training needs at least 5 normal scans, found {n}")
    order = np.random.default_rng(config.seed).permutation(n)
    n_cal = max(2, int(round(config.calibration_fraction * n)))
    n_val = max(2, int(round(config.validation_fraction * n)))
    return np.sort(order[n_cal + n_val:]), np.sort(order[n_cal:n_cal + n_val]), np.sort(order[:n_cal])


def prepare_all(paths: list[Path], space: ReferenceSpace, config: TrainConfig, cache: Path | None,
                progress: bool = True, masks: list[Path] | None = None) -> list[PreparedScan]:
    """Extract the brain (unless `masks` gives one per scan), align and normalise every scan once; cached
    so a resumed run skips the registrations.

    The cache is used only for the same scans prepared the same way (reference grid, normalisation,
    brain fraction, masks); anything else is prepared afresh and replaces it.
    """
    resolved = [str(Path(p).resolve()) for p in paths]
    recipe = _preparation_recipe(space, config, masks)
    if cache is not None and cache.exists():
        data = np.load(cache, allow_pickle=False)
        if list(data["paths"]) == resolved and "recipe" in data and str(data["recipe"]) == recipe:
            log.info("using cached preprocessed scans from %s", cache)
            return [PreparedScan(data[f"v{i}"].astype(np.float32), data[f"m{i}"], None, data[f"s{i}"])
                    for i in range(len(paths))]
    prepared = []
    for i, path in enumerate(tqdm(paths, desc="aligning normal scans", unit="scan", disable=not progress)):
        try:
            mask = read_image(masks[i], what="brain mask") if masks is not None else None
            scan = prepare_scan(read_image(path), space, config.normalisation, config.min_brain_fraction, mask=mask)
        except CradlError as exc:
            raise InputError(f"cannot use normal scan {path}: {exc} (remove it from the normal scans)") from None
        prepared.append(PreparedScan(scan.volume.astype(np.float16).astype(np.float32), scan.mask, None,
                                     scan.slice_indices))
    if cache is not None:
        arrays = {"paths": np.array(resolved), "recipe": np.array(recipe)}
        for i, scan in enumerate(prepared):
            arrays.update({f"v{i}": scan.volume.astype(np.float16), f"m{i}": scan.mask, f"s{i}": scan.slice_indices})
        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)
    return prepared


def _preparation_recipe(space: ReferenceSpace, config: TrainConfig, masks: list[Path] | None = None) -> str:
    """Everything that shapes a prepared scan, as the text a cache is keyed on."""
    return json.dumps({"grid": space.grid.to_json(), "normalisation": config.normalisation,
                       "min_brain_fraction": config.min_brain_fraction,
                       "masks": [str(Path(m).resolve()) for m in masks] if masks else None}, sort_keys=True)


def train_model(normal_dirs, out: str | Path, config: TrainConfig | None = None, device: str = "auto",
                resume: bool = True, scans: list[Path] | None = None, progress: bool = True,
                masks: list[Path] | None = None, groups: dict[str, list[int]] | None = None,
                data_split: dict | None = None, contrasts: tuple[str, ...] = ("t1", "t2", "flair")) -> Path:
    """Train on the normal scans in `normal_dirs` (or the list `scans`) and write the bundle to `out`.

    `masks`: a brain mask per scan (else brain extraction); `groups`: explicit scan indices for
    'train', 'validation' and 'calibration' (else a seeded split); `data_split`: the subject IDs of
    each group, recorded in the manifest; `contrasts`: the contrasts the normal scans cover.
    Returns `out`."""
    started = time.perf_counter()
    config = config or TrainConfig()
    out = Path(out)
    if not out.parent.is_dir():
        raise CradlError(f"cannot write {out}: folder {out.parent} does not exist")
    torch.manual_seed(config.seed)
    dev = resolve_device(device)
    paths = scans if scans is not None else find_scans(normal_dirs)
    if groups is not None:
        train_idx, val_idx, cal_idx = (np.asarray(groups[g], dtype=int) for g in ("train", "validation", "calibration"))
    else:
        train_idx, val_idx, cal_idx = split_scans(len(paths), config)
    space = ReferenceSpace.from_mni(config.slice_size, config.spacing_mm)
    prepared = prepare_all(paths, space, config, out.with_suffix(".prep.npz") if resume else None, progress,
                           masks=masks)

    calibration_idx = np.concatenate([val_idx, cal_idx])
    calibration_scans, calibration_paths = [prepared[i] for i in calibration_idx], [paths[i] for i in calibration_idx]
    if uses_normal_mean(config.localization):  # before hours of training, not after
        NormalMean(calibration_scans).check_one_contrast(calibration_scans, calibration_paths)
    train_slices = np.concatenate([prepared[i].slices for i in train_idx])
    log.info("%d scans: %d training (%d slices), %d validation, %d calibration", len(paths), len(train_idx),
             len(train_slices), len(val_idx), len(cal_idx))
    encoder = SliceEncoder(config.width, config.feature_dim, config.grid).to(dev)
    head = ProjectionHead(config.feature_dim, config.projection_dim).to(dev)
    run = train_simclr(encoder, head, train_slices, config, dev, out.with_suffix(".ckpt") if resume else None,
                       progress)
    encoder.eval()

    val_slices = np.concatenate([prepared[i].slices for i in val_idx])
    gmm, selection = select_mixture(encode(encoder, train_slices, dev), encode(encoder, val_slices, dev), config)
    gmm = gmm.to(dev)
    calibration, normal_mean = calibrate(encoder, gmm, calibration_scans, config, dev, progress, calibration_paths)
    manifest = {
        "name": config.name, "version": config.version, "description": config.description,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cradl_version": __version__,
        "training": {"recipe": _recipe(config), "n_scans": len(paths), "n_train_scans": len(train_idx),
                     "n_train_slices": int(len(train_slices)), "n_validation_scans": len(val_idx),
                     "n_calibration_scans": len(cal_idx), "data": [str(d) for d in (normal_dirs or [])],
                     "device": str(dev), "device_name": device_name(dev),
                     "seconds": round(time.perf_counter() - started, 1), **run.record(),
                     **({"data_split": data_split} if data_split else {})},
        "contrasts": list(contrasts),
        "reference": {"grid": space.grid.to_json(), "template": "MNI152 2009a symmetric T1 (nilearn)",
                      "min_brain_fraction": config.min_brain_fraction,
                      "brain_extraction": {"method": f"{DEEPBET}, or the scan's own region when already "
                                           "skull-stripped", "masks_given": masks is not None}},
        "normalisation": config.normalisation,
        "encoder": {"width": config.width, "feature_dim": config.feature_dim, "grid": config.grid},
        "gmm": selection,
        "localization": config.localization,
        "calibration": calibration,
    }
    save_bundle(out, manifest, encoder.cpu(), gmm.cpu(), sitk.GetArrayFromImage(space.template),
                sitk.GetArrayFromImage(space.template_mask), normal_mean)
    log.info("wrote %s in %.0f s", out, time.perf_counter() - started)
    return out


def _recipe(config: TrainConfig) -> dict:
    data = asdict(config)
    data["gmm_components"] = list(config.gmm_components)
    return data


def encode(encoder: SliceEncoder, slices: np.ndarray, dev: torch.device, batch_size: int = 256) -> np.ndarray:
    """Features (N, D) of slices (N, S, S), in float64 for the mixture fit."""
    with torch.inference_mode():
        return torch.cat([encoder(torch.from_numpy(slices[i:i + batch_size]).unsqueeze(1).to(dev)).cpu()
                          for i in range(0, len(slices), batch_size)]).numpy().astype(np.float64)


def fit_mixture(train_features: np.ndarray, val_features: np.ndarray, k: int, config: TrainConfig
                ) -> tuple[GaussianMixtureNLL, float]:
    """A K-component full-covariance Gaussian mixture on features standardised per dimension (with the
    training features' mean and spread), and its held-out mean log-likelihood on `val_features`.

    The density model of CRADL and of every baseline that scores features by likelihood (CRADL's K
    variants, the VAE's latent means): one fit, so their likelihoods are comparable."""
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    mixture = GaussianMixture(k, covariance_type="full", reg_covar=config.gmm_reg_covar, max_iter=300, n_init=2,
                              random_state=config.seed).fit((train_features - mean) / std)
    held_out = float(mixture.score((val_features - mean) / std))
    return GaussianMixtureNLL.from_sklearn(mixture, mean, std), held_out


def select_mixture(train_features: np.ndarray, val_features: np.ndarray, config: TrainConfig,
                   ks=None) -> tuple[GaussianMixtureNLL, dict]:
    """The mixture (on the CPU) with the best held-out likelihood among K in `ks` (default
    config.gmm_components; a K with fewer than 10 training features per component is skipped), and the
    record of the choice the manifest keeps."""
    fits, scores = {}, {}
    for k in (config.gmm_components if ks is None else ks):
        if k * 10 > len(train_features):
            continue
        fits[k], scores[k] = fit_mixture(train_features, val_features, k, config)
        log.info("GMM K=%d: held-out mean log-likelihood %.2f", k, scores[k])
    best = max(scores, key=scores.get)
    return fits[best], {"n_components": best, "covariance": "full", "reg_covar": config.gmm_reg_covar,
                        "validation_log_likelihood": {str(k): round(v, 3) for k, v in scores.items()}}


def slice_statistics(nlls: list[np.ndarray], scans: list[PreparedScan], config: TrainConfig) -> dict:
    """The normal slice-score statistics per slice position, from held-out scans' slice scores (one array per
    scan, over its slice_indices), and the volume aggregate that turns slice scores into a volume score."""
    means, stds = fit_slice_statistics(nlls, [s.slice_indices for s in scans], scans[0].volume.shape[0])
    return {"slice_nll_mean": means, "slice_nll_std": stds, "volume_aggregate": config.volume_aggregate}


def leave_one_out(nlls: list[np.ndarray], scans: list[PreparedScan], config: TrainConfig):
    """Each scan, its slice scores and the slice statistics of all the other scans: what a normal reference
    is read against, so that it scores as a new scan would (a scan inside the statistics pulls them towards
    itself and scores lower than an unseen one)."""
    for i, (scan, nll) in enumerate(zip(scans, nlls)):
        yield scan, nll, slice_statistics(nlls[:i] + nlls[i + 1:], scans[:i] + scans[i + 1:], config)


def calibrate_heatmaps(heats: list[np.ndarray], masks: list[np.ndarray], config: TrainConfig) -> dict:
    """Heatmap scale (99th percentile of normal heatmap values inside the masks; 1 if that is 0) and the voxel
    threshold that caps false alarms, from normal scans' heatmaps. Shared by CRADL and every baseline, so
    every method is thresholded on the same footing."""
    scale = float(np.percentile(np.concatenate([h[m] for h, m in zip(heats, masks)]), 99.0)) or 1.0
    # The n-th largest value of a normal heatmap bounds from above the threshold at which it would still
    # show a region of n voxels; a quantile of those over normal scans caps false alarms per scan.
    n_voxels = max(1, int(np.ceil(config.min_region_mm3 / config.spacing_mm ** 3)))
    upper = [float(np.sort(h[m])[-n_voxels]) / scale for h, m in zip(heats, masks)]
    return {"heatmap_scale": scale, "voxel_threshold": float(np.quantile(upper, config.false_alarm_quantile)),
            "false_alarm_quantile": config.false_alarm_quantile, "normal_region_bounds": [round(u, 4) for u in upper],
            "min_region_mm3": config.min_region_mm3}


def calibrate(encoder, gmm, scans: list[PreparedScan], config: TrainConfig, dev, progress: bool = True,
              names: list | None = None) -> tuple[dict, np.ndarray | None]:
    """A model's normal statistics (the manifest's `calibration`) from held-out normal scans, every scan
    serving every statistic: the slice statistics per position come from all of them; each scan's volume
    score, typical slice z and heatmap are read against the statistics of the others (`leave_one_out`).
    So no scan is set aside for one role only (a site with 10 normal scans gets 10 percentile references,
    not 5), and no reference is flattered by statistics it took part in. Used by training, recalibration
    and the CRADL variants. Also returns the normal mean image (`NormalMean`) where the heatmap settings
    read it, else None. `names`: the scans' files, for messages."""
    for p in encoder.parameters():
        p.requires_grad_(False)
    mean = NormalMean(scans) if uses_normal_mean(config.localization) else None
    if mean is not None:
        mean.check_one_contrast(scans, names)
    # one network pass per scan (NLLs and heatmap together, as detection does); the slice weighting waits
    # for the statistics of the other scans
    scored = [unweighted_heatmap(s.volume, s.mask, s.slice_indices, encoder, gmm, config.localization, dev,
                                 normal_mean=mean.without(s) if mean is not None else None)
              for s in tqdm(scans, desc="calibrating on held-out normals", unit="scan", disable=not progress)]
    nlls = [nll for nll, _ in scored]
    stats = slice_statistics(nlls, scans, config)
    volume_scores, slice_z, heats = [], [], []
    for (scan, nll, own), (_, heat) in zip(leave_one_out(nlls, scans, config), scored):
        idx = scan.slice_indices
        heats.append(weigh_slices(heat, nll, idx, config.localization, own))
        volume_scores.append(aggregate(nll, idx, own))
        slice_z.append(slice_z_scores(nll, idx, own))
    stats["volume_scores"] = sorted(volume_scores)
    stats["typicality"] = fit_typicality(slice_z)
    stats.update({"n_scans": len(scans), "n_heatmap_scans": len(heats)})
    stats.update(calibrate_heatmaps(heats, [s.mask[s.slice_indices] for s in scans], config))
    return stats, mean.image() if mean is not None else None


class NormalMean:
    """The voxelwise mean intensity of normal scans on the reference grid, and the same without one scan
    (leave one out, as `calibrate` reads every statistic). NaN where fewer than half of the scans have
    brain: there the scans do not agree on what is normal, so no pixel is read against them (a scan's
    brain mask reaching past the usual brain outline is not, by itself, an anomaly)."""

    MIN_COVERAGE = 0.5
    # Correlation of a scan with the mean of the others, inside both: 0.76-0.86 for 22 real T1 heads (IXI, N4),
    # 0.81-0.89 for synthetic T1s; in the test suite's cohort mixing T1, T2 and FLAIR, -0.22 to 0.55.
    MIN_AGREEMENT = 0.5

    def __init__(self, scans: list[PreparedScan]):
        self.sums = np.sum([s.volume * s.mask for s in scans], axis=0, dtype=np.float64)
        self.counts = np.sum([s.mask for s in scans], axis=0, dtype=np.int32)
        self.n_scans = len(scans)

    def image(self) -> np.ndarray:
        return self._mean(self.sums, self.counts, self.n_scans)

    def without(self, scan: PreparedScan) -> np.ndarray:
        return self._mean(self.sums - scan.volume * scan.mask, self.counts - scan.mask, self.n_scans - 1)

    def agreement(self, scan: PreparedScan) -> float:
        """Correlation of the scan's intensities with the mean of the other scans where both have brain."""
        others = self.without(scan)
        inside = scan.mask & np.isfinite(others)
        return float(np.corrcoef(scan.volume[inside], others[inside])[0, 1]) if inside.sum() > 2 else 0.0

    def check_one_contrast(self, scans: list[PreparedScan], names: list | None = None) -> None:
        """Refuse normal scans whose mean means nothing: a mixture of contrasts (a T2 read against the mean
        of T1s and T2s would light up everywhere)."""
        agreement = [self.agreement(s) for s in scans]
        worst = int(np.argmin(agreement))
        if agreement[worst] < self.MIN_AGREEMENT:
            name = names[worst] if names else f"{worst + 1} of {len(scans)}"
            raise InputError(f"normal scan {name} does not look like the others (its intensities "
                             f"correlate {agreement[worst]:.2f} with their mean): the gradient_x_deviation heatmap "
                             "reads every scan against the normal scans' mean, so they must share one contrast. "
                             "Calibrate on scans of one contrast, or use --attribution gradient")

    def _mean(self, sums, counts, n_scans) -> np.ndarray:
        covered = counts >= max(1, self.MIN_COVERAGE * n_scans)
        return np.where(covered, sums / np.maximum(counts, 1), np.nan).astype(np.float32)


def config_from_manifest(manifest: ModelManifest, **overrides) -> TrainConfig:
    """The TrainConfig a bundle was trained with (its recipe), with the bundle's detection settings and its
    last calibration's false-alarm quantile winning over the recipe (they are what detection uses), then
    `overrides`."""
    names = {f.name for f in fields(TrainConfig)}
    recipe = {k: v for k, v in manifest.recipe.items() if k in names}
    if "gmm_components" in recipe:
        recipe["gmm_components"] = tuple(recipe["gmm_components"])
    recipe.update(localization=dict(manifest.localization), normalisation=dict(manifest.normalisation),
                  min_brain_fraction=manifest.reference.min_brain_fraction)
    if "false_alarm_quantile" in manifest.calibration:
        recipe["false_alarm_quantile"] = manifest.calibration["false_alarm_quantile"]
    recipe.update(overrides)
    return TrainConfig(**recipe)


def recalibrate_model(model: str | Path | None, normal_dirs, out: str | Path, localization: dict | None = None,
                      false_alarm_quantile: float | None = None, version: str | None = None,
                      device: str = "auto", progress: bool = True, scans: list[Path] | None = None,
                      masks: list[Path] | None = None) -> Path:
    """Re-derive a model's normal statistics from normal scans it was not trained on; weights stay as they are.

    For a site's own scanners and protocols, or after changing the heatmap post-processing
    (`localization` overrides). Every scan serves every statistic, by leave-one-out (`calibrate`);
    `false_alarm_quantile` defaults to the model's recipe. `scans` and `masks` work as in `train_model`.
    """
    bundle = load_bundle(model)
    paths = scans if scans is not None else find_scans(normal_dirs)
    if len(paths) < 4:
        raise InputError(f"calibration needs at least 4 normal scans; found {len(paths)}")
    manifest = copy.deepcopy(bundle.manifest.stored)
    # settings an older bundle lacks (e.g. smoothing across slices) take today's defaults
    overrides = {"localization": {**DEFAULT_LOCALIZATION, **manifest["localization"], **(localization or {})}}
    if false_alarm_quantile is not None:
        overrides["false_alarm_quantile"] = false_alarm_quantile
    config = config_from_manifest(bundle.manifest, **overrides)
    space = ReferenceSpace(bundle.grid, bundle.template, bundle.template_mask)
    prepared = prepare_all(paths, space, config, cache=None, progress=progress, masks=masks)
    dev = resolve_device(device)
    calibration, normal_mean = calibrate(bundle.encoder.to(dev).eval(), bundle.gmm.to(dev), prepared, config, dev,
                                         progress, paths)
    manifest["localization"] = config.localization
    manifest["calibration"] = calibration
    manifest["version"] = version or manifest["version"]
    manifest.setdefault("recalibrations", []).append({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "n_scans": len(paths), "data": [str(d) for d in (normal_dirs or paths)],
        "cradl_version": __version__})
    save_bundle(out, manifest, bundle.encoder.cpu(), bundle.gmm.cpu(), bundle.template, bundle.template_mask,
                normal_mean)
    return Path(out)
