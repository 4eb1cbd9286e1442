"""An embedded spurious-correlation benchmark from scikit-learn digits (no download, ever).

A binary task on the 8x8 digits, **label 1 = digit >= 5** (5-9) and **label 0 = digit < 5** (0-4), rendered
in colour: white ink on a background of **colour 0 (reddish) or colour 1 (bluish)**. In the training split
the background colour equals the label for a fraction ``train_agreement`` (0.95) of the samples; in val and
test for ``eval_agreement`` (0.5), so a model that reads the colour instead of the digit fails on the
minority groups. **group = 2 * label + colour** (0: <5 on red, 1: <5 on blue, 2: >=5 on red, 3: >=5 on blue),
as WaterBirds' label x place. The colour draw is fixed by ``split_seed`` (not the run's seed), per split.

``colour_strength`` sets how far apart the two backgrounds are: 1 is saturated red against blue, the default
0.1 two purples 0.065 apart in the red and blue channels (in [0, 1]). With saturated colours a SmallCNN reads
the colour alone (test WGA 0); at 0.1 it reads the digit too, like an ERM model on WaterBirds (about 89%
accuracy and 70% worst-group accuracy after 100 epochs), which is the regime the seed's comparison is about.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from equidiff.data.base import EquidiffDataModule
from equidiff.data.embedded import TensorDictDataset, digits_arrays
from equidiff.errors import ConfigError

BACKGROUNDS = ((0.75, 0.1, 0.1), (0.1, 0.1, 0.75))  # red, blue (in [0, 1]) at colour_strength 1
INK = (1.0, 1.0, 1.0)
NUM_GROUPS = 4


def colour_digits(gray: torch.Tensor, colour: torch.Tensor, strength: float = 0.1) -> torch.Tensor:
    """Grey digits N1HW in [-1, 1] to RGB in [-1, 1]: background colour where there is no ink, white ink.

    ``strength`` in (0, 1] scales the two backgrounds' difference about their mean (1: red and blue, small: two
    nearly equal purples, a subtler spurious cue)."""
    ink = (gray + 1) / 2  # [0, 1]
    palette = torch.tensor(BACKGROUNDS, dtype=gray.dtype)
    palette = palette.mean(0) + strength * (palette - palette.mean(0))
    bg = palette[colour][:, :, None, None]  # [N, 3, 1, 1]
    rgb = bg * (1 - ink) + torch.tensor(INK, dtype=gray.dtype)[None, :, None, None] * ink
    return rgb * 2 - 1


def spurious_digits_arrays(split: str, *, train_agreement: float = 0.95, eval_agreement: float = 0.5,
                           split_seed: int = 0, colour_strength: float = 0.1) -> dict[str, torch.Tensor]:
    """``{image N3HW in [-1, 1], label, colour, group, digit}`` of a split (see the module docstring)."""
    gray, digit = digits_arrays(split, split_seed=split_seed)
    label = (digit >= 5).long()
    agreement = train_agreement if split == "train" else eval_agreement
    rng = np.random.RandomState(split_seed * 1000 + ("train", "val", "test").index(split))
    agrees = torch.from_numpy(rng.random_sample(len(label)) < agreement)
    colour = torch.where(agrees, label, 1 - label)
    return {"image": colour_digits(gray, colour, colour_strength), "label": label, "colour": colour,
            "group": 2 * label + colour, "digit": digit, "ink": (gray + 1) / 2}


class SpuriousDigitsDataModule(EquidiffDataModule):
    """The coloured binary digits benchmark (module docstring); items carry ``group`` and ``colour``.

    ``train_group_counts`` gives the training split's group sizes (the weights of a weighted average accuracy);
    ``max_items`` keeps the first n items of every split (quick runs and tests).
    """

    num_classes = 2
    num_groups = NUM_GROUPS
    image_shape = (3, 8, 8)

    def __init__(self, *, train_agreement: float = 0.95, eval_agreement: float = 0.5, split_seed: int = 0,
                 colour_strength: float = 0.1, max_items: int | None = None, **kwargs):
        super().__init__(**kwargs)
        for name, v in (("train_agreement", train_agreement), ("eval_agreement", eval_agreement)):
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name} is a fraction in [0, 1], got {v}")
        if not 0.0 < colour_strength <= 1.0:
            raise ConfigError(f"colour_strength is in (0, 1] (1: red and blue backgrounds), got {colour_strength}")
        self.kwargs = dict(train_agreement=train_agreement, eval_agreement=eval_agreement, split_seed=split_seed,
                           colour_strength=colour_strength)
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


def perturbation_anatomy(perturbed: torch.Tensor, targets: torch.Tensor, source: dict[str, torch.Tensor],
                         colour_strength: float = 0.1) -> dict[str, float]:
    """Where a perturbed training set changed the coloured digits: the analysis behind the README's table.

    ``perturbed`` N3HW in [-1, 1] (row i edits ``source["image"][i]``), ``targets`` the labels y~, ``source`` the
    clean split's arrays (``spurious_digits_arrays``). Returns the mean |change| on background and on ink pixels
    ([0, 1] units), the share of pixels changed by more than one grey level, and ``colour_shift``: how far the
    background's red-minus-blue moved toward the majority colour of y~, as a fraction of the gap between the two
    backgrounds (1: repainted to the target's colour).
    """
    if perturbed.shape != source["image"].shape or len(targets) != len(perturbed):
        raise ConfigError(f"perturbed images {tuple(perturbed.shape)} and {len(targets)} targets do not match the "
                          f"source split {tuple(source['image'].shape)}")
    x, x0 = (perturbed + 1) / 2, (source["image"] + 1) / 2
    background = (source["ink"] == 0).expand_as(x0)
    delta = (x - x0).abs()

    def masked_mean(v, m):
        return (v * m).sum((1, 2, 3)) / m.sum((1, 2, 3)).clamp(min=1)

    def red_minus_blue(img):
        m = background[:, 0]
        return ((img[:, 0] - img[:, 2]) * m).sum((1, 2)) / m.sum((1, 2)).clamp(min=1)

    palette = torch.tensor(BACKGROUNDS)
    gap = float(colour_strength * ((palette[0, 0] - palette[0, 2]) - (palette[1, 0] - palette[1, 2])))
    shift = red_minus_blue(x) - red_minus_blue(x0)  # > 0: toward colour 0 (the majority colour of label 0)
    toward = torch.where(targets == 0, shift, -shift) / gap
    return {"background_change": masked_mean(delta, background).mean().item(),
            "ink_change": masked_mean(delta, ~background).mean().item(),
            "changed_pixels": (delta.amax(1) > 1 / 255).float().mean().item(),
            "colour_shift": toward.mean().item()}
