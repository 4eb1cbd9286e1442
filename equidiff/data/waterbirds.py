"""WaterBirds (CUB birds pasted on Places backgrounds; Sagawa et al. 2020) in the WILDS layout.

On disk (``waterbirds_v1.0.tar.gz`` from https://wilds.stanford.edu/downloads, extracted into
``root``)::

    <root>/waterbirds_v1.0/metadata.csv
    <root>/waterbirds_v1.0/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg
    ...                    (one folder per CUB class, at the paths in img_filename)

``root`` may also be the ``waterbirds_v1.0`` folder itself (or group-DRO's
``waterbird_complete95_forest2water2``, which has the same metadata.csv and folders).
metadata.csv has the header ``img_id,img_filename,y,split,place,place_filename``: y = 1 waterbird /
0 landbird, split = 0 train / 1 val / 2 test, place = 1 water / 0 land background.

The reader follows wilds 2.0.0's ``WaterbirdsDataset`` (wilds/datasets/waterbirds_dataset.py):
the same metadata columns and split codes, and its group, the ``CombinatorialGrouper`` over
(background, y), whose index is background + 2 * y = group-DRO's ``y * 2 + place``. We do not
depend on wilds (its waterbirds module does import on this stack): it requires ``ogb`` (a graph
benchmark package) and ``outdated``; with ``outdated`` installed, ``import wilds`` starts a thread
that asks PyPI whether wilds is out of date (a network call from offline cluster jobs); and its
dataset needs a ``RELEASE_v1.0.txt`` marker next to metadata.csv or it tries to download the data.
Reading one CSV file needs none of that.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import Dataset

from equidiff.data.base import EquidiffDataModule
from equidiff.data.transforms import ImageFileDataset, check_root, image_transform, require
from equidiff.errors import DataLayoutError

FOLDER = "waterbirds_v1.0"
COLUMNS = ["img_id", "img_filename", "y", "split", "place", "place_filename"]
LAYOUT = (f"<root>/{FOLDER}/metadata.csv (columns {','.join(COLUMNS)}) and the images at the paths in "
          f"img_filename, relative to <root>/{FOLDER} (root may also be {FOLDER} itself)")
SOURCE = ("Get waterbirds_v1.0.tar.gz from https://wilds.stanford.edu/downloads and extract it into <root>.")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def find_waterbirds_root(root: Path) -> Path:
    """``root/waterbirds_v1.0`` when it holds metadata.csv, else ``root`` itself."""
    return root / FOLDER if (root / FOLDER / "metadata.csv").exists() else root


def read_metadata(path: Path) -> list[dict[str, str]]:
    """metadata.csv -> its rows, the header checked."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("img_filename", "y", "split", "place") if c not in (reader.fieldnames or [])]
        if missing:
            raise DataLayoutError(f"WaterBirds: {str(path)!r} lacks the columns {missing} (header: "
                                  f"{reader.fieldnames}). Expected {LAYOUT}. {SOURCE}")
        return list(reader)


class WaterBirdsDataModule(EquidiffDataModule):
    """WaterBirds: label y (landbird 0 / waterbird 1), group 2 * y + place (layout in the module docstring).

    Items: ``{"image", "label": y, "group"}`` in metadata.csv row order. Groups: 0 landbird on land,
    1 landbird on water, 2 waterbird on land, 3 waterbird on water (train: 3498 / 184 / 56 / 1057).

    Args:
        root: the folder that holds ``waterbirds_v1.0`` (or that folder itself).
        image_size: center crop size (default 224). As group-DRO (``get_transform_cub``), the image is
            first resized to the square ``int(image_size * 256 / 224)`` (256 for 224), aspect ratio
            not kept; ``square_resize=False`` resizes the short side instead. None = native size.
    """

    num_classes = 2
    num_groups = 4
    class_names = ["landbird", "waterbird"]
    group_names = ["landbird_land", "landbird_water", "waterbird_land", "waterbird_water"]

    def __init__(self, root: str, *, image_size: int | None = 224, square_resize: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.root = find_waterbirds_root(check_root("WaterBirds", root, LAYOUT, SOURCE))
        require("WaterBirds", self.root, ["metadata.csv"], LAYOUT, SOURCE)
        self.image_size = image_size
        resize = int(image_size * 256 / 224) if image_size else None
        self.transform = image_transform(image_size, resize_size=resize, square_resize=square_resize)
        self._rows: list[dict[str, str]] | None = None

    def rows(self, split: str) -> list[dict[str, str]]:
        """The metadata.csv rows of ``split`` (the file is read once)."""
        if self._rows is None:
            self._rows = read_metadata(self.root / "metadata.csv")
        return [row for row in self._rows if int(row["split"]) == SPLIT_CODES[split]]

    def train_group_counts(self) -> torch.Tensor:
        """int64[4]: images per group in the train split, the weights of WaterBirds' "average accuracy"."""
        counts = Counter(2 * int(row["y"]) + int(row["place"]) for row in self.rows("train"))
        return torch.tensor([counts[g] for g in range(self.num_groups)], dtype=torch.int64)

    def make_dataset(self, split: str) -> Dataset:
        rows = self.rows(split)
        paths = [self.root / row["img_filename"] for row in rows]
        labels = [int(row["y"]) for row in rows]
        groups = [2 * int(row["y"]) + int(row["place"]) for row in rows]
        return ImageFileDataset(paths, self.transform, label=labels, group=groups)
