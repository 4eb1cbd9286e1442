"""CIFAR-10 from the 'CIFAR-10 python version' batches, read with a restricted unpickler.

On disk (the tarball ``cifar-10-python.tar.gz`` from https://www.cs.toronto.edu/~kriz/cifar.html,
extracted into ``root``)::

    <root>/cifar-10-batches-py/data_batch_1 ... data_batch_5   10,000 training images each
    <root>/cifar-10-batches-py/test_batch                      10,000 test images
    <root>/cifar-10-batches-py/batches.meta                    {b"label_names": [b"airplane", ...]}

Each batch is a (Python 2) pickle of a dict with bytes keys: ``b"data"`` a uint8 array N x 3072
(row-major CHW: 1024 red, 1024 green, 1024 blue values of a 32x32 image), ``b"labels"`` a list
of N ints in 0..9 (and ``b"batch_label"``, ``b"filenames"``, unused here).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from equidiff.data.base import EquidiffDataModule
from equidiff.data.transforms import check_root, image_transform, require
from equidiff.errors import ConfigError, DataLayoutError

BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{k}" for k in range(1, 6)]
LAYOUT = (f"<root>/{BATCHES_DIR}/data_batch_1..5, test_batch and batches.meta "
          "(the 'CIFAR-10 python version')")
SOURCE = ("Get cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract the "
          "tarball into <root>.")

try:
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct
    from numpy.core.numeric import _frombuffer

# The only globals a batch file may name: what numpy needs to rebuild an array, under its numpy 1
# names (the real files) and numpy 2 names; _frombuffer is how protocol-5 pickles rebuild arrays.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, lists, dicts, bytes and numbers, and refuses every other global.

    A plain ``pickle.load`` runs whatever callable the file names (``os.system`` included); this one
    only resolves the numpy array reconstructors in ``_ALLOWED_GLOBALS``.
    """

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        raise DataLayoutError(
            f"CIFAR-10: refusing to unpickle the global {module}.{name} in {str(self.path)!r}: the real "
            "batches hold only numpy uint8 arrays, lists and bytes, so this file is not a CIFAR-10 batch "
            f"and was not loaded. {SOURCE}")


def load_pickled_dict(path: Path, keys: set[bytes]) -> dict:
    """A batch file -> its dict (bytes keys, ``keys`` required), through ``RestrictedUnpickler``."""
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, path).load()
    except DataLayoutError:
        raise
    except Exception as e:  # truncated, or not a pickle at all
        raise DataLayoutError(f"CIFAR-10: could not read {str(path)!r} as a pickle ({e!r}). {SOURCE}") from e
    if not isinstance(obj, dict) or not keys <= obj.keys():
        found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise DataLayoutError(f"CIFAR-10: {str(path)!r} is not a dict with keys {sorted(keys)} "
                              f"(found {found}). {SOURCE}")
    return obj


def load_images_labels(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch files -> (uint8 images N x 3 x 32 x 32, int64 labels N), concatenated in the given order."""
    images, labels = [], []
    for path in paths:
        batch = load_pickled_dict(path, {b"data", b"labels"})
        data = np.asarray(batch[b"data"])
        n = len(batch[b"labels"])
        if data.dtype != np.uint8 or data.shape != (n, 3072):
            raise DataLayoutError(f"CIFAR-10: {str(path)!r} holds b'data' {data.dtype} {data.shape} for "
                                  f"{n} labels; expected uint8 N x 3072. {SOURCE}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


class CIFAR10Arrays(Dataset):
    """Items ``{"image": transform(images[i]), "label": labels[i]}`` from uint8 NCHW images."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.transform(self.images[i]), "label": int(self.labels[i])}


class CIFAR10DataModule(EquidiffDataModule):
    """CIFAR-10 (10 classes, 32x32) from ``<root>/cifar-10-batches-py`` (layout in the module docstring).

    Splits: ``train`` = data_batch_1..5 in file order without its last ``val_size`` images;
    ``val`` = those last ``val_size`` images (a fixed hold-out, the same for every seed);
    ``test`` = test_batch.

    Args:
        root: the folder that holds ``cifar-10-batches-py``.
        image_size: None keeps 32x32; an int resizes (short side) and center-crops to it.
        val_size: images held out of the 50,000 training images for ``val`` (0 allowed).
    """

    num_classes = 10

    def __init__(self, root: str, *, image_size: int | None = None, val_size: int = 5000, **kwargs):
        super().__init__(**kwargs)
        self.root = check_root("CIFAR-10", root, LAYOUT, SOURCE)
        files = [*TRAIN_BATCHES, "test_batch", "batches.meta"]
        require("CIFAR-10", self.root, [f"{BATCHES_DIR}/{name}" for name in files], LAYOUT, SOURCE)
        if val_size < 0:
            raise ConfigError(f"CIFAR-10: val_size must be >= 0, got {val_size}")
        self.image_size, self.val_size = image_size, int(val_size)
        self.transform = image_transform(image_size)
        self._train_arrays: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def class_names(self) -> list[str]:
        """The 10 names in label order, from batches.meta (``airplane``, ``automobile``, ...)."""
        meta = load_pickled_dict(self.root / BATCHES_DIR / "batches.meta", {b"label_names"})
        return [name.decode() for name in meta[b"label_names"]]

    def train_arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All of data_batch_1..5 (read once)."""
        if self._train_arrays is None:
            paths = [self.root / BATCHES_DIR / name for name in TRAIN_BATCHES]
            self._train_arrays = load_images_labels(paths)
        return self._train_arrays

    def make_dataset(self, split: str) -> Dataset:
        if split == "test":
            images, labels = load_images_labels([self.root / BATCHES_DIR / "test_batch"])
            return CIFAR10Arrays(images, labels, self.transform)
        images, labels = self.train_arrays()
        n_train = len(labels) - self.val_size
        if n_train < 1:
            raise ConfigError(f"CIFAR-10: val_size={self.val_size} leaves no training images "
                              f"({len(labels)} in data_batch_1..5)")
        part = slice(0, n_train) if split == "train" else slice(n_train, None)
        return CIFAR10Arrays(images[part], labels[part], self.transform)

