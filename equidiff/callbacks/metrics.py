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


class SeedCoverage(Metric):
    """How many samples were fed, and their first and last seed (sum / min / max-reduced: exact under DDP)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("n", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("first", default=torch.tensor(torch.iinfo(torch.int64).max), dist_reduce_fx="min")
        self.add_state("last", default=torch.tensor(-1, dtype=torch.int64), dist_reduce_fx="max")

    def update(self, seeds: torch.Tensor) -> None:
        seeds = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1).to(self.n.device)
        if seeds.numel():
            self.n += seeds.numel()
            self.first = torch.minimum(self.first, seeds.min())
            self.last = torch.maximum(self.last, seeds.max())

    def compute(self) -> dict[str, torch.Tensor]:
        if self.n == 0:
            return {"num_samples": self.n}
        return {"num_samples": self.n, "first_seed": self.first, "last_seed": self.last}


class PredictMetrics(Callback):
    """Feed each predict batch's (quantised) record to a set of metrics; write ``metrics.json``.

    Metrics see the images exactly as the writer stores them (rounded to uint8 and mapped back),
    so recomputing a metric from the PNG files gives the same value. On a resumed run, samples
    written by an earlier run are read back from disk and fed on rank 0, so the metrics always
    cover the whole set. ``compute()`` syncs the sum-reduced states across processes.

    ``metrics.json`` also says what the metrics cover: ``_coverage/num_samples`` and the first and last seed
    (``_coverage/first_seed``, ``_coverage/last_seed``; flat keys beside the metrics', which keep their names).
    At ``setup`` every metric with a ``check_num_samples(n)`` method is asked whether it can be computed from the
    run's number of samples, so that a run too small for a metric fails before sampling.
    """

    def __init__(self, metrics: Mapping[str, MetricSpec], output_dir: str, *, filename: str = "metrics.json",
                 samples_subdir: str = "samples", log_to_loggers: bool = True):
        super().__init__()
        self.specs = {name: spec for name, spec in (metrics or {}).items() if spec is not None}  # null: removed
        self.output_dir, self.filename = Path(output_dir), filename
        self.path = self.output_dir / filename
        self.samples_dir = self.output_dir / samples_subdir
        self.log_to_loggers = log_to_loggers
        self.skipped: set[int] = set()
        self.results: dict = {}
        self.coverage = SeedCoverage()

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        seeds = getattr(trainer.datamodule, "predict_seeds", None)
        if seeds is None:
            return
        n = len(seeds())
        for name, spec in self.specs.items():
            check = getattr(spec.metric, "check_num_samples", None)
            if check is not None:
                try:
                    check(n)
                except ConfigError as e:
                    raise ConfigError(f"metric {name!r}: {e}. Leave it out with metrics.{name}=null") from None

    def _update(self, record: dict, source: str) -> None:
        for name, spec in self.specs.items():
            missing = [k for k in spec.inputs if k not in record]
            if missing:
                raise ConfigError(f"metric {name!r} needs record entries {missing}; {source} {sorted(record)}")
            spec.metric.update(*[record[k] for k in spec.inputs])
        self.coverage.update(record["seed"])

    def on_predict_start(self, trainer, pl_module) -> None:
        for metric in [*(spec.metric for spec in self.specs.values()), self.coverage]:
            metric.reset()
            metric.to(pl_module.device)
        dm = trainer.datamodule
        self.skipped = set(getattr(dm, "skip_seeds", set()) or set())
        if self.skipped and trainer.is_global_zero:
            log.info("feeding %d previously written samples to the metrics", len(self.skipped))
            source = f"the samples an earlier run wrote in {self.samples_dir} hold"
            for rec in read_records(self.samples_dir, sorted(self.skipped)):
                self._update({k: v.to(pl_module.device) for k, v in rec.items()}, source)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if outputs is None or getattr(trainer.datamodule, "predict_padding", False):
            return
        keep = torch.tensor([int(s) not in self.skipped for s in outputs["seed"]])
        if not keep.any():
            return
        if not keep.all():
            outputs = {k: (v[keep.to(v.device)] if isinstance(v, torch.Tensor) else [x for x, m in
                       zip(v, keep.tolist(), strict=True) if m]) for k, v in outputs.items()}
        self._update(quantize(outputs), "the method's predict_step returns")

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        results = {}
        for name, spec in self.specs.items():
            results.update(_flatten(name, spec.metric.compute()))  # collective: every rank calls it
        coverage = _flatten("_coverage", self.coverage.compute())
        self.results = results
        if not trainer.is_global_zero:
            return
        text = json.dumps({**results, **coverage}, indent=2, sort_keys=True) + "\n"
        atomic_write_bytes(self.path, text.encode())
        log.info("metrics over %d samples: %s", coverage["_coverage/num_samples"],
                 json.dumps(results, sort_keys=True))
        if self.log_to_loggers:
            scalars = {f"predict/{k}": v for k, v in results.items() if isinstance(v, int | float)}
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=trainer.global_step)
                logger.save()
