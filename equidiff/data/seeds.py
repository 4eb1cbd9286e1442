"""Generation as a predict over seeds: item i is (index i, seed = seed + i, label)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from equidiff.data.base import EquidiffDataModule


class SeedDataset(Dataset):
    """Item ``i``: ``{"index": i, "seed": seed + i, "label": label_i}``.

    ``labels`` chooses each sample's class label (or query index):
    ``None`` -> -1 (unconditional); ``"cycle"`` -> ``i % num_classes``; ``"random"`` -> drawn
    from the sample's own seed (so it does not depend on N or sharding); an int -> that label
    for all; a list -> ``labels[i % len(labels)]``.
    """

    def __init__(self, num_samples: int, seed: int = 0, labels: None | str | int | Sequence[int] = None,
                 num_classes: int | None = None):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if labels in ("cycle", "random") and not num_classes:
            raise ValueError(f"labels={labels!r} needs num_classes")
        if isinstance(labels, str) and labels not in ("cycle", "random"):
            raise ValueError(f"labels must be null, 'cycle', 'random', an int or a list, got {labels!r}")
        self.num_samples, self.seed, self.labels, self.num_classes = int(num_samples), int(seed), labels, num_classes

    def __len__(self) -> int:
        return self.num_samples

    def label(self, i: int) -> int:
        lab = self.labels
        if lab is None:
            return -1
        if lab == "cycle":
            return i % self.num_classes
        if lab == "random":
            # a generator of its own, offset so it is not the stream that draws x_T
            g = torch.Generator().manual_seed((self.seed + i) * 2 + 1)
            return int(torch.randint(self.num_classes, (1,), generator=g))
        if isinstance(lab, int):
            return lab
        return int(list(lab)[i % len(lab)])

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        return {"index": i, "seed": self.seed + i, "label": self.label(i)}


class SeedDataModule(EquidiffDataModule):
    """Predict-only DataModule over ``num_samples`` seeds starting at ``seed``."""

    def __init__(self, num_samples: int = 64, *, labels=None, num_classes: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.num_samples, self.labels, self.num_classes = num_samples, labels, num_classes
        SeedDataset(num_samples, self.seed, labels, num_classes)  # validate now, at build time

    def make_dataset(self, split: str):
        if split != self.predict_split:
            raise ValueError("SeedDataModule only provides the predict split (it is for generation)")
        return SeedDataset(self.num_samples, self.seed, self.labels, self.num_classes)
