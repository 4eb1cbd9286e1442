"""The embedded datasets: scikit-learn's digits and concentric circles (no download, ever)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits, make_circles
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset

from equidiff.data.base import EquidiffDataModule


class TensorDictDataset(Dataset):
    """Items ``{key: tensor[i] for key in tensors}``."""

    def __init__(self, **tensors: torch.Tensor):
        n = {len(v) for v in tensors.values()}
        if len(n) != 1:
            raise ValueError(f"all tensors need the same length, got {n}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.tensors.items()}


def _split_indices(labels: np.ndarray, val_fraction: float, test_fraction: float, split_seed: int):
    """Stratified train/val/test index split, fixed by ``split_seed`` (not by the run's seed)."""
    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=split_seed)
    train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction), stratify=labels[rest],
                                  random_state=split_seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def digits_arrays(split: str = "train", *, val_fraction: float = 0.1, test_fraction: float = 0.2,
                  split_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn digits (8x8, values 0..16) as (images N1HW in [-1, 1], labels N)."""
    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    idx = _split_indices(d.target, val_fraction, test_fraction, split_seed)[split]
    return images[idx], labels[idx]


def digits_images(split: str = "test", **kwargs) -> torch.Tensor:
    """Just the images of a digits split (e.g. the reference set of a sample-quality metric)."""
    return digits_arrays(split, **kwargs)[0]


class DigitsDataModule(EquidiffDataModule):
    """scikit-learn digits: 1,797 grey 8x8 images of 10 classes; stratified 70/10/20 split."""

    num_classes = 10
    image_shape = (1, 8, 8)

    def __init__(self, *, val_fraction: float = 0.1, test_fraction: float = 0.2, split_seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.split_kwargs = dict(val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed)

    def make_dataset(self, split: str) -> Dataset:
        images, labels = digits_arrays(split, **self.split_kwargs)
        return TensorDictDataset(image=images, label=labels)


class CirclesDataModule(EquidiffDataModule):
    """scikit-learn ``make_circles``: 2D points, label 1 = inner circle (seed 000, Fig. 3.1).

    Items are ``{"x": float[2], "label": int}``. ``n_samples`` points in all (1,500 in the
    seed), split 70/10/20; the data itself is drawn with ``data_seed``.
    """

    num_classes = 2

    def __init__(self, *, n_samples: int = 1500, noise: float = 0.1, factor: float = 0.5, data_seed: int = 0,
                 val_fraction: float = 0.1, test_fraction: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        self.n_samples, self.noise, self.factor, self.data_seed = n_samples, noise, factor, data_seed
        self.fractions = (val_fraction, test_fraction)

    def arrays(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = make_circles(n_samples=self.n_samples, noise=self.noise, factor=self.factor,
                            random_state=self.data_seed)
        idx = _split_indices(y, *self.fractions, split_seed=self.data_seed)[split]
        return torch.from_numpy(x[idx].astype(np.float32)), torch.from_numpy(y[idx].astype(np.int64))

    def make_dataset(self, split: str) -> Dataset:
        x, y = self.arrays(split)
        return TensorDictDataset(x=x, label=y)
