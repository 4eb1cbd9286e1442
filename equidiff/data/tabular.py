"""Tabular data for counterfactual explanations (seed 001, S-CFE): scikit-learn's wine and digits as flat features.

Items are ``{"x": float[F], "label": int}`` (plus ``index`` and ``seed`` from the base). Features are scaled
into a box, the actionable set A of S-CFE:

* ``minmax``: each feature to [0, 1] by its minimum and maximum over all rows (the reference scales its
  data to [0, 1] the same way, over train and test rows, so that every row lies inside the box);
* ``global_minmax``: one minimum and maximum for all features (digits pixels 0..16 -> [0, 1]);
* ``standard``: zero mean, unit variance on the training split; the box is then each feature's range
  over all rows.

``box`` gives the (low, high) feature tensors of the DataModule, read by the ``Counterfactual`` method.
``split_arrays`` stacks any equidiff DataModule split into (inputs, labels) tensors, for fitting densities,
LOF models and scikit-learn classifiers on the training split.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits, load_wine
from torch.utils.data import Dataset

from equidiff.data.base import EquidiffDataModule
from equidiff.data.embedded import TensorDictDataset, _split_indices
from equidiff.errors import ConfigError

DATASETS = {"wine": load_wine, "digits": load_digits}
SCALINGS = ("minmax", "global_minmax", "standard")


def tabular_arrays(dataset: str = "wine", split: str = "train", *, scaling: str = "minmax", val_fraction: float = 0.1,
                   test_fraction: float = 0.2, split_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(features N x F float32, labels N int64) of a stratified split, scaled as in the module docstring."""
    x, y, _ = _scaled(dataset, scaling, val_fraction, test_fraction, split_seed)
    idx = _split_indices(y, val_fraction, test_fraction, split_seed)[split]
    return torch.from_numpy(x[idx]), torch.from_numpy(y[idx])


def tabular_box(dataset: str = "wine", *, scaling: str = "minmax", val_fraction: float = 0.1,
                test_fraction: float = 0.2, split_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) per feature: the box every row of the dataset lies in."""
    return _scaled(dataset, scaling, val_fraction, test_fraction, split_seed)[2]


def _scaled(dataset: str, scaling: str, val_fraction: float, test_fraction: float, split_seed: int):
    if dataset not in DATASETS:
        raise ConfigError(f"unknown tabular dataset {dataset!r}; choose one of {list(DATASETS)}")
    if scaling not in SCALINGS:
        raise ConfigError(f"unknown scaling {scaling!r}; choose one of {list(SCALINGS)}")
    d = DATASETS[dataset]()
    x, y = d.data.astype(np.float64), d.target.astype(np.int64)
    if scaling == "standard":
        train = _split_indices(y, val_fraction, test_fraction, split_seed)["train"]
        mean, std = x[train].mean(0), x[train].std(0)
        x = (x - mean) / np.where(std > 0, std, 1.0)
        lo, hi = x.min(0), x.max(0)
    else:
        lo, hi = (x.min(0), x.max(0)) if scaling == "minmax" else (x.min(), x.max())
        x = (x - lo) / np.where(hi - lo > 0, hi - lo, 1.0)
        lo, hi = np.zeros(x.shape[1]), np.ones(x.shape[1])
    x = x.astype(np.float32)
    box = (torch.from_numpy(np.minimum(lo, x.min(0)).astype(np.float32)),
           torch.from_numpy(np.maximum(hi, x.max(0)).astype(np.float32)))
    return x, y, box


class TabularDataModule(EquidiffDataModule):
    """scikit-learn ``wine`` (178 rows, 13 features, 3 classes) or ``digits`` (1,797 rows, 64 pixels, 10 classes)
    as flat feature vectors in a box; stratified 70/10/20 split fixed by ``split_seed``."""

    def __init__(self, *, dataset: str = "wine", scaling: str = "minmax", val_fraction: float = 0.1,
                 test_fraction: float = 0.2, split_seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.kw = dict(dataset=dataset, scaling=scaling, val_fraction=val_fraction, test_fraction=test_fraction,
                       split_seed=split_seed)
        _, y, self._box = _scaled(dataset, scaling, val_fraction, test_fraction, split_seed)  # fails early on bad names
        self.num_classes = int(y.max()) + 1

    @property
    def box(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._box

    @property
    def num_features(self) -> int:
        return int(self.box[0].numel())

    def make_dataset(self, split: str) -> Dataset:
        x, y = tabular_arrays(split=split, **self.kw)
        return TensorDictDataset(x=x, label=y)


def split_arrays(datamodule: EquidiffDataModule, split: str = "train", key: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a DataModule split into (inputs, labels); ``key`` defaults to "x" if items have it, else "image"."""
    ds = datamodule.dataset(split)
    if len(ds) == 0:
        raise ConfigError(f"the {split} split is empty")
    first = ds[0]
    key = key or ("x" if "x" in first else "image")
    if key not in first:
        raise ConfigError(f"items of the {split} split have no {key!r} entry (they have {sorted(first)})")
    items = [ds[i] for i in range(len(ds))]
    return (torch.stack([torch.as_tensor(it[key]) for it in items]),
            torch.as_tensor([int(it["label"]) for it in items]))
