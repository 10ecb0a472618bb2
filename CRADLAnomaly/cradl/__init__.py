"""CRADL: contrastive representations for unsupervised anomaly detection and localization in brain MRI.

Lüth et al., "CRADL: Contrastive Representations for Unsupervised Anomaly Detection and Localization",
arXiv 2301.02126. The core package: no Slicer and no Qt imports.
"""
__version__ = "0.1.0"

from .errors import CradlError, DetectionCancelled, InputError, ModelError  # noqa: E402


def __getattr__(name):
    # The detector needs torch; importing it lazily lets torch-free parts (errors, calibration words, the
    # Slicer bridge before dependencies are installed) import cradl.
    if name in ("AnomalyDetector", "DetectionResult"):
        from . import detector
        return getattr(detector, name)
    raise AttributeError(f"module 'cradl' has no attribute {name!r}")


__all__ = ["AnomalyDetector", "DetectionResult", "CradlError", "InputError", "ModelError",
           "DetectionCancelled", "__version__"]
