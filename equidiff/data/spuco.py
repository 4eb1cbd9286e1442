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
here = their rank, 2 * label + (0 land/indoor, 1 water/outdoor). Two differences: spuco lists each
folder with ``os.listdir`` (an order that depends on the file system), we sort the file names so an
item's index (and seed) is the same everywhere; spuco asserts the exact folder sizes, we do not.

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
SOURCE = ("Get spuco_birds.tar.gz and spuco_dogs.tar.gz (the download URLs are in spuco's "
          "spuco/datasets/spuco_birds.py and spuco_dogs.py, https://github.com/BigML-CS-UCLA/SpuCo) and "
          "extract both into <root>.")


def group_folder(root: Path, split: str, group: int) -> Path:
    dataset, cls, background = GROUP_FOLDERS[group]
    return root / dataset / split / cls / background


def list_images(folder: Path) -> list[Path]:
    """The image files of ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


class SpuCoAnimalsDataModule(EquidiffDataModule):
    """SpuCoAnimals: 4 classes x 2 backgrounds = 8 groups (layout, labels and groups in the module docstring).

    Items: ``{"image", "label", "group"}``, ordered by group, then file name. Groups: 0 landbird-land,
    1 landbird-water, 2 waterbird-land, 3 waterbird-water, 4 small dog-indoor, 5 small dog-outdoor,
    6 big dog-indoor, 7 big dog-outdoor; label = group // 2.

    Args:
        root: the folder that holds ``spuco_birds`` and ``spuco_dogs``.
        image_size: center crop size (default 224). As spuco (``Resize((256, 256))``, then
            ``CenterCrop(224)``), the image is first resized to the square ``int(image_size * 256 / 224)``,
            aspect ratio not kept; ``square_resize=False`` resizes the short side instead. None = native.
    """

    num_classes = 4
    num_groups = 8
    class_names = ["landbird", "waterbird", "small_dog", "big_dog"]
    group_names = ["landbird_land", "landbird_water", "waterbird_land", "waterbird_water",
                   "small_dog_indoor", "small_dog_outdoor", "big_dog_indoor", "big_dog_outdoor"]

    def __init__(self, root: str, *, image_size: int | None = 224, square_resize: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.root = check_root("SpuCoAnimals", root, LAYOUT, SOURCE)
        folders = [group_folder(self.root, split, g) for split in SPLITS for g in range(self.num_groups)]
        require("SpuCoAnimals", self.root, [str(f.relative_to(self.root)) for f in folders], LAYOUT, SOURCE)
        self.image_size = image_size
        resize = int(image_size * 256 / 224) if image_size else None
        self.transform = image_transform(image_size, resize_size=resize, square_resize=square_resize)

    def files(self, split: str) -> list[tuple[Path, int]]:
        """(image path, group) of every image of ``split``, by group, then file name."""
        folders = [group_folder(self.root, split, g) for g in range(self.num_groups)]
        return [(path, g) for g, folder in enumerate(folders) for path in list_images(folder)]

    def train_group_counts(self) -> torch.Tensor:
        """int64[8]: images per group in the train split."""
        counts = Counter(g for _, g in self.files("train"))
        return torch.tensor([counts[g] for g in range(self.num_groups)], dtype=torch.int64)

    def make_dataset(self, split: str) -> Dataset:
        files = self.files(split)
        paths = [path for path, _ in files]
        groups = [g for _, g in files]
        return ImageFileDataset(paths, self.transform, label=[g // 2 for g in groups], group=groups)
