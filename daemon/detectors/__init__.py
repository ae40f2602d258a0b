"""Anomaly detectors sharing one interface (``base.Detector``); higher score = more anomalous."""

from daemon.detectors.autoencoder import AutoencoderDetector
from daemon.detectors.base import Detector
from daemon.detectors.ensemble import Ensemble
from daemon.detectors.isolation_forest import IsolationForestDetector
from daemon.detectors.lof import LofDetector

#: The member detectors, in the order they are trained and reported.
MEMBER_TYPES: tuple[type[Detector], ...] = (
    IsolationForestDetector,
    LofDetector,
    AutoencoderDetector,
)

__all__ = [
    "MEMBER_TYPES",
    "AutoencoderDetector",
    "Detector",
    "Ensemble",
    "IsolationForestDetector",
    "LofDetector",
]
