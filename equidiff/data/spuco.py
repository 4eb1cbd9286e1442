"""SpuCoAnimals (Joshi et al. 2023): ImageNet birds and dogs with a spurious background, in spuco's layout.

On disk (what ``spuco`` 2.0.3 downloads and extracts into ``root``: ``spuco_birds.tar.gz`` and
``spuco_dogs.tar.gz``, see https://github.com/BigML-CS-UCLA/SpuCo)::

    <root>/spuco_birds/<split>/landbirds/land/*       <split> in train, val, test
    <root>/spuco_birds/<split>/landbirds/water/*
    <root>/spuco_birds/<split>/waterbirds/land/*
    <root>/spuco_birds/<split>/waterbirds/water/*
    <root>/spuco_dogs/<split>/small_dogs/indoor/*
    <root>/spuco_dogs/<split>/small_dogs/outdoor/*
    <root>/spuco_dogs/<split>/big_dogs/indoor/*
    <root>/spuco_dogs/<split>/big_dogs/outdoor/*

Per class, the majority background folder holds 10,000 / 500 / 500 images (train / val / test) and
the minority one 500 / 25 / 500; the majority backgrounds are landbirds-land, waterbirds-water,
small dogs-indoor and big dogs-outdoor.

Labels and groups follow spuco 2.0.3 (spuco/datasets/spuco_birds.py, spuco_dogs.py,
spuco_animals.py, base_spuco_dataset.py): birds are labels 0 landbirds / 1 waterbirds with spurious
0 land / 1 water; dogs are 0 small / 1 big with spurious 0 indoor / 1 outdoor, and SpuCoAnimals adds
2 to both, so labels are 0 landbird, 1 waterbird, 2 small dog, 3 big dog and spurious values 0 land,
1 water, 2 indoor, 3 outdoor. spuco's groups are the 8 (label, spurious) pairs that occur; group
here = their rank, 2 * label + (0 land/indoor, 1 water/outdoor). spuco lists each folder with
``os.listdir`` (an order that depends on the file system); we sort the file names so an item's index (and
seed) is the same everywhere. As spuco, we check the exact folder sizes (``check_counts``, on by default):
spuco asserts them with every entry of a folder counted, so a stray file fails its check ("Dataset
corrupted"); here an entry that is not an image file is an error that names it, whatever ``check_counts``.

Why not ``import spuco``: it requires wilds (with ogb), transformers, umap-learn, grad-cam and
matplotlib, none of which a reader of folders needs; every spuco dataset constructor calls
``seed_randomness``, which reseeds torch, numpy and random globally and sets cudnn flags; and
``download=True`` (its default) fetches from box.com when a folder is missing.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from equidiff.data.base import EquidiffDataModule
from equidiff.data.transforms import ImageFileDataset, check_root, image_transform, require
from equidiff.errors import DataLayoutError

SPLITS = ("train", "val", "test")
# (dataset folder, class folder, background folder) in group order: group g = index in this list.
GROUP_FOLDERS = [
    ("spuco_birds", "landbirds", "land"),
    ("spuco_birds", "landbirds", "water"),
    ("spuco_birds", "waterbirds", "land"),
    ("spuco_birds", "waterbirds", "water"),
    ("spuco_dogs", "small_dogs", "indoor"),
    ("spuco_dogs", "small_dogs", "outdoor"),
    ("spuco_dogs", "big_dogs", "indoor"),
    ("spuco_dogs", "big_dogs", "outdoor"),
]
LAYOUT = ("<root>/spuco_birds/{train,val,test}/{landbirds,waterbirds}/{land,water}/* and "
          "<root>/spuco_dogs/{train,val,test}/{small_dogs,big_dogs}/{indoor,outdoor}/*")
# spuco 2.0.3's MAJORITY_SIZE / MINORITY_SIZE (spuco_birds.py, spuco_dogs.py): images per folder
SIZES = {"train": (10000, 500), "val": (500, 25), "test": (500, 500)}
MAJORITY_GROUPS = (0, 3, 4, 7)  # landbirds-land, waterbirds-water, small dogs-indoor, big dogs-outdoor
SOURCE = ("Get spuco_birds.tar.gz and spuco_dogs.tar.gz (the download URLs are in spuco's "
          "spuco/datasets/spuco_birds.py and spuco_dogs.py, https://github.com/BigML-CS-UCLA/SpuCo) and "
          "extract both into <root>.")


def group_folder(root: Path, split: str, group: int) -> Path:
    dataset, cls, background = GROUP_FOLDERS[group]
    return root / dataset / split / cls / background


def expected_count(split: str, group: int) -> int:
    """Images per folder in spuco 2.0.3: majority or minority size of ``split``."""
    return SIZES[split][0 if group in MAJORITY_GROUPS else 1]


def list_images(folder: Path) -> list[Path]:
    """The image files of ``folder``, sorted by name; any other entry is an error (spuco would count it)."""
    entries = sorted(folder.iterdir())
    other = [p.name for p in entries if not (p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)]
    if other:
        raise DataLayoutError(
            f"SpuCoAnimals: {str(folder)!r} holds {len(other)} entr{'y' if len(other) == 1 else 'ies'} that "
            f"{'is' if len(other) == 1 else 'are'} not an image file ({', '.join(other[:5])}; image extensions: "
            f"{', '.join(IMG_EXTENSIONS)}). spuco's loader counts and opens every entry of the folder; move them "
            f"out of the dataset folder (or give images one of those extensions).")
    return entries


class SpuCoAnimalsDataModule(EquidiffDataModule):
    """SpuCoAnimals: 4 classes x 2 backgrounds = 8 groups (layout, labels and groups in the module docstring).

    Items: ``{"image", "label", "group"}``, ordered by group, then file name. Groups: 0 landbird-land,
    1 landbird-water, 2 waterbird-land, 3 waterbird-water, 4 small dog-indoor, 5 small dog-outdoor,
    6 big dog-indoor, 7 big dog-outdoor; label = group // 2.

    Args:
        root: the folder that holds ``spuco_birds`` and ``spuco_dogs``.
        check_counts: require spuco's folder sizes (10,000 / 500 train, 500 / 25 val, 500 / 500 test
            images in a majority / minority folder), as spuco does; ``False`` reads the folders as they are
            (a subset; the tests' fakes).
        image_size: center crop size (default 224). As spuco (``Resize((256, 256))``, then
            ``CenterCrop(224)``), the image is first resized to the square ``int(image_size * 256 / 224)``,
            aspect ratio not kept; ``square_resize=False`` resizes the short side instead. None = native.
    """

    num_classes = 4
    num_groups = 8
    class_names = ["landbird", "waterbird", "small_dog", "big_dog"]
    group_names = ["landbird_land", "landbird_water", "waterbird_land", "waterbird_water",
                   "small_dog_indoor", "small_dog_outdoor", "big_dog_indoor", "big_dog_outdoor"]

    def __init__(self, root: str, *, image_size: int | None = 224, square_resize: bool = True,
                 check_counts: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.check_counts = check_counts
        self.root = check_root("SpuCoAnimals", root, LAYOUT, SOURCE)
        folders = [group_folder(self.root, split, g) for split in SPLITS for g in range(self.num_groups)]
        require("SpuCoAnimals", self.root, [str(f.relative_to(self.root)) for f in folders], LAYOUT, SOURCE)
        self.image_size = image_size
        resize = int(image_size * 256 / 224) if image_size else None
        self.transform = image_transform(image_size, resize_size=resize, square_resize=square_resize)

    def files(self, split: str) -> list[tuple[Path, int]]:
        """(image path, group) of every image of ``split``, by group, then file name."""
        folders = [group_folder(self.root, split, g) for g in range(self.num_groups)]
        listed = [list_images(folder) for folder in folders]  # stray entries first: the clearer message
        out = []
        for g, (folder, images) in enumerate(zip(folders, listed, strict=True)):
            if self.check_counts and len(images) != expected_count(split, g):
                raise DataLayoutError(
                    f"SpuCoAnimals: {str(folder)!r} holds {len(images)} images; spuco 2.0.3 has "
                    f"{expected_count(split, g)} there ({split}, {self.group_names[g]}), and its loader stops "
                    f"here ('Dataset corrupted'). Re-extract the archive: {SOURCE} To read the folders as they "
                    f"are (a subset), set data.check_counts=false.")
            out += [(path, g) for path in images]
        return out

    def train_group_counts(self) -> torch.Tensor:
        """int64[8]: images per group in the train split."""
        counts = Counter(g for _, g in self.files("train"))
        return torch.tensor([counts[g] for g in range(self.num_groups)], dtype=torch.int64)

    def make_dataset(self, split: str) -> Dataset:
        files = self.files(split)
        paths = [path for path, _ in files]
        groups = [g for _, g in files]
        return ImageFileDataset(paths, self.transform, label=[g // 2 for g in groups], group=groups)
