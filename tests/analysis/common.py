"""Small pieces the analysis tests share: in-memory data, a classifier with known logits, a recording logger."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn

from equidiff.analysis.report import read_csv
from equidiff.data.base import EquidiffDataModule
from equidiff.data.embedded import TensorDictDataset


class ArrayDataModule(EquidiffDataModule):
    """The same given images/labels for every split (test and predict read them)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, **kwargs):
        super().__init__(**kwargs)
        self.images, self.labels = images, labels

    def make_dataset(self, split: str):
        return TensorDictDataset(image=self.images, label=self.labels)


class LinearProbe(nn.Module):
    """logits = W flatten(x) + b with seeded weights: logits we can recompute by hand."""

    def __init__(self, in_features: int, num_classes: int = 3, seed: int = 0, scale: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(num_classes, in_features, generator=g) * scale, requires_grad=False)
        self.bias = nn.Parameter(torch.randn(num_classes, generator=g), requires_grad=False)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T + self.bias


def toy_data(n: int = 9, shape=(1, 4, 4), num_classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g) * 2 - 1, torch.randint(0, num_classes, (n,), generator=g)


class RecordingLogger(Logger):
    """A logger that keeps what it is given, and takes images and tables like WandbLogger."""

    def __init__(self):
        super().__init__()
        self.metrics: list[tuple[dict, int | None]] = []
        self.images: dict[str, list] = {}
        self.tables: dict[str, tuple[list, list]] = {}

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append((dict(metrics), step))

    def log_image(self, key, images, step=None, **kwargs):
        self.images[key] = list(images)

    def log_table(self, key, columns=None, data=None, dataframe=None, step=None):
        self.tables[key] = (list(columns), [list(r) for r in data])


def trainer(logger=False) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=logger, enable_progress_bar=False,
                     enable_model_summary=False, inference_mode=False, enable_checkpointing=False)


EXACT = {"classifier", "t", "sqrt_alpha_bar", "n", "accuracy", "class", "class_name", "split", "num_classes"}


def assert_same_results(a: Path, b: Path) -> None:
    """Two CSV or JSON results agree: counts and accuracies exactly; energies to float32 rounding (a network's
    logits for one image change in the last bits with the batch it is in, and float64 sums with their order)."""
    if Path(a).suffix == ".json":
        ra, rb = [json.loads(Path(p).read_text()) for p in (a, b)]
        assert ra.keys() == rb.keys()
        for k in ra:
            if k in EXACT or k == "n":
                assert ra[k] == rb[k], k
            else:  # null (a class without samples) as NaN
                nan = [float("nan") if v is None else v for v in rb[k]]
                assert [float("nan") if v is None else v for v in ra[k]] == pytest.approx(
                    nan, rel=1e-6, abs=1e-7, nan_ok=True), k
        return
    ra, rb = read_csv(a), read_csv(b)
    assert len(ra) == len(rb) and ra and ra[0].keys() == rb[0].keys()
    for x, y in zip(ra, rb, strict=True):
        for k in x:
            if k in EXACT:
                assert x[k] == y[k], k
            else:
                assert float(x[k]) == pytest.approx(float(y[k]), rel=1e-6, abs=1e-7, nan_ok=True), k
