"""BDD100K driving images (Yu et al. 2020), as ACE explains them: the 100k images of one split, unlabelled.

On disk (https://bdd-data.berkeley.edu, "100K Images")::

    <root>/images/100k/train/*.jpg    70,000 images, 1280 x 720
    <root>/images/100k/val/*.jpg      10,000
    <root>/images/100k/test/*.jpg     20,000

Images are resized (bicubic, aspect ratio not kept) to ``image_size`` = (H, W), 256 x 512 in ACE
(its ``BDD10KCE`` reader), in sorted file-name order. There is no label (``label = -1``): the explained
decision is the classifier's own (ACE flips the "move forward" output of STEEX's BDD-OIA DenseNet).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils.data import Dataset
from torchvision import transforms as T

from equidiff.data.base import EquidiffDataModule
from equidiff.data.transforms import ImageFileDataset, check_root, to_model_range
from equidiff.errors import DataLayoutError

LAYOUT = "<root>/images/100k/{train,val,test}/*.jpg"
SOURCE = "Get bdd100k_images_100k.zip from https://bdd-data.berkeley.edu and extract it into <root>."
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class BDD100kDataModule(EquidiffDataModule):
    """BDD100K 100k images (layout in the module docstring); items ``{"image", "label": -1}``.

    Args:
        root: the folder holding ``images/100k``.
        image_size: (H, W) after resizing, default (256, 512).
    """

    def __init__(self, root: str, *, image_size: Sequence[int] = (256, 512), **kwargs):
        super().__init__(**kwargs)
        self.root = check_root("BDD100K", root, LAYOUT, SOURCE)
        if not (self.root / "images" / "100k").is_dir():
            raise DataLayoutError(f"BDD100K: no images/100k under {str(self.root)!r}. Expected {LAYOUT}. {SOURCE}")
        self.image_size = tuple(int(s) for s in image_size)
        self.transform = T.Compose([T.Resize(self.image_size, interpolation=T.InterpolationMode.BICUBIC,
                                             antialias=True), to_model_range])

    def make_dataset(self, split: str) -> Dataset:
        folder = self.root / "images" / "100k" / split
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not files:
            raise DataLayoutError(f"BDD100K: no images in {str(folder)!r}. Expected {LAYOUT}. {SOURCE}")
        return ImageFileDataset(files, self.transform, label=[-1] * len(files))
