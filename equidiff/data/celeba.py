"""CelebA (aligned and cropped faces, 40 binary attributes) from the official files.

On disk (from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html: ``img_align_celeba.zip``,
``Anno/list_attr_celeba.txt``, ``Eval/list_eval_partition.txt``)::

    <root>/img_align_celeba/000001.jpg ... 202599.jpg    178 x 218 (W x H) JPEGs
    <root>/list_attr_celeba.txt
    <root>/list_eval_partition.txt

``root`` may also be the folder that holds ``celeba/`` with these inside (torchvision's layout).
``list_attr_celeba.txt``: line 1 the number of images; line 2 the 40 attribute names separated by
spaces; then one line per image, ``000001.jpg -1  1  1 -1 ...``, values -1/1 separated by one or
more spaces. ``list_eval_partition.txt``: lines ``000001.jpg 0`` with 0 = train, 1 = val, 2 = test.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from equidiff.data.base import EquidiffDataModule
from equidiff.data.transforms import ImageFileDataset, check_root, image_transform, require
from equidiff.errors import ConfigError, DataLayoutError

REQUIRED = ["img_align_celeba", "list_attr_celeba.txt", "list_eval_partition.txt"]
LAYOUT = ("<root>/img_align_celeba/*.jpg, <root>/list_attr_celeba.txt and <root>/list_eval_partition.txt "
          "(or the same under <root>/celeba/)")
SOURCE = ("Get img_align_celeba.zip, Anno/list_attr_celeba.txt and Eval/list_eval_partition.txt from "
          "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html and put them in <root>.")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def find_celeba_root(root: Path) -> Path:
    """``root`` itself when it holds the files, else ``root/celeba`` when that does."""
    if not (root / REQUIRED[1]).exists() and (root / "celeba" / REQUIRED[1]).exists():
        return root / "celeba"
    return root


def read_attribute_names(path: Path) -> list[str]:
    """Line 2 of list_attr_celeba.txt."""
    with open(path) as f:
        f.readline()
        return f.readline().split()


def read_attributes(path: Path) -> tuple[list[str], torch.Tensor]:
    """list_attr_celeba.txt -> (file names, int64 attributes N x 40 as 0/1)."""
    with open(path) as f:
        count = f.readline().strip()
        num_attrs = len(f.readline().split())
        rows = [line.split() for line in f if line.strip()]
    if count != str(len(rows)) or any(len(row) != num_attrs + 1 for row in rows):
        raise DataLayoutError(f"CelebA: {str(path)!r} announces {count!r} images of {num_attrs} attributes "
                              f"but has {len(rows)} rows, not all of 1 + {num_attrs} fields. {SOURCE}")
    values = {v for row in rows for v in row[1:]}
    if not values <= {"-1", "1"}:
        raise DataLayoutError(f"CelebA: {str(path)!r} has attribute values other than -1 and 1 "
                              f"({sorted(values - {'-1', '1'})[:5]}). {SOURCE}")
    attrs = torch.tensor([[v == "1" for v in row[1:]] for row in rows], dtype=torch.int64)  # -1/1 -> 0/1
    return [row[0] for row in rows], attrs


def read_partition(path: Path) -> dict[str, int]:
    """list_eval_partition.txt -> {file name: 0 train / 1 val / 2 test}."""
    with open(path) as f:
        return {name: int(code) for name, code in (line.split() for line in f if line.strip())}


class CelebADataModule(EquidiffDataModule):
    """CelebA with one attribute as the binary label (layout in the module docstring).

    Items: ``{"image", "label": attrs[attribute] (0/1), "attrs": int64[40] (0/1)}``, in file order;
    splits from list_eval_partition.txt (162,770 / 19,867 / 19,962 images).

    Args:
        root: the folder with the files (or with ``celeba/`` holding them).
        attribute: the attribute used as the label, a name from line 2 of list_attr_celeba.txt.
        image_size: resize (short side) + center crop to this size (default 128, as ACE); None = 178x218.
    """

    num_classes = 2

    def __init__(self, root: str, *, attribute: str = "Smiling", image_size: int | None = 128, **kwargs):
        super().__init__(**kwargs)
        self.root = find_celeba_root(check_root("CelebA", root, LAYOUT, SOURCE))
        require("CelebA", self.root, REQUIRED, LAYOUT, SOURCE)
        self.attribute_names = read_attribute_names(self.root / "list_attr_celeba.txt")
        if attribute not in self.attribute_names:
            raise ConfigError(f"CelebA: unknown attribute {attribute!r}; valid attributes (line 2 of "
                              f"list_attr_celeba.txt): {', '.join(self.attribute_names)}")
        self.attribute, self.image_size = attribute, image_size
        self.transform = image_transform(image_size)
        self._table: tuple[list[str], torch.Tensor, dict[str, int]] | None = None

    def table(self) -> tuple[list[str], torch.Tensor, dict[str, int]]:
        """(file names, attributes, partition), read once."""
        if self._table is None:
            names, attrs = read_attributes(self.root / "list_attr_celeba.txt")
            partition = read_partition(self.root / "list_eval_partition.txt")
            missing = [name for name in names if name not in partition]
            if missing:
                raise DataLayoutError(f"CelebA: {len(missing)} images of list_attr_celeba.txt are not in "
                                      f"list_eval_partition.txt (e.g. {missing[:3]}). {SOURCE}")
            self._table = names, attrs, partition
        return self._table

    def make_dataset(self, split: str) -> Dataset:
        names, attrs, partition = self.table()
        keep = [i for i, name in enumerate(names) if partition[name] == SPLIT_CODES[split]]
        attrs = attrs[keep]
        labels = attrs[:, self.attribute_names.index(self.attribute)].tolist()
        paths = [self.root / "img_align_celeba" / names[i] for i in keep]
        return ImageFileDataset(paths, self.transform, label=labels, attrs=attrs)
