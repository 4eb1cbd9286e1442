"""CelebA-HQ (30,000 faces, 40 CelebA attributes) in the CelebAMask-HQ release layout, split as CelebA.

On disk (CelebAMask-HQ, https://github.com/switchablenorms/CelebAMask-HQ, plus CelebA's partition file)::

    <root>/CelebA-HQ-img/0.jpg ... 29999.jpg           1024 x 1024 JPEGs
    <root>/CelebAMask-HQ-attribute-anno.txt            line 1: 30000; line 2: the 40 attribute names;
                                                       then "0.jpg  1 -1 ..." (values -1/1)
    <root>/CelebA-HQ-to-CelebA-mapping.txt             header "idx orig_idx orig_file", then "0 119613 119614.jpg"
    <root>/list_eval_partition.txt (or .csv)           CelebA's: "000001.jpg 0" (or "image_id,partition")

An image's split is the CelebA split of the CelebA image it comes from (``orig_file``), as in ACE's and
STEEX's CelebA-HQ readers (0 = train, 1 = val, 2 = test; ACE explains the test split).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from equidiff.data.base import EquidiffDataModule
from equidiff.data.celeba import SPLIT_CODES
from equidiff.data.transforms import ImageFileDataset, check_root, image_transform, require
from equidiff.errors import ConfigError, DataLayoutError

IMAGES, ATTRS, MAPPING = "CelebA-HQ-img", "CelebAMask-HQ-attribute-anno.txt", "CelebA-HQ-to-CelebA-mapping.txt"
LAYOUT = (f"<root>/{IMAGES}/<i>.jpg, <root>/{ATTRS}, <root>/{MAPPING} and CelebA's <root>/list_eval_partition.txt "
          "(or .csv)")
SOURCE = ("Get CelebAMask-HQ.zip from https://github.com/switchablenorms/CelebAMask-HQ (it holds the images, the "
          "attribute and the mapping files) and CelebA's Eval/list_eval_partition.txt from "
          "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html, and put them in <root>.")


def read_hq_attributes(path: Path) -> tuple[list[str], list[str], torch.Tensor]:
    """CelebAMask-HQ-attribute-anno.txt -> (attribute names, file names, int64 attributes N x 40 as 0/1)."""
    with open(path) as f:
        count = f.readline().strip()
        names = f.readline().split()
        rows = [line.split() for line in f if line.strip()]
    if count != str(len(rows)) or any(len(r) != len(names) + 1 for r in rows):
        raise DataLayoutError(f"CelebA-HQ: {str(path)!r} announces {count!r} images of {len(names)} attributes but has "
                              f"{len(rows)} rows, not all of 1 + {len(names)} fields. {SOURCE}")
    if not {v for r in rows for v in r[1:]} <= {"-1", "1"}:
        raise DataLayoutError(f"CelebA-HQ: {str(path)!r} has attribute values other than -1 and 1. {SOURCE}")
    attrs = torch.tensor([[v == "1" for v in r[1:]] for r in rows], dtype=torch.int64)
    return names, [r[0] for r in rows], attrs


def read_mapping(path: Path) -> dict[str, str]:
    """CelebA-HQ-to-CelebA-mapping.txt -> {"<idx>.jpg": CelebA file name}."""
    with open(path) as f:
        header = f.readline().split()
        rows = [line.split() for line in f if line.strip()]
    if header[:3] != ["idx", "orig_idx", "orig_file"] or any(len(r) < 3 for r in rows):
        raise DataLayoutError(f"CelebA-HQ: {str(path)!r} should start with the header 'idx orig_idx orig_file'. "
                              f"{SOURCE}")
    return {f"{r[0]}.jpg": r[2] for r in rows}


def read_celeba_partition(root: Path) -> dict[str, int]:
    """CelebA's partition, from list_eval_partition.txt ("name code") or .csv ("image_id,partition")."""
    txt, csv = root / "list_eval_partition.txt", root / "list_eval_partition.csv"
    path = txt if txt.exists() else csv
    if not path.exists():
        raise DataLayoutError(f"CelebA-HQ: no list_eval_partition.txt or .csv under {str(root)!r}. {SOURCE}")
    with open(path) as f:
        lines = [line.replace(",", " ").split() for line in f if line.strip()]
    if lines and lines[0][:2] == ["image_id", "partition"]:
        lines = lines[1:]
    return {name: int(code) for name, code in lines}


class CelebAHQDataModule(EquidiffDataModule):
    """CelebA-HQ with one attribute as the binary label (layout in the module docstring).

    Items: ``{"image", "label": attrs[attribute] (0/1), "attrs": int64[40]}``, in file-index order.

    Args:
        root: the folder with the files.
        attribute: the label, a name from line 2 of the attribute file (ACE: Smiling, Young).
        image_size: resize + center crop (default 256, as ACE); None = 1024.
    """

    num_classes = 2

    def __init__(self, root: str, *, attribute: str = "Smiling", image_size: int | None = 256, **kwargs):
        super().__init__(**kwargs)
        self.root = check_root("CelebA-HQ", root, LAYOUT, SOURCE)
        require("CelebA-HQ", self.root, [IMAGES, ATTRS, MAPPING], LAYOUT, SOURCE)
        self.attribute_names, self.files, self.attrs = read_hq_attributes(self.root / ATTRS)
        if attribute not in self.attribute_names:
            raise ConfigError(f"CelebA-HQ: unknown attribute {attribute!r}; valid attributes (line 2 of {ATTRS}): "
                              f"{', '.join(self.attribute_names)}")
        self.attribute, self.image_size = attribute, image_size
        self.transform = image_transform(image_size)

    def split_codes(self) -> list[int]:
        mapping, partition = read_mapping(self.root / MAPPING), read_celeba_partition(self.root)
        missing = [f for f in self.files if f not in mapping or mapping[f] not in partition]
        if missing:
            raise DataLayoutError(f"CelebA-HQ: {len(missing)} images have no CelebA partition through {MAPPING} "
                                  f"(e.g. {missing[:3]}). {SOURCE}")
        return [partition[mapping[f]] for f in self.files]

    def make_dataset(self, split: str) -> Dataset:
        codes = self.split_codes()
        keep = [i for i, c in enumerate(codes) if c == SPLIT_CODES[split]]
        attrs = self.attrs[keep]
        labels = attrs[:, self.attribute_names.index(self.attribute)].tolist()
        return ImageFileDataset([self.root / IMAGES / self.files[i] for i in keep], self.transform, label=labels,
                                attrs=attrs)
