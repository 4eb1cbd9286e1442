"""An embedded spurious-correlation benchmark from scikit-learn digits (no download, ever).

A binary task on the 8x8 digits, **label 1 = digit >= 5** (5-9) and **label 0 = digit < 5** (0-4), rendered
in colour: white ink on a background that is **red (colour 0) or blue (colour 1)**. In the training split
the background colour equals the label for a fraction ``train_agreement`` (0.95) of the samples; in val and
test for ``eval_agreement`` (0.5), so a model that reads the colour instead of the digit fails on the
minority groups. **group = 2 * label + colour** (0: <5 on red, 1: <5 on blue, 2: >=5 on red, 3: >=5 on blue),
as WaterBirds' label x place. The colour draw is fixed by ``split_seed`` (not the run's seed), per split.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from equidiff.data.base import EquidiffDataModule
from equidiff.data.embedded import TensorDictDataset, digits_arrays
from equidiff.errors import ConfigError

BACKGROUNDS = ((0.75, 0.1, 0.1), (0.1, 0.1, 0.75))  # red, blue (in [0, 1])
INK = (1.0, 1.0, 1.0)
NUM_GROUPS = 4


def colour_digits(gray: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """Grey digits N1HW in [-1, 1] to RGB in [-1, 1]: background colour where there is no ink, white ink."""
    ink = (gray + 1) / 2  # [0, 1]
    bg = torch.tensor(BACKGROUNDS, dtype=gray.dtype)[colour][:, :, None, None]  # [N, 3, 1, 1]
    rgb = bg * (1 - ink) + torch.tensor(INK, dtype=gray.dtype)[None, :, None, None] * ink
    return rgb * 2 - 1


def spurious_digits_arrays(split: str, *, train_agreement: float = 0.95, eval_agreement: float = 0.5,
                           split_seed: int = 0) -> dict[str, torch.Tensor]:
    """``{image N3HW in [-1, 1], label, colour, group, digit}`` of a split (see the module docstring)."""
    gray, digit = digits_arrays(split, split_seed=split_seed)
    label = (digit >= 5).long()
    agreement = train_agreement if split == "train" else eval_agreement
    rng = np.random.RandomState(split_seed * 1000 + ("train", "val", "test").index(split))
    agrees = torch.from_numpy(rng.random_sample(len(label)) < agreement)
    colour = torch.where(agrees, label, 1 - label)
    return {"image": colour_digits(gray, colour), "label": label, "colour": colour, "group": 2 * label + colour,
            "digit": digit}


class SpuriousDigitsDataModule(EquidiffDataModule):
    """The coloured binary digits benchmark (module docstring); items carry ``group`` and ``colour``.

    ``train_group_counts`` gives the training split's group sizes (the weights of a weighted average accuracy);
    ``max_items`` keeps the first n items of every split (quick runs and tests).
    """

    num_classes = 2
    num_groups = NUM_GROUPS
    image_shape = (3, 8, 8)

    def __init__(self, *, train_agreement: float = 0.95, eval_agreement: float = 0.5, split_seed: int = 0,
                 max_items: int | None = None, **kwargs):
        super().__init__(**kwargs)
        for name, v in (("train_agreement", train_agreement), ("eval_agreement", eval_agreement)):
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name} is a fraction in [0, 1], got {v}")
        self.kwargs = dict(train_agreement=train_agreement, eval_agreement=eval_agreement, split_seed=split_seed)
        self.max_items = max_items

    def arrays(self, split: str) -> dict[str, torch.Tensor]:
        a = spurious_digits_arrays(split, **self.kwargs)
        return {k: v[: self.max_items] for k, v in a.items()} if self.max_items else a

    def make_dataset(self, split: str) -> Dataset:
        a = self.arrays(split)
        return TensorDictDataset(image=a["image"], label=a["label"], group=a["group"], colour=a["colour"])

    def train_group_counts(self) -> list[int]:
        groups = self.arrays("train")["group"]
        return torch.bincount(groups, minlength=NUM_GROUPS).tolist()
