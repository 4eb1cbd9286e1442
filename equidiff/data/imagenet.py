"""ImageNet (ILSVRC-2012) in the usual ImageFolder layout, read with torchvision's ``ImageFolder``.

On disk::

    <root>/train/<wnid>/*.JPEG     e.g. <root>/train/n01440764/n01440764_10026.JPEG
    <root>/val/<wnid>/*.JPEG       e.g. <root>/val/n01440764/ILSVRC2012_val_00000293.JPEG

The official validation tarball unpacks to 50,000 files in one folder; sort them into one folder
per wnid first (e.g. the ``valprep.sh`` script linked from the PyTorch ImageNet example,
https://github.com/pytorch/examples/tree/main/imagenet). The images come from
https://image-net.org/download.php (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder

from equidiff.data.base import EquidiffDataModule
from equidiff.data.imagenet_wnids import ILSVRC2012_WNIDS
from equidiff.data.transforms import check_root, image_transform
from equidiff.errors import ConfigError, DataLayoutError

LAYOUT = "<root>/train/<wnid>/*.JPEG and/or <root>/val/<wnid>/*.JPEG (one folder per class)"
SOURCE = ("Get ILSVRC2012_img_train.tar / ILSVRC2012_img_val.tar from https://image-net.org/download.php and "
          "sort val into one folder per wnid (valprep.sh, https://github.com/pytorch/examples/tree/main/imagenet).")
SPLIT_FOLDERS = {"train": "train", "val": "val", "test": "val"}
LABEL_MAPS = ("auto", "ilsvrc2012", "folders")
_WNID_INDEX = {wnid: i for i, wnid in enumerate(ILSVRC2012_WNIDS)}


def class_folders(folder: Path) -> list[str]:
    """Sorted names of the sub-folders of ``folder`` (the wnids)."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


class IndexedImageFolder(ImageFolder):
    """``ImageFolder`` over the ``wnids`` given, labelled by ``class_to_idx``; items are dicts."""

    def __init__(self, root: Path, class_to_idx: dict[str, int], transform):
        self._class_to_idx = class_to_idx
        super().__init__(str(root), transform=transform)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return sorted(self._class_to_idx), self._class_to_idx

    def __getitem__(self, i: int) -> dict:
        image, label = super().__getitem__(i)
        return {"image": image, "label": label}


class ImageNetDataModule(EquidiffDataModule):
    """ImageNet from class folders (layout in the module docstring).

    Class index (``label_map``):

    * ``"ilsvrc2012"``: the position of the folder's wnid among the 1000 ILSVRC-2012 wnids in sorted order
      (``ILSVRC2012_WNIDS``), the order of torchvision's ``ImageFolder`` on the full dataset and of every
      pretrained 1000-class classifier, whatever subset of class folders is on disk (a ``val/`` holding
      only ``n02391049`` and ``n02389026`` gives labels 340 and 339). ``num_classes`` = 1000. A folder
      that is not an ILSVRC-2012 wnid is an error.
    * ``"folders"``: the position in the sorted list of class folders (of ``train``, or of ``val`` where
      there is no ``train``), as ``ImageFolder`` does, for a custom class set; ``train/`` and ``val/``
      must then hold the same folders. ``num_classes`` = their number.
    * ``"auto"`` (default): ``"ilsvrc2012"`` if any class folder is an ILSVRC-2012 wnid, else ``"folders"``.

    ``classes`` reads only some wnids and keeps their indices (and ``num_classes``).

    Splits: ``train`` = ``<root>/train``; ``val`` and ``test`` both = ``<root>/val``, ImageNet's
    labelled evaluation set (the test labels were never released). A root with only ``val`` (all an
    explanation run needs) is fine; asking for a split whose folder is missing is an error.

    Args:
        root: the folder that holds ``train`` and/or ``val``.
        image_size: resize (short side) + center crop to this size (default 256); None = native sizes
            (which differ per image, so batch_size 1).
        classes: optional list of wnids to read.
        label_map: "auto", "ilsvrc2012" or "folders" (above).
        square_resize: resize both sides to ``image_size`` (aspect ratio not kept), as GSE's evaluation does
            (``Resize((256, 256))``), instead of short side + center crop.
        indices_path: a text file of comma-separated indices into the validation set (the ``val`` and
            ``test`` splits read only those images, in the file's order): GSE's ``random_10k_indices.txt``
            (wagnermoritz/GSE), whose indices count the sorted wnid folders and sorted files, as here.
    """

    def __init__(self, root: str, *, image_size: int | None = 256, classes: Sequence[str] | None = None,
                 label_map: str = "auto", square_resize: bool = False, indices_path: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if label_map not in LABEL_MAPS:
            raise ConfigError(f"ImageNet: label_map must be one of {LABEL_MAPS}, got {label_map!r}")
        self.root = check_root("ImageNet", root, LAYOUT, SOURCE)
        present = [name for name in ("train", "val") if (self.root / name).is_dir()]
        if not present:
            raise DataLayoutError(f"ImageNet: neither train/ nor val/ under {str(self.root)!r}. "
                                  f"Expected {LAYOUT}. {SOURCE}")
        folders = {name: class_folders(self.root / name) for name in present}
        for name, wnids in folders.items():
            if not wnids:
                raise DataLayoutError(f"ImageNet: {str(self.root / name)!r} has no class folders (is it the "
                                      f"unsorted validation tarball?). Expected {LAYOUT}. {SOURCE}")
        on_disk = sorted(set().union(*folders.values()))
        if label_map == "auto":
            label_map = "ilsvrc2012" if any(w in _WNID_INDEX for w in on_disk) else "folders"
        if label_map == "ilsvrc2012":
            foreign = [w for w in on_disk if w not in _WNID_INDEX]
            if foreign:
                raise DataLayoutError(
                    f"ImageNet: {len(foreign)} class folder(s) under {str(self.root)!r} are not ILSVRC-2012 wnids "
                    f"(e.g. {foreign[:5]}), so they have no ImageNet-1k label. Remove them, or, for a custom "
                    f"class set, set data.label_map=folders (labels 0..k-1 in sorted folder order).")
            self.wnids = list(ILSVRC2012_WNIDS)
        else:
            if len(folders) == 2 and folders["train"] != folders["val"]:
                only = sorted(set(folders["train"]) ^ set(folders["val"]))
                raise DataLayoutError(f"ImageNet: train/ and val/ have different class folders "
                                      f"({len(only)} in only one of them, e.g. {only[:5]}), and with "
                                      f"label_map=folders the labels are positions among the folders. {SOURCE}")
            self.wnids = folders[present[0]]
        self.label_map = label_map
        self.num_classes = len(self.wnids)
        self.index = {wnid: i for i, wnid in enumerate(self.wnids)}
        self.classes = list(classes) if classes is not None else None
        unknown = sorted(set(self.classes or ()) - set(on_disk))
        if unknown:
            raise ConfigError(f"ImageNet: classes {unknown[:10]} are not class folders under "
                              f"{str(self.root)!r} (it has {len(on_disk)}, e.g. {on_disk[:3]})")
        self.image_size = image_size
        self.transform = image_transform(image_size, square_resize=square_resize)
        self.indices = read_indices(indices_path) if indices_path is not None else None

    def make_dataset(self, split: str) -> Dataset:
        folder = self.root / SPLIT_FOLDERS[split]
        if not folder.is_dir():
            raise DataLayoutError(f"ImageNet: split {split!r} reads {str(folder)!r}, which does not exist. "
                                  f"Expected {LAYOUT}. {SOURCE}")
        wnids = self.classes if self.classes is not None else class_folders(folder)
        try:
            ds = IndexedImageFolder(folder, {wnid: self.index[wnid] for wnid in wnids}, self.transform)
        except FileNotFoundError as e:  # a class folder missing or without images
            raise DataLayoutError(f"ImageNet: {e} in {str(folder)!r}. Expected {LAYOUT}. {SOURCE}") from e
        if self.indices is None or SPLIT_FOLDERS[split] != "val":
            return ds
        too_big = [i for i in self.indices if i >= len(ds)]
        if too_big:
            raise DataLayoutError(f"ImageNet: the indices file names image {max(too_big)} but {str(folder)!r} holds "
                                  f"{len(ds)} images; it indexes the full 50,000-image validation set (all 1000 "
                                  f"class folders, data.classes=null)")
        return Subset(ds, self.indices)


def read_indices(path: str | os.PathLike) -> list[int]:
    """Comma-separated (or whitespace-separated) non-negative integers from a text file."""
    p = Path(path)
    if not p.is_file():
        raise DataLayoutError(f"ImageNet: no indices file at {str(p)!r}; for GSE's evaluation copy "
                              f"random_10k_indices.txt from https://github.com/wagnermoritz/GSE there, or set "
                              f"data.indices_path=null to read the whole validation set")
    try:
        out = [int(tok) for tok in p.read_text().replace(",", " ").split()]
    except ValueError as e:
        raise DataLayoutError(f"ImageNet: {str(p)!r} must hold comma-separated integers ({e})") from e
    if not out or min(out) < 0 or len(set(out)) != len(out):
        raise DataLayoutError(f"ImageNet: {str(p)!r} must hold distinct non-negative indices, got {len(out)} "
                              f"entries")
    return out
