"""Tabular DataModules (scikit-learn wine and digits as flat features in a box)."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits, load_wine

from equidiff.data.tabular import TabularDataModule, split_arrays, tabular_arrays
from equidiff.errors import ConfigError


def test_wine_items_splits_and_box():
    dm = TabularDataModule(dataset="wine", seed=10)
    item = dm.dataset("test")[3]
    assert set(item) == {"x", "label", "index", "seed"} and item["x"].shape == (13,) and item["seed"] == 13
    sizes = {s: len(dm.dataset(s)) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 178 and sizes["test"] == 36
    lo, hi = dm.box
    x = torch.cat([split_arrays(dm, s)[0] for s in ("train", "val", "test")])
    assert torch.equal(lo, torch.zeros(13)) and torch.equal(hi, torch.ones(13))
    assert x.min() == 0 and x.max() == 1 and dm.num_classes == 3 and dm.num_features == 13
    # min-max scaling of the raw features, over all rows
    raw = load_wine().data
    assert np.allclose(np.sort(x[:, 0].numpy()), np.sort((raw[:, 0] - raw[:, 0].min()) / np.ptp(raw[:, 0])), atol=1e-6)


def test_digits_global_minmax_is_pixels_over_16():
    x, y = tabular_arrays("digits", "train", scaling="global_minmax")
    assert x.shape[1] == 64 and x.min() == 0 and x.max() == 1
    d = load_digits()
    assert np.isin(np.round(x.numpy() * 16, 5), np.arange(17)).all() and set(y.tolist()) == set(d.target.tolist())


def test_standard_scaling_box_holds_every_row():
    dm = TabularDataModule(dataset="wine", scaling="standard")
    lo, hi = dm.box
    x_train = split_arrays(dm, "train")[0]
    assert x_train.mean(0).abs().max() < 1e-5
    for split in ("train", "val", "test"):
        x = split_arrays(dm, split)[0]
        assert ((x >= lo) & (x <= hi)).all()


def test_bad_names_are_config_errors():
    with pytest.raises(ConfigError, match="unknown tabular dataset"):
        TabularDataModule(dataset="iris")
    with pytest.raises(ConfigError, match="unknown scaling"):
        TabularDataModule(dataset="wine", scaling="log")
    with pytest.raises(ConfigError, match="no 'image' entry"):
        split_arrays(TabularDataModule(dataset="wine"), "train", key="image")
