"""AnomalyDetector: a scan in, scores, a heatmap on the scan's own grid and ranked regions out."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from . import __version__, calibration, typicality
from .calibration import describe_percentile
from .bundle import ModelBundle, load_bundle
from .errors import DetectionCancelled, InputError
from .io import read_image, validate_image
from .localize import scan_heatmap, score_slices
from .preprocess import PreparedScan, prepare_scan
from .regions import Region, find_regions
from .space import ReferenceSpace

ProgressCallback = Callable[[float, str], None]

# Rank correlation of a scan with the T1 template inside the brain's core after alignment (median over
# slices). Measured: real T1 heads (IXI) 0.41-0.46, one with a 170 ml painted infarct 0.25, post-contrast
# T1 with a glioma 0.27-0.39, MS T1 0.51; FLAIR -0.12 to 0.17, T2 -0.40 (BraTS and MS patients). A
# T1-only model warns below the limit.
T1_LIKENESS_MIN = 0.21


@dataclass(frozen=True)
class SliceScore:
    index: int  # axial slice of the reference grid
    score: float  # negative log-likelihood under the normal model
    z: float  # standardised against normal scans at the same slice position
    centre_ras: tuple[float, float, float]  # centre of the slice's brain, in the scan's RAS mm

    def to_json(self) -> dict:
        return {"index": self.index, "score": round(self.score, 4), "z": round(self.z, 4),
                "centre_ras": [round(v, 2) for v in self.centre_ras]}


@dataclass
class DetectionResult:
    volume_score: float
    volume_percentile: float
    slice_scores: list[SliceScore]
    regions: list[Region]
    threshold: float
    min_region_mm3: float
    model: dict
    heatmap: sitk.Image | None = None  # float32 on the input's grid; None when only scores were asked for
    region_labels: sitk.Image | None = None  # uint16, 0 = none, k = region of rank k
    timings: dict = field(default_factory=dict)
    source: str | None = None
    brain_extraction: str = "given"  # 'network', 'already stripped' or 'given' (a mask was passed)
    typicality: dict | None = None  # typical slice z, its normal limit, out_of_distribution
    contrast_mismatch: bool = False  # the scan's contrast is not one the model was trained on
    warnings: list[str] = field(default_factory=list)  # what makes the scores less trustworthy, in words

    @property
    def out_of_distribution(self) -> bool:
        """The scan is unlike the model's normal scans (all its slices, not a few) or of another contrast."""
        return self.contrast_mismatch or bool(self.typicality and self.typicality["out_of_distribution"])

    @property
    def interpretation(self) -> str:
        if self.out_of_distribution:
            return ("not comparable: the scan is unlike every normal scan the model knows (another contrast, "
                    "age group, artefacts, or an abnormality spanning most slices?), so its score is not a finding")
        return describe_percentile(self.volume_percentile)

    def to_report(self) -> dict:
        return {
            "source": self.source,
            "volume_score": round(self.volume_score, 4),
            "volume_percentile": round(self.volume_percentile, 2),
            "interpretation": self.interpretation,
            "out_of_distribution": self.out_of_distribution,
            "typicality": self.typicality,
            "warnings": list(self.warnings),
            "brain_extraction": self.brain_extraction,
            "threshold": round(self.threshold, 4),
            "min_region_mm3": self.min_region_mm3,
            "slice_scores": [s.to_json() for s in self.slice_scores],
            "regions": [r.to_json() for r in self.regions],
            "model": self.model,
            "cradl_version": __version__,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise InputError(f"unknown device {device!r}; use cpu, cuda or auto")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(device)


class AnomalyDetector:
    """Detects anomalies with a CRADL model bundle.

    >>> detector = AnomalyDetector.load()            # bundled default model
    >>> result = detector.detect("scan.nii.gz")
    >>> result.volume_percentile, result.regions[:3]
    """

    # Small batches with channels-last weights are the fastest layout on CPU (README, "Speed and memory").
    # bfloat16 is not used: faster still, but it moves heatmaps and scores by more than noise.
    # On a GPU the layout is left as it is.
    DEFAULT_BATCH_SIZE = 8

    def __init__(self, bundle: ModelBundle, device: str | torch.device = "auto",
                 batch_size: int = DEFAULT_BATCH_SIZE):
        self.bundle = bundle
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.encoder = bundle.encoder.to(self.device).eval()
        if self.device.type == "cpu":
            self.encoder = self.encoder.to(memory_format=torch.channels_last)
        self.gmm = bundle.gmm.to(self.device).eval()
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(False)
        self.space = ReferenceSpace(bundle.grid, bundle.template, bundle.template_mask)
        manifest = bundle.manifest
        self.normalisation = manifest.normalisation
        self.localization = manifest.localization
        self.calibration = manifest.calibration
        self.min_brain_fraction = manifest.reference.min_brain_fraction

    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "auto",
             batch_size: int = DEFAULT_BATCH_SIZE) -> "AnomalyDetector":
        return cls(load_bundle(path), device=device, batch_size=batch_size)

    @property
    def info(self) -> dict:
        m = self.bundle.manifest
        return {"name": m.name, "version": m.version, "description": m.description,
                "training": m.training, "slice_size": self.bundle.grid.size[0],
                "spacing_mm": self.bundle.grid.spacing, "gmm_components": self.gmm.n_components,
                "path": str(self.bundle.path) if self.bundle.path else None}

    # ------------------------------------------------------------------ detection
    def prepare(self, image: sitk.Image, mask: sitk.Image | None = None) -> PreparedScan:
        return prepare_scan(image, self.space, self.normalisation, self.min_brain_fraction, mask=mask)

    def reference_heatmap(self, prepared: PreparedScan, progress: Callable[[float], None] | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
        """Slice NLLs and the calibrated heatmap on the reference grid ([z, y, x], 1.0 = normal's high end)."""
        idx = prepared.slice_indices
        nll, heat_idx = scan_heatmap(prepared.volume, prepared.mask, idx, self.encoder, self.gmm, self.localization,
                                     self.device, self.calibration, self.batch_size, progress, self.bundle.normal_mean)
        heat = np.zeros(prepared.volume.shape, dtype=np.float32)
        heat[idx] = heat_idx
        return nll, heat / float(self.calibration["heatmap_scale"])

    def detect(self, image: sitk.Image | str | Path, mask: sitk.Image | str | Path | None = None,
               heatmap: bool = True, progress: ProgressCallback | None = None,
               cancel: Callable[[], bool] | None = None) -> DetectionResult:
        """Score a scan and, unless heatmap=False, localize its anomalies on the scan's own grid."""
        report = _Progress(progress, cancel)
        timings = {}
        started = time.perf_counter()
        source = str(image) if isinstance(image, (str, Path)) else None
        image = read_image(image) if isinstance(image, (str, Path)) else validate_image(image)
        if isinstance(mask, (str, Path)):
            mask = read_image(mask, what="brain mask")
        elif mask is not None:
            mask = validate_image(mask, "brain mask")
        timings["read"] = time.perf_counter() - started
        report(0.05, "Aligning to the reference template")

        t = time.perf_counter()
        prepared = self.prepare(image, mask)
        timings["align"] = time.perf_counter() - t
        report(0.35, "Scoring slices")

        t = time.perf_counter()
        idx = prepared.slice_indices
        if heatmap:
            nll, heat_ref = self.reference_heatmap(
                prepared, progress=lambda f: report(0.35 + 0.45 * f, "Computing the heatmap"))
        else:
            nll = score_slices(prepared.volume[idx], self.encoder, self.gmm, self.device, 4 * self.batch_size,
                               progress=lambda f: report(0.35 + 0.6 * f, "Scoring slices"))
        timings["network"] = time.perf_counter() - t

        volume_score = calibration.aggregate(nll, idx, self.calibration)
        z = calibration.slice_z_scores(nll, idx, self.calibration)
        centres = self._slice_centres_ras(prepared)
        slices = [SliceScore(int(i), float(s), float(zz), tuple(float(v) for v in c))
                  for i, s, zz, c in zip(idx, nll, z, centres)]
        result = DetectionResult(volume_score, calibration.percentile(volume_score, self.calibration), slices, [],
                                 float(self.calibration["voxel_threshold"]),
                                 float(self.calibration["min_region_mm3"]), self.model_summary(),
                                 timings=timings, source=source, brain_extraction=prepared.brain_extraction,
                                 typicality=typicality.assess(z, self.calibration))
        result.contrast_mismatch = self.bundle.manifest.t1_only and prepared.t1_likeness < T1_LIKENESS_MIN
        result.warnings = self._warnings(result)
        if heatmap:
            report(0.8, "Mapping the heatmap onto the scan")
            t = time.perf_counter()
            result.heatmap = self.space.to_input(heat_ref, prepared.transform, image)
            result.regions, result.region_labels = find_regions(result.heatmap, result.threshold,
                                                                result.min_region_mm3)
            timings["map_back"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - started
        report(1.0, "Done")
        return result

    @staticmethod
    def _warnings(result: DetectionResult) -> list[str]:
        warnings = []
        if result.contrast_mismatch:
            warnings.append("the scan does not look T1-weighted (its intensities do not follow the T1 template's "
                            "tissue order) and this model knows T1 only: train a model on normal scans of this "
                            "contrast (cradl train)")
        if result.typicality and result.typicality["out_of_distribution"]:
            t = result.typicality
            warnings.append(f"unlike the model's normal scans: its typical slice is {t['typical_z']:.1f} SD from "
                            f"normal (normal scans at most {t['limit']:.1f}); the percentile is not a finding")
        return warnings

    def model_summary(self) -> dict:
        return {"name": self.bundle.name, "version": self.bundle.version, "gmm_components": self.gmm.n_components}

    def _slice_centres_ras(self, prepared: PreparedScan) -> np.ndarray:
        """Centre of the brain in each scored reference slice, in the scan's RAS coordinates."""
        grid = self.bundle.grid
        points = []
        for i in prepared.slice_indices:
            rows, cols = np.nonzero(prepared.mask[i])
            index = (float(cols.mean()), float(rows.mean()), float(i))  # x, y, z
            points.append(np.array(grid.origin) + grid.spacing * np.array(index))
        return self.space.reference_to_input_ras(np.array(points), prepared.transform)


class _Progress:
    """One place for progress reporting and cancellation checks."""

    def __init__(self, callback: ProgressCallback | None, cancel: Callable[[], bool] | None):
        self.callback, self.cancel = callback, cancel

    def __call__(self, fraction: float, message: str) -> None:
        if self.cancel is not None and self.cancel():
            raise DetectionCancelled("detection cancelled")
        if self.callback is not None:
            self.callback(float(fraction), message)
