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
    with pytest.raises(ConfigError, match="unknown split rule"):
        TabularDataModule(dataset="wine", split_rule="kfold")
    with pytest.raises(ConfigError, match="unknown scaling"):
        TabularDataModule(dataset="wine", scaling="log")
    with pytest.raises(ConfigError, match="no 'image' entry"):
        split_arrays(TabularDataModule(dataset="wine"), "train", key="image")


def test_zscore_is_the_reference_standardisation_over_all_rows():
    """main.py: (x - mean) / std with pandas' std (ddof 1) over all rows, before the split; the box is each
    feature's range over all rows (its mins / maxs over train and test)."""
    dm = TabularDataModule(dataset="wine", scaling="zscore")
    raw = load_wine().data
    want = (raw - raw.mean(0)) / raw.std(0, ddof=1)
    x = torch.cat([split_arrays(dm, s)[0] for s in ("train", "val", "test")]).double().numpy()
    np.testing.assert_allclose(np.sort(x, 0), np.sort(want, 0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dm.box[0].numpy(), want.min(0), atol=1e-6)
    np.testing.assert_allclose(dm.box[1].numpy(), want.max(0), atol=1e-6)


def test_shuffle_split_is_pandas_sample_then_the_last_rows_for_test():
    pd = pytest.importorskip("pandas")
    dm = TabularDataModule(dataset="wine", scaling="zscore", split_rule="shuffle", split_seed=1, test_size=100)
    order = pd.DataFrame({"row": np.arange(178)}).sample(frac=1, random_state=1)["row"].to_numpy()
    y = load_wine().target
    assert split_arrays(dm, "test")[1].tolist() == y[order[78:]].tolist()
    assert split_arrays(dm, "train")[1].tolist() == y[order[:78]].tolist()
    assert len(dm.dataset("val")) == 0
    with pytest.raises(ConfigError, match="test_size"):
        TabularDataModule(dataset="wine", split_rule="shuffle")


def test_digits_global_pm1_is_the_reference_mnist_range():
    x, _ = tabular_arrays("digits", "train", scaling="global_pm1")
    assert x.min() == -1 and x.max() == 1
    assert np.isin(np.round((x.numpy() + 1) * 8, 5), np.arange(17)).all()  # pixels / 8 - 1


def test_rescaling_a_raw_feature_changes_no_plausibility_term_or_lof(monkeypatch):
    """Densities and LOF work on the z-scored features: multiplying a raw feature by 1000 (and shifting it)
    changes neither the KDE / GMM / kNN terms nor the LOF of any point."""
    from equidiff.attacks.density import fitted
    from equidiff.data import tabular
    from equidiff.metrics.counterfactual import fit_lof, lof_scores

    def rescaled():
        d = load_wine()
        d.data = d.data.copy()
        d.data[:, 4] = d.data[:, 4] * 1000.0 + 7.0
        return d

    kw = dict(dataset="wine", scaling="zscore", split_rule="shuffle", split_seed=1, test_size=100)
    dm = TabularDataModule(**kw)
    monkeypatch.setitem(tabular.DATASETS, "wine", rescaled)
    dm_big = TabularDataModule(**kw)
    (x, y), (xb, _) = split_arrays(dm, "test"), split_arrays(dm_big, "test")
    torch.testing.assert_close(xb, x, rtol=0, atol=1e-5)
    probe, target = x[:20] + 0.05, (y[:20] + 1) % 3
    for kind, kwargs in (("kde", {}), ("gmm", {"n_components": 2}), ("knn", {"space": "unit"})):
        ours = fitted(kind, dm, **kwargs).bind(x[:20], target)(probe)
        big = fitted(kind, dm_big, **kwargs).bind(xb[:20], target)(probe)
        torch.testing.assert_close(big, ours, rtol=1e-4, atol=1e-4)
    lof, lof_big = (fit_lof(*split_arrays(m, "train")) for m in (dm, dm_big))
    torch.testing.assert_close(lof_scores(lof_big, probe, target), lof_scores(lof, probe, target), rtol=1e-5,
                               atol=1e-5)


def test_breast_cancer_is_labelled_as_the_reference_wdbc_csv():
    """main.py's Wisconsin data: Diagnosis M -> 1, B -> 0 (scikit-learn codes malignant 0); 212 of 569 malignant."""
    from sklearn.datasets import load_breast_cancer

    dm = TabularDataModule(dataset="breast_cancer", scaling="zscore", split_rule="shuffle", split_seed=1, test_size=100)
    y = torch.cat([split_arrays(dm, s)[1] for s in ("train", "test")])
    assert len(y) == 569 and int(y.sum()) == 212 and dm.num_features == 30
    d = load_breast_cancer()
    assert list(d.target_names) == ["malignant", "benign"] and int((d.target == 0).sum()) == 212
