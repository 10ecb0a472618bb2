"""Methods scored side by side with the model: CRADL variants and the paper's baselines.

Every method works on the same `PreparedScan` the detector makes (the model's reference space and
intensity normalisation), is fitted on the model's own training split of the normal cohort, and is
calibrated the same way the trainer calibrates CRADL (slice statistics, heatmap scale, voxel threshold
and leave-one-out normal volume scores on the validation and calibration splits together). So only the
scoring differs between methods, never the data or the calibration.

* `CradlMethod`: an `AnomalyDetector` built around another encoder / mixture (K = 1, 2, 4, 8; the
  projection head's output instead of the encoder's). The bundle stores no projection head: it is
  taken from the training checkpoint (`MODEL.ckpt`, written by `train` with resume) when that holds
  the bundle's encoder; otherwise a short SimCLR run gives a fresh encoder + head pair, and both its
  encoder and its head features are scored, so the comparison stays like for like.
* `ZScoreBaseline`: per-voxel intensity z-score against the normal cohort in reference space (one
  atlas per contrast when the cohort records contrasts; a scan uses the atlas it correlates best with).
* `VAEBaseline`: a small convolutional VAE on the same slices; sample level from a Gaussian mixture on
  its latent means, voxel level from its reconstruction error.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..bundle import ModelBundle
from ..calibration import aggregate
from ..detector import AnomalyDetector
from ..encoder import ProjectionHead, SliceEncoder
from ..gmm import GaussianMixtureNLL
from ..io import find_scans
from ..localize import postprocess_saliency
from ..preprocess import PreparedScan
from ..train.simclr import train_simclr
from ..train.trainer import (TrainConfig, calibrate, calibrate_heatmaps, config_from_manifest, encode, fit_mixture,
                             leave_one_out, prepare_all, select_mixture, slice_statistics, split_scans)

log = logging.getLogger("cradl.evaluate")


# ----------------------------------------------------------------------------- the normal cohort


@dataclass
class Cohort:
    """The model's normal scans in its reference space, with the model's train / validation / calibration split."""

    config: TrainConfig
    paths: list[Path]
    scans: list[PreparedScan]
    train: np.ndarray
    val: np.ndarray
    cal: np.ndarray
    contrasts: list[str | None]
    progress: bool = True  # progress bars while methods are fitted and calibrated on this cohort

    def pick(self, idx) -> list[PreparedScan]:
        return [self.scans[i] for i in idx]

    def slices(self, idx) -> np.ndarray:
        return np.concatenate([self.scans[i].slices for i in idx])


def load_cohort(detector: AnomalyDetector, normal_dirs=None, cache: Path | None = None,
                progress: bool = True) -> Cohort:
    """The normal scans the model was trained on (default: the folders its manifest names), prepared in its space."""
    config = config_from_manifest(detector.bundle.manifest)
    dirs = list(normal_dirs or detector.bundle.manifest.training_data)
    if not dirs:
        raise ValueError("the model does not name its training data; pass the normal-scan folder")
    paths = find_scans(dirs)
    train, val, cal = split_scans(len(paths), config)
    scans = prepare_all(paths, detector.space, config, cache, progress)
    scans = for_scoring(scans)
    contrasts = _cohort_contrasts(paths)
    log.info("normal cohort: %d scans (%d train, %d validation, %d calibration)", len(paths), len(train),
             len(val), len(cal))
    return Cohort(config, paths, scans, train, val, cal, contrasts, progress)


def for_scoring(scans: list[PreparedScan]) -> list[PreparedScan]:
    """The trainer's cache holds float16 volumes (returned as such when it is reused): score in float32."""
    return [PreparedScan(s.volume.astype(np.float32), s.mask.astype(bool), s.transform, s.slice_indices)
            for s in scans]


def _cohort_contrasts(paths: list[Path]) -> list[str | None]:
    records = {}
    for folder in {p.parent for p in paths}:
        cohort = folder / "cohort.json"
        if cohort.exists():
            for rec in json.loads(cohort.read_text()).get("scans", []):
                records[str(folder / rec["image"])] = rec.get("contrast")
    return [records.get(str(p)) for p in paths]


# ----------------------------------------------------------------------------- method interface


class Method:
    """A scorer: prepared scan -> slice scores (for its slice_indices) and a reference-grid heatmap."""

    name = "method"
    family = "baseline"
    calibration: dict

    def score(self, prepared: PreparedScan, heatmap: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def volume_score(self, nll: np.ndarray, indices: np.ndarray) -> float:
        return aggregate(nll, indices, self.calibration)

    @property
    def threshold(self) -> float:
        return float(self.calibration["voxel_threshold"])

    @property
    def min_region_mm3(self) -> float:
        return float(self.calibration["min_region_mm3"])

    def describe(self) -> dict:
        return {"name": self.name, "family": self.family}


class CradlMethod(Method):
    """CRADL with a given feature extractor and mixture, through the detector's own scoring code."""

    family = "cradl"

    def __init__(self, name: str, detector: AnomalyDetector, info: dict | None = None):
        self.name, self.detector, self.info = name, detector, dict(info or {})
        self.calibration = detector.calibration

    def score(self, prepared, heatmap=True):
        if heatmap:
            return self.detector.reference_heatmap(prepared)
        from ..localize import score_slices
        idx = prepared.slice_indices
        return score_slices(prepared.volume[idx], self.detector.encoder, self.detector.gmm, self.detector.device), None

    def describe(self):
        return {"name": self.name, "family": self.family, "gmm_components": self.detector.gmm.n_components,
                **self.info}


class _HeadFeatures(nn.Module):
    """Encoder followed by the SimCLR projection head: the 'head output' feature variant."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head
        self.feature_dim = head.net[-1].out_features
        self.width = getattr(encoder, "width", None)

    def forward(self, x):
        return self.head(self.encoder(x))


def cradl_variant(base: AnomalyDetector, name: str, features: nn.Module, gmm: GaussianMixtureNLL, cohort: Cohort,
                  info: dict | None = None) -> CradlMethod:
    """A detector sharing the base's reference space and settings, with its own features, mixture and calibration."""
    features = features.to(base.device).eval()
    gmm = gmm.to(base.device).eval()
    calibration, normal_mean = calibrate(features, gmm, cohort.pick(np.concatenate([cohort.val, cohort.cal])),
                                         cohort.config, base.device, cohort.progress)
    manifest = base.bundle.manifest.with_fields(calibration=calibration, name=f"{base.bundle.name}:{name}")
    bundle = ModelBundle(manifest, features, gmm, base.bundle.template, base.bundle.template_mask, base.bundle.path,
                         normal_mean=normal_mean)
    return CradlMethod(name, AnomalyDetector(bundle, device=base.device, batch_size=base.batch_size), info)


def cradl_k_variants(base: AnomalyDetector, cohort: Cohort, ks=(1, 2, 4, 8), prefix: str = "CRADL",
                     features: nn.Module | None = None) -> list[CradlMethod]:
    """CRADL with K = 1, 2, 4, 8 mixture components on the same features (default: the bundle's encoder).
    The K the bundle itself holds is reused as it is (its own calibration), not refitted."""
    features = features if features is not None else base.encoder
    own = features is base.encoder
    train_f = encode(features, cohort.slices(cohort.train), base.device)
    val_f = encode(features, cohort.slices(cohort.val), base.device)
    methods = []
    for k in ks:
        if k * 10 > len(train_f):
            log.info("skipping K=%d: too few training slices", k)
            continue
        t = time.perf_counter()
        if own and k == base.gmm.n_components:
            methods.append(CradlMethod(f"{prefix} K={k}", base, {"k": k, "source": "bundle"}))
            continue
        gmm, held_out = fit_mixture(train_f, val_f, k, cohort.config)
        methods.append(cradl_variant(base, f"{prefix} K={k}", features, gmm, cohort,
                                     {"k": k, "validation_log_likelihood": round(held_out, 3)}))
        log.info("%s K=%d fitted and calibrated in %.0f s", prefix, k, time.perf_counter() - t)
    return methods


def load_projection_head(base: AnomalyDetector, checkpoint: Path, projection_dim: int | None = None
                         ) -> ProjectionHead | None:
    """The SimCLR projection head from a training checkpoint, if that checkpoint holds the bundle's encoder."""
    if not Path(checkpoint).is_file():
        return None
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    enc_state = state.get("encoder", {})
    own = base.bundle.encoder.state_dict()
    if set(enc_state) != set(own) or not all(torch.allclose(enc_state[k].float().cpu(), own[k].float().cpu())
                                               for k in own):
        log.info("checkpoint %s does not hold this model's encoder; not using its head", checkpoint)
        return None
    head_state = state["head"]
    feature_dim = head_state["net.0.weight"].shape[1]
    head = ProjectionHead(feature_dim, projection_dim or head_state["net.2.weight"].shape[0])
    head.load_state_dict(head_state)
    return head.eval()


def fresh_encoder(base: AnomalyDetector) -> SliceEncoder:
    """An untrained encoder of the model's own architecture (width, feature size and pooling grid), so a
    short run compares like with like: an older bundle's recipe may lack the grid its encoder was built with."""
    model = base.bundle.encoder
    return SliceEncoder(model.width, model.feature_dim, model.grid)


def projection_head_variants(base: AnomalyDetector, cohort: Cohort, checkpoint: Path | None, short_epochs: int = 3,
                             k: int | None = None) -> list[CradlMethod]:
    """CRADL on the projection head's output. Uses the training checkpoint's head when it matches the bundle;
    otherwise trains a short SimCLR run and returns its encoder variant and its head variant (same run)."""
    config = cohort.config
    k = k or base.gmm.n_components
    head = load_projection_head(base, checkpoint) if checkpoint else None
    methods = []
    if head is not None:
        features = _HeadFeatures(base.encoder, head.to(base.device))
        source = f"projection head from {Path(checkpoint).name}"
    else:
        log.info("training a short SimCLR run (%d epochs) for the projection-head variant", short_epochs)
        torch.manual_seed(config.seed)
        short = dataclasses.replace(config, epochs=short_epochs)
        encoder = fresh_encoder(base).to(base.device)
        head = ProjectionHead(encoder.feature_dim, config.projection_dim).to(base.device)
        t = time.perf_counter()
        train_simclr(encoder, head, cohort.slices(cohort.train), short, base.device, None, cohort.progress)
        encoder.eval(), head.eval()
        for p in list(encoder.parameters()) + list(head.parameters()):
            p.requires_grad_(False)
        source = f"short SimCLR run, {short_epochs} epochs ({time.perf_counter() - t:.0f} s)"
        train_f = encode(encoder, cohort.slices(cohort.train), base.device)
        val_f = encode(encoder, cohort.slices(cohort.val), base.device)
        gmm, held_out = fit_mixture(train_f, val_f, k, config)
        methods.append(cradl_variant(base, f"CRADL short-run encoder K={k}", encoder, gmm, cohort,
                                     {"k": k, "features": "encoder", "source": source}))
        features = _HeadFeatures(encoder, head)
    train_f = encode(features, cohort.slices(cohort.train), base.device)
    val_f = encode(features, cohort.slices(cohort.val), base.device)
    gmm, held_out = fit_mixture(train_f, val_f, k, config)
    name = f"CRADL short-run head K={k}" if methods else f"CRADL head K={k}"
    methods.append(cradl_variant(base, name, features, gmm, cohort,
                                 {"k": k, "features": "projection head", "source": source,
                                  "validation_log_likelihood": round(held_out, 3)}))
    return methods


# ----------------------------------------------------------------------------- calibration for baselines


def _calibrate_method(method: Method, cohort: Cohort) -> dict:
    """The trainer's calibration steps on a method's own scores, over the validation and calibration scans,
    normal volume scores by leave-one-out. Unlike CRADL's (`calibrate`), the heatmaps are the whole
    reference grid's, and there is no typicality model."""
    config = cohort.config
    scans = cohort.pick(np.concatenate([cohort.val, cohort.cal]))
    method.calibration = {"heatmap_scale": 1.0}
    nlls, heats = zip(*(method.score(s, heatmap=True) for s in scans))
    calibration = slice_statistics(list(nlls), scans, config)
    calibration["volume_scores"] = sorted(aggregate(nll, scan.slice_indices, others)
                                          for scan, nll, others in leave_one_out(list(nlls), scans, config))
    calibration.update(calibrate_heatmaps(list(heats), [s.mask for s in scans], config))
    return calibration


# ----------------------------------------------------------------------------- intensity z-score


class ZScoreBaseline(Method):
    """|intensity - normal mean| / normal spread, voxel by voxel in reference space, post-processed like
    CRADL's saliency (median 5 px, Gaussian). Slice score: the 99th percentile of the slice's heatmap."""

    name = "Intensity z-score"

    def __init__(self, localization: dict, std_floor_fraction: float = 0.5):
        self.localization = dict(localization)
        self.std_floor_fraction = std_floor_fraction
        self.atlases: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.calibration = {}

    def fit(self, cohort: Cohort) -> "ZScoreBaseline":
        groups: dict[str, list[int]] = {}
        for i in cohort.train:
            groups.setdefault(cohort.contrasts[i] or "all", []).append(int(i))
        for name, idx in groups.items():
            if len(idx) < 3:
                continue
            stack = np.stack([cohort.scans[i].volume for i in idx]).astype(np.float32)
            mean, std = stack.mean(0), stack.std(0)
            brain = cohort.scans[idx[0]].mask
            floor = self.std_floor_fraction * float(np.median(std[brain])) + 1e-3
            self.atlases[name] = (mean, np.maximum(std, floor))
        if not self.atlases:  # too few scans per contrast: one pooled atlas
            stack = np.stack([cohort.scans[i].volume for i in cohort.train])
            std = stack.std(0)
            self.atlases["all"] = (stack.mean(0), np.maximum(std, self.std_floor_fraction * np.median(std) + 1e-3))
        self.calibration = _calibrate_method(self, cohort)
        return self

    def atlas_for(self, prepared: PreparedScan) -> str:
        m = prepared.mask
        v = prepared.volume[m]
        return max(self.atlases, key=lambda k: float(np.corrcoef(v, self.atlases[k][0][m])[0, 1]))

    def score(self, prepared, heatmap=True):
        mean, std = self.atlases[self.atlas_for(prepared)]
        idx = prepared.slice_indices
        z = np.abs(prepared.volume[idx] - mean[idx]) / std[idx]
        heat_idx = postprocess_saliency(z.astype(np.float32), prepared.mask[idx], self.localization, idx)
        nll = np.array([np.percentile(h[m], 99) if m.any() else 0.0
                        for h, m in zip(heat_idx, prepared.mask[idx])], dtype=np.float64)
        if not heatmap:
            return nll, None
        heat = np.zeros(prepared.volume.shape, np.float32)
        heat[idx] = heat_idx
        return nll, heat / float(self.calibration.get("heatmap_scale", 1.0))

    def describe(self):
        return {"name": self.name, "family": self.family, "atlases": sorted(self.atlases)}


# ----------------------------------------------------------------------------- VAE


class SliceVAE(nn.Module):
    """A small convolutional VAE for (N, 1, S, S) slices, S divisible by 16."""

    def __init__(self, size: int, width: int = 16, latent: int = 32):
        super().__init__()
        if size % 16:
            raise ValueError("slice size must be divisible by 16 for the VAE")
        w, self.cells, self.size, self.latent = width, size // 16, size, latent

        def down(a, b):
            return nn.Sequential(nn.Conv2d(a, b, 4, 2, 1), nn.BatchNorm2d(b), nn.LeakyReLU(0.2, inplace=True))

        def up(a, b):
            return nn.Sequential(nn.ConvTranspose2d(a, b, 4, 2, 1), nn.BatchNorm2d(b), nn.LeakyReLU(0.2, inplace=True))

        self.enc = nn.Sequential(down(1, w), down(w, 2 * w), down(2 * w, 4 * w), down(4 * w, 8 * w), nn.Flatten())
        flat = 8 * w * self.cells ** 2
        self.mu, self.logvar = nn.Linear(flat, latent), nn.Linear(flat, latent)
        self.fc = nn.Linear(latent, flat)
        self.dec = nn.Sequential(up(8 * w, 4 * w), up(4 * w, 2 * w), up(2 * w, w), nn.ConvTranspose2d(w, 1, 4, 2, 1))
        self.width = w

    def encode(self, x):
        h = self.enc(x)
        return self.mu(h), self.logvar(h).clamp(-10, 10)

    def decode(self, z):
        return self.dec(self.fc(z).view(len(z), 8 * self.width, self.cells, self.cells))

    def forward(self, x):
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.decode(z), mu, logvar


class VAEBaseline(Method):
    """The generative alternative: latent-GMM NLL for slices and volumes, |x - reconstruction| for voxels."""

    name = "VAE"

    def __init__(self, size: int, localization: dict, width: int = 16, latent: int = 32, epochs: int = 20,
                 batch_size: int = 64, learning_rate: float = 1e-3, beta: float = 1.0, ks=(1, 2, 4, 8),
                 seed: int = 0, device: str | torch.device = "cpu"):
        self.model = SliceVAE(size, width, latent)
        self.localization = dict(localization)
        self.epochs, self.batch_size, self.lr, self.beta, self.ks, self.seed = \
            epochs, batch_size, learning_rate, beta, tuple(ks), seed
        self.device = torch.device(device)
        self.gmm: GaussianMixtureNLL | None = None
        self.calibration, self.history, self.train_seconds = {}, [], 0.0

    def fit(self, cohort: Cohort) -> "VAEBaseline":
        t = time.perf_counter()
        torch.manual_seed(self.seed)
        data = torch.from_numpy(cohort.slices(cohort.train)).unsqueeze(1)
        model = self.model.to(self.device)
        optimiser = torch.optim.Adam(model.parameters(), lr=self.lr)
        steps = max(1, len(data) // self.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, self.lr, total_steps=self.epochs * steps)
        for epoch in range(self.epochs):
            model.train()
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
            losses = []
            for step in range(steps):
                x = data[order[step * self.batch_size:(step + 1) * self.batch_size]].to(self.device)
                recon, mu, logvar = model(x)
                rec = F.mse_loss(recon, x, reduction="sum") / len(x)
                kl = -0.5 * torch.sum(1 + logvar - mu ** 2 - logvar.exp()) / len(x)
                loss = rec + self.beta * kl
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                losses.append(loss.item())
            self.history.append(round(float(np.mean(losses)), 3))
            log.info("VAE epoch %d/%d loss %.2f", epoch + 1, self.epochs, self.history[-1])
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        train_z = self._latents(cohort.slices(cohort.train))
        val_z = self._latents(cohort.slices(cohort.val))
        gmm, selection = select_mixture(train_z, val_z, cohort.config, ks=self.ks)
        self.gmm = gmm.to(self.device).eval()
        self.k = selection["n_components"]
        self.train_seconds = time.perf_counter() - t
        self.calibration = _calibrate_method(self, cohort)
        return self

    def _latents(self, slices: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.cat([self.model.encode(torch.from_numpy(slices[i:i + 256]).unsqueeze(1).to(self.device))[0]
                              .cpu() for i in range(0, len(slices), 256)]).numpy().astype(np.float64)

    def score(self, prepared, heatmap=True):
        idx = prepared.slice_indices
        slices = prepared.volume[idx]
        nll, errors = [], []
        with torch.inference_mode():
            for i in range(0, len(slices), 64):
                x = torch.from_numpy(slices[i:i + 64]).unsqueeze(1).to(self.device)
                mu, _ = self.model.encode(x)
                nll.append(self.gmm(mu).cpu())
                if heatmap:
                    errors.append((self.model.decode(mu) - x).abs()[:, 0].cpu())
        nll = torch.cat(nll).numpy().astype(np.float64)
        if not heatmap:
            return nll, None
        err = torch.cat(errors).numpy().astype(np.float32)
        heat = np.zeros(prepared.volume.shape, np.float32)
        heat[idx] = postprocess_saliency(err, prepared.mask[idx], self.localization, idx)
        return nll, heat / float(self.calibration.get("heatmap_scale", 1.0))

    def describe(self):
        return {"name": self.name, "family": self.family, "latent": self.model.latent, "width": self.model.width,
                "epochs": self.epochs, "gmm_components": getattr(self, "k", None),
                "train_seconds": round(self.train_seconds, 1), "loss_per_epoch": self.history}
