"""Tabular data for counterfactual explanations (seed 001, S-CFE): scikit-learn's wine, digits and breast cancer
(the S-CFE paper's "Wisconsin": labels as the reference's wdbc.csv, malignant = 1) as flat features.

Items are ``{"x": float[F], "label": int}`` (plus ``index`` and ``seed`` from the base). Features are scaled
into a box, the actionable set A of S-CFE:

* ``minmax``: each feature to [0, 1] by its minimum and maximum over all rows (the reference scales its
  data to [0, 1] the same way, over train and test rows, so that every row lies inside the box);
* ``global_minmax``: one minimum and maximum for all features (digits pixels 0..16 -> [0, 1]);
* ``standard``: zero mean, unit variance on the training split; the box is then each feature's range
  over all rows;
* ``zscore``: the S-CFE reference's tabular preprocessing: zero mean and unit sample standard deviation
  (ddof 1, pandas' ``std``) over all rows, before the split; the box is each feature's range over all rows
  (the reference's ``mins`` / ``maxs`` over train and test);
* ``global_pm1``: one minimum and maximum for all features onto [-1, 1] (digits pixels 0..16 as the
  reference's MNIST, ``Normalize(0.5, 0.5)`` of [0, 1] pixels).

Splits: ``stratified`` (train/val/test fractions, stratified by class, fixed by ``split_seed``) or
``shuffle``, the reference's: the rows in the order of ``numpy.random.RandomState(split_seed).permutation``
(pandas' ``df.sample(frac=1, random_state=split_seed)``), the last ``test_size`` rows for test, the rest for
training, no validation rows.

``box`` gives the (low, high) feature tensors of the DataModule, read by the ``Counterfactual`` method.
``split_arrays`` stacks any equidiff DataModule split into (inputs, labels) tensors, for fitting densities,
LOF models and scikit-learn classifiers on the training split.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from torch.utils.data import Dataset

from equidiff.data.base import EquidiffDataModule
from equidiff.data.embedded import TensorDictDataset, _split_indices
from equidiff.errors import ConfigError


def _breast_cancer():
    """scikit-learn's Wisconsin diagnostic breast cancer, labelled as the reference (malignant 1, benign 0)."""
    d = load_breast_cancer()
    d.target = 1 - d.target  # scikit-learn: 0 malignant, 1 benign; the reference replaces M -> 1, B -> 0
    return d


DATASETS = {"wine": load_wine, "digits": load_digits, "breast_cancer": _breast_cancer}
SCALINGS = ("minmax", "global_minmax", "standard", "zscore", "global_pm1")
SPLITS = ("stratified", "shuffle")


def tabular_arrays(dataset: str = "wine", split: str = "train", *, scaling: str = "minmax", val_fraction: float = 0.1,
                   test_fraction: float = 0.2, split_seed: int = 0, split_rule: str = "stratified",
                   test_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features N x F float32, labels N int64) of a split, scaled as in the module docstring."""
    x, y, _ = _scaled(dataset, scaling, val_fraction, test_fraction, split_seed, split_rule, test_size)
    idx = split_indices(y, val_fraction, test_fraction, split_seed, split_rule, test_size)[split]
    return torch.from_numpy(x[idx]), torch.from_numpy(y[idx])


def tabular_box(dataset: str = "wine", *, scaling: str = "minmax", val_fraction: float = 0.1,
                test_fraction: float = 0.2, split_seed: int = 0, split_rule: str = "stratified",
                test_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) per feature: the box every row of the dataset lies in."""
    return _scaled(dataset, scaling, val_fraction, test_fraction, split_seed, split_rule, test_size)[2]


def split_indices(y: np.ndarray, val_fraction: float, test_fraction: float, split_seed: int,
                  split_rule: str = "stratified", test_size: int | None = None) -> dict[str, np.ndarray]:
    """Row indices of train / val / test (``split_rule``: see the module docstring)."""
    if split_rule == "stratified":
        return _split_indices(y, val_fraction, test_fraction, split_seed)
    if split_rule != "shuffle":
        raise ConfigError(f"unknown split rule {split_rule!r}; choose one of {list(SPLITS)}")
    if test_size is None or not 0 < int(test_size) < len(y):
        raise ConfigError(f"split_rule=shuffle needs 0 < test_size < {len(y)} rows, got {test_size}")
    order = np.random.RandomState(split_seed).permutation(len(y))  # pandas' df.sample(frac=1, random_state=seed)
    n_train = len(y) - int(test_size)
    return {"train": order[:n_train], "val": order[:0], "test": order[n_train:]}


def _scaled(dataset: str, scaling: str, val_fraction: float, test_fraction: float, split_seed: int,
            split_rule: str = "stratified", test_size: int | None = None):
    if dataset not in DATASETS:
        raise ConfigError(f"unknown tabular dataset {dataset!r}; choose one of {list(DATASETS)}")
    if scaling not in SCALINGS:
        raise ConfigError(f"unknown scaling {scaling!r}; choose one of {list(SCALINGS)}")
    d = DATASETS[dataset]()
    x, y = d.data.astype(np.float64), d.target.astype(np.int64)
    if scaling == "standard":
        train = split_indices(y, val_fraction, test_fraction, split_seed, split_rule, test_size)["train"]
        mean, std = x[train].mean(0), x[train].std(0)
        x = (x - mean) / np.where(std > 0, std, 1.0)
        lo, hi = x.min(0), x.max(0)
    elif scaling == "zscore":
        mean, std = x.mean(0), x.std(0, ddof=1)
        x = (x - mean) / np.where(std > 0, std, 1.0)
        lo, hi = x.min(0), x.max(0)
    elif scaling == "global_pm1":
        lo, hi = x.min(), x.max()
        x = (x - lo) / (hi - lo if hi > lo else 1.0) * 2 - 1
        lo, hi = -np.ones(x.shape[1]), np.ones(x.shape[1])
    else:
        lo, hi = (x.min(0), x.max(0)) if scaling == "minmax" else (x.min(), x.max())
        x = (x - lo) / np.where(hi - lo > 0, hi - lo, 1.0)
        lo, hi = np.zeros(x.shape[1]), np.ones(x.shape[1])
    x = x.astype(np.float32)
    box = (torch.from_numpy(np.minimum(lo, x.min(0)).astype(np.float32)),
           torch.from_numpy(np.maximum(hi, x.max(0)).astype(np.float32)))
    return x, y, box


class TabularDataModule(EquidiffDataModule):
    """scikit-learn ``wine`` (178 rows, 13 features, 3 classes), ``digits`` (1,797 rows, 64 pixels, 10 classes) or
    ``breast_cancer`` (569 rows, 30 features, 2 classes)
    as flat feature vectors in a box; a stratified 70/10/20 split fixed by ``split_seed`` (``split_rule=
    "shuffle"``: the reference's, the last ``test_size`` rows of a shuffle)."""

    def __init__(self, *, dataset: str = "wine", scaling: str = "minmax", val_fraction: float = 0.1,
                 test_fraction: float = 0.2, split_seed: int = 0, split_rule: str = "stratified",
                 test_size: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.kw = dict(dataset=dataset, scaling=scaling, val_fraction=val_fraction, test_fraction=test_fraction,
                       split_seed=split_seed, split_rule=split_rule, test_size=test_size)
        _, y, self._box = _scaled(**self.kw)  # fails early on bad names
        split_indices(y, val_fraction, test_fraction, split_seed, split_rule, test_size)
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
