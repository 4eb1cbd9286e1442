"""Update torchmetrics metrics during predict; write ``metrics.json`` and send them to the loggers."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torchmetrics import Metric

from equidiff.callbacks.records import quantize, read_records
from equidiff.errors import ConfigError
from equidiff.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)


class MetricSpec:
    """A metric and the record entries its ``update`` takes, in order (e.g. ``["image", "label"]``)."""

    def __init__(self, metric: Metric, inputs: Sequence[str] = ("image",)):
        if not isinstance(metric, Metric):
            raise ConfigError(f"expected a torchmetrics Metric, got {type(metric).__name__}")
        self.metric, self.inputs = metric, list(inputs)


def _flatten(name: str, value) -> dict[str, float | list]:
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            out.update(_flatten(f"{name}/{k}", v))
        return out
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        value = str(value)  # JSON has no NaN/inf
    return {name: value}


class PredictMetrics(Callback):
    """Feed each predict batch's (quantised) record to a set of metrics; write ``metrics.json``.

    Metrics see the images exactly as the writer stores them (rounded to uint8 and mapped back),
    so recomputing a metric from the PNG files gives the same value. On a resumed run, samples
    written by an earlier run are read back from disk and fed on rank 0, so the metrics always
    cover the whole set. ``compute()`` syncs the sum-reduced states across processes.
    """

    def __init__(self, metrics: Mapping[str, MetricSpec], output_dir: str, *, filename: str = "metrics.json",
                 samples_subdir: str = "samples", log_to_loggers: bool = True):
        super().__init__()
        self.specs = {name: spec for name, spec in (metrics or {}).items() if spec is not None}  # null: removed
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / filename
        self.samples_dir = self.output_dir / samples_subdir
        self.log_to_loggers = log_to_loggers
        self.skipped: set[int] = set()
        self.results: dict = {}

    def _update(self, record: dict) -> None:
        for name, spec in self.specs.items():
            missing = [k for k in spec.inputs if k not in record]
            if missing:
                raise ConfigError(f"metric {name!r} needs record entries {missing}; the method's predict_step "
                                  f"returns {sorted(record)}")
            spec.metric.update(*[record[k] for k in spec.inputs])

    def on_predict_start(self, trainer, pl_module) -> None:
        for spec in self.specs.values():
            spec.metric.reset()
            spec.metric.to(pl_module.device)
        dm = trainer.datamodule
        self.skipped = set(getattr(dm, "skip_seeds", set()) or set())
        if self.skipped and trainer.is_global_zero:
            log.info("feeding %d previously written samples to the metrics", len(self.skipped))
            for rec in read_records(self.samples_dir, sorted(self.skipped)):
                self._update({k: v.to(pl_module.device) for k, v in rec.items()})

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if outputs is None:
            return
        keep = torch.tensor([int(s) not in self.skipped for s in outputs["seed"]])
        if not keep.any():
            return
        if not keep.all():
            outputs = {k: (v[keep.to(v.device)] if isinstance(v, torch.Tensor) else [x for x, m in
                       zip(v, keep.tolist(), strict=True) if m]) for k, v in outputs.items()}
        self._update(quantize(outputs))

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        results = {}
        for name, spec in self.specs.items():
            results.update(_flatten(name, spec.metric.compute()))  # collective: every rank calls it
        self.results = results
        if not trainer.is_global_zero:
            return
        atomic_write_bytes(self.path, (json.dumps(results, indent=2, sort_keys=True) + "\n").encode())
        log.info("metrics: %s", json.dumps(results, sort_keys=True))
        if self.log_to_loggers:
            scalars = {f"predict/{k}": v for k, v in results.items() if isinstance(v, int | float)}
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=trainer.global_step)
                logger.save()
