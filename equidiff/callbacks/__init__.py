"""Callbacks: per-seed sample writer, predict-time metrics, image grids, pretrained export, fit resume."""

from equidiff.callbacks.grid import ImageGrid, QueryGrid, save_grid
from equidiff.callbacks.metrics import MetricSpec, PredictMetrics
from equidiff.callbacks.pretrained import SavePretrained
from equidiff.callbacks.resume import FitResume
from equidiff.callbacks.writer import SampleWriter

__all__ = ["FitResume", "ImageGrid", "QueryGrid", "MetricSpec", "PredictMetrics", "SampleWriter", "SavePretrained",
           "save_grid"]
