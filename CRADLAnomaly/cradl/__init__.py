"""CRADL: contrastive representations for unsupervised anomaly detection and localization in brain MRI.

Lüth et al., "CRADL: Contrastive Representations for Unsupervised Anomaly Detection and Localization",
arXiv 2301.02126. The core package: no Slicer and no Qt imports.
"""
__version__ = "0.1.0"

from .errors import CradlError, DetectionCancelled, InputError, ModelError  # noqa: E402
from .detector import AnomalyDetector, DetectionResult  # noqa: E402

__all__ = ["AnomalyDetector", "DetectionResult", "CradlError", "InputError", "ModelError",
           "DetectionCancelled", "__version__"]
