"""The embedded scikit-learn datasets: digits and concentric circles."""

import numpy as np
import torch
from sklearn.datasets import load_digits, make_circles

from equidiff.data import CirclesDataModule, DigitsDataModule


def test_digits_splits_cover_the_dataset_once_in_model_range():
    dm = DigitsDataModule(batch_size=1000)
    parts = {s: dm.dataset(s) for s in ("train", "val", "test")}
    assert [len(p) for p in parts.values()] == [1257, 180, 360]
    images = torch.cat([torch.stack([p[i]["image"] for i in range(len(p))]) for p in parts.values()])
    assert images.shape[1:] == (1, 8, 8) and images.min() == -1 and images.max() == 1
    # every real image appears exactly once across the splits, unchanged up to the [-1, 1] mapping
    real = torch.from_numpy(load_digits().images.astype(np.float32) / 8 - 1).unsqueeze(1)
    ours = sorted(map(bytes, images.flatten(1).numpy()))
    assert ours == sorted(map(bytes, real.flatten(1).numpy()))
    item = parts["test"][5]
    assert set(item) == {"image", "label", "index", "seed"} and item["seed"] == 5
    # stratified: every class in every split
    for p in parts.values():
        assert len({int(p[i]["label"]) for i in range(len(p))}) == 10
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (1000, 1, 8, 8)


def test_circles_match_make_circles_and_the_split_is_fixed():
    dm = CirclesDataModule(n_samples=1500, noise=0.1, factor=0.5, data_seed=0)
    x, y = make_circles(n_samples=1500, noise=0.1, factor=0.5, random_state=0)
    parts = [dm.arrays(s) for s in ("train", "val", "test")]
    assert sum(len(p[1]) for p in parts) == 1500
    xs = torch.cat([p[0] for p in parts]).numpy()
    assert sorted(map(tuple, xs.round(6))) == sorted(map(tuple, x.astype(np.float32).round(6)))
    item = dm.dataset("test")[0]
    assert set(item) == {"x", "label", "index", "seed"} and item["x"].shape == (2,)
    again = CirclesDataModule(n_samples=1500, noise=0.1, factor=0.5, data_seed=0).arrays("test")
    torch.testing.assert_close(again[0], parts[2][0])
    # label 1 = inner circle: smaller radius on average
    r = parts[0][0].norm(dim=1)
    assert r[parts[0][1] == 1].mean() < r[parts[0][1] == 0].mean()
