"""Callbacks: per-seed sample writer, predict-time metrics, image grids, pretrained export."""

from equidiff.callbacks.grid import ImageGrid, QueryGrid, save_grid
from equidiff.callbacks.metrics import MetricSpec, PredictMetrics
from equidiff.callbacks.pretrained import SavePretrained
from equidiff.callbacks.writer import SampleWriter

__all__ = ["ImageGrid", "QueryGrid", "MetricSpec", "PredictMetrics", "SampleWriter", "SavePretrained", "save_grid"]
