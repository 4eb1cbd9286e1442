"""Small helpers the folder DataModules share: the image transform, an image-file dataset, layout checks.

Every image leaves here as float32 CHW in [-1, 1] (``uint8 / 127.5 - 1``, the diffusion convention),
after an optional resize + center crop done on the uint8 image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from equidiff.errors import DataLayoutError
from equidiff.utils.images import uint8_to_float


def to_model_range(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """PIL image or uint8 CHW tensor -> float32 CHW in [-1, 1]."""
    if isinstance(image, Image.Image):
        image = T.functional.pil_to_tensor(image)
    if image.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    return uint8_to_float(image)


def image_transform(image_size: int | None, *, resize_size: int | None = None,
                    square_resize: bool = False) -> Callable:
    """Resize, center-crop to ``image_size`` and map to [-1, 1]; ``image_size=None`` keeps the native size.

    The resize goes to ``resize_size`` (default ``image_size``): the short side, the usual way, or
    both sides (``square_resize``, aspect ratio not kept) as group-DRO and spuco do.
    """
    if image_size is None:
        return to_model_range
    size = resize_size or image_size
    return T.Compose([
        T.Resize((size, size) if square_resize else size, antialias=True),
        T.CenterCrop(image_size),
        to_model_range,
    ])


def load_rgb(path: str | Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


class ImageFileDataset(Dataset):
    """Item ``i``: ``{"image": transform(load_rgb(paths[i])), **{k: v[i] for k, v in fields.items()}}``."""

    def __init__(self, paths: Sequence[str | Path], transform: Callable, **fields: Sequence):
        for key, values in fields.items():
            if len(values) != len(paths):
                raise ValueError(f"field {key!r} has {len(values)} values for {len(paths)} images")
        self.paths, self.transform, self.fields = list(paths), transform, fields

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        item = {"image": self.transform(load_rgb(self.paths[i]))}
        item.update({key: values[i] for key, values in self.fields.items()})
        return item


def check_root(name: str, root: str | Path, layout: str, source: str) -> Path:
    """``root`` as a Path, or a DataLayoutError if it is not a directory."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataLayoutError(f"{name}: root {str(root)!r} is not a directory. Expected {layout}. {source}")
    return root


def require(name: str, root: Path, relpaths: Sequence[str], layout: str, source: str) -> None:
    """Raise a DataLayoutError naming every path of ``relpaths`` (under ``root``) that does not exist."""
    missing = [p for p in relpaths if not (root / p).exists()]
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise DataLayoutError(f"{name}: missing {shown} under {str(root)!r}. Expected {layout}. {source}")
