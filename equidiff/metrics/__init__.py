"""Metrics as torchmetrics classes with sum-reduced (or gathered) states, plus functional twins."""

from equidiff.metrics import functional
from equidiff.metrics.sample_quality import ClassifierConfidence, PrecisionRecall

__all__ = ["ClassifierConfidence", "PrecisionRecall", "functional"]
