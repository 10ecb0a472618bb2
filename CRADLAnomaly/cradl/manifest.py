"""The typed view of a model bundle's manifest.

The manifest is stored as JSON (`bundle.py` validates every field before anything is built); this is the
one place that reads it into attributes, and the one place that fills in what bundles written before a
field existed lack, so that every reader sees the same defaults.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .space import ReferenceGrid

ATTRIBUTIONS = ("gradient", "gradient_x_deviation")  # `localize` says what each means
# Today's settings (model 2.4.0's, chosen on the validation subjects: README, "Detection quality"). The
# deviation from the normal mean does what slice weighting and wide smoothing did for the plain gradient
# (fade what every brain shows), and sharper than they could, so both are off or narrow.
DEFAULT_LOCALIZATION = {"smoothgrad_samples": 4, "noise_std": 0.05, "median_size": 5,
                        "gaussian_sigma_px": 1.0, "gaussian_sigma_z_px": 3.0, "slice_weight_z_scale": 0.0,
                        "seed": 0, "attribution": "gradient_x_deviation"}
# The plain gradient's own settings (model 2.3.0's), for normal scans that mix contrasts: their mean is no
# normal reference, so the deviation cannot be read.
PLAIN_GRADIENT_LOCALIZATION = {**DEFAULT_LOCALIZATION, "attribution": "gradient", "gaussian_sigma_px": 3.0,
                               "gaussian_sigma_z_px": 6.0, "slice_weight_z_scale": 2.0}
# What detection used before these settings were recorded: bundles that lack them keep that behaviour.
# (Recalibrating an older bundle upgrades it to today's defaults instead: `train.trainer.recalibrate_model`.)
LEGACY_LOCALIZATION = {"gaussian_sigma_z_px": 0.0, "slice_weight_z_scale": 0.0, "seed": 0, "attribution": "gradient"}


def uses_normal_mean(localization: dict) -> bool:
    """Whether these heatmap settings read each pixel against the normal mean image (bundle array)."""
    return localization.get("attribution", "gradient") == "gradient_x_deviation"


@dataclass(frozen=True)
class EncoderSpec:
    width: int
    feature_dim: int
    grid: int = 1  # bundles before the pooled grid of features had one cell


@dataclass(frozen=True)
class Reference:
    grid: ReferenceGrid
    min_brain_fraction: float
    template: str = ""
    brain_extraction: dict | None = None  # None: trained before brain extraction existed (template outline)


@dataclass(frozen=True)
class ModelManifest:
    """A bundle's recipe and statistics, by attribute. `stored` is the JSON mapping it was read from."""

    name: str
    version: str
    description: str
    created: str | None
    reference: Reference
    normalisation: dict  # preprocess's intensity normalisation settings
    localization: dict  # localize's heatmap settings, complete
    calibration: dict  # the normal statistics (calibration.validate_calibration checks them)
    encoder: EncoderSpec
    gmm: dict
    training: dict
    contrasts: tuple[str, ...] | None  # None: the bundle does not say (written before it was recorded)
    recalibrations: tuple[dict, ...]
    format_version: int
    stored: dict = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, m: dict) -> ModelManifest:
        """Read a validated manifest (see `bundle._validated`)."""
        reference = m["reference"]
        encoder = m["encoder"]
        contrasts = m.get("contrasts")
        return cls(
            name=m["name"], version=m["version"], description=m.get("description", ""), created=m.get("created"),
            reference=Reference(ReferenceGrid.from_json(reference["grid"]), float(reference["min_brain_fraction"]),
                                reference.get("template", ""), reference.get("brain_extraction")),
            normalisation=dict(m["normalisation"]),
            localization=complete_localization(m["localization"]),
            calibration=m["calibration"],
            encoder=EncoderSpec(int(encoder["width"]), int(encoder["feature_dim"]), int(encoder.get("grid", 1))),
            gmm=dict(m.get("gmm", {})), training=dict(m.get("training", {})),
            contrasts=tuple(contrasts) if contrasts is not None else None,
            recalibrations=tuple(m.get("recalibrations", ())), format_version=int(m.get("format_version", 1)),
            stored=m)

    def with_fields(self, **changes) -> ModelManifest:
        """This manifest with top-level fields changed (e.g. `calibration`, `name`), its stored mapping changed
        alike, so that a bundle saved from it holds what detection reads."""
        return ModelManifest.from_dict({**self.stored, **changes})

    @property
    def recipe(self) -> dict:
        """The training recipe as recorded (`TrainConfig` fields); empty for bundles that did not record it."""
        return dict(self.training.get("recipe", {}))

    @property
    def training_data(self) -> list[str]:
        return list(self.training.get("data", []))

    @property
    def t1_only(self) -> bool:
        return self.contrasts == ("t1",)


def complete_localization(stored: dict) -> dict:
    """The bundle's heatmap settings with what an older bundle lacks filled in as it was used then.
    An empty mapping means today's defaults."""
    if not stored:
        return dict(DEFAULT_LOCALIZATION)
    return {**DEFAULT_LOCALIZATION, **LEGACY_LOCALIZATION, **stored}
