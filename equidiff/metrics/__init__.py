"""Metrics as torchmetrics classes with sum-reduced (or gathered) states, plus functional twins."""

from equidiff.metrics import functional
from equidiff.metrics.fidelity import FID, InceptionScore, PrecisionRecallVGG
from equidiff.metrics.reference import (
    FeatureStatistics,
    GatheredFeatures,
    Reference,
    ReferenceStatistics,
    load_reference,
    save_reference,
)
from equidiff.metrics.sample_quality import ClassifierConfidence, PrecisionRecall

__all__ = [
    "FID",
    "ClassifierConfidence",
    "FeatureStatistics",
    "GatheredFeatures",
    "InceptionScore",
    "PrecisionRecall",
    "PrecisionRecallVGG",
    "Reference",
    "ReferenceStatistics",
    "functional",
    "load_reference",
    "save_reference",
]
