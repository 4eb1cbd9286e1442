"""Tiny fake datasets in the real on-disk formats, for the DataModule tests and any test that needs one.

Every writer takes the folder to use as the DataModule's ``root`` and returns what it wrote. Images
are tiny solid-colour files, image ``k`` of a dataset in ``color(k)``, so a test can tell which file
an item came from by its mean colour (JPEG keeps a solid colour to within a few levels).
"""

from __future__ import annotations

import csv
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
                       "dog", "frog", "horse", "ship", "truck"]

# line 2 of the real list_attr_celeba.txt
CELEBA_ATTRIBUTES = [
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open",
    "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
]


def color(k: int) -> tuple[int, int, int]:
    """A distinct RGB colour for image ``k`` (k < 20 or so), away from 0 and 255."""
    return (20 + (67 * k) % 216, 20 + (29 * k + 90) % 216, 20 + (113 * k + 40) % 216)


def write_image(path: Path, k: int, size: tuple[int, int] = (10, 12)) -> Path:
    """A solid ``color(k)`` image of ``size`` (W, H); the format follows the suffix (JPEG at quality 95)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color(k)).save(path, quality=95)
    return path


# -- CIFAR-10 -------------------------------------------------------------------------------------
class _Python2Pickler(pickle._Pickler):
    """Pickles as the real CIFAR-10 batches were written (Python 2 cPickle, protocol 2, numpy 1):
    bytes and str as Python 2 ``str`` opcodes (not ``_codecs.encode`` calls, not unicode) and numpy's
    functions under ``numpy.core``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj: bytes):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str
    dispatch[str] = lambda self, obj: self.save_python2_str(obj.encode("latin-1"))  # e.g. numpy's dtype 'u1'

    def save_global(self, obj, name=None):
        name = name or obj.__qualname__
        module = pickle.whichmodule(obj, name).replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)


def write_python2_pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        _Python2Pickler(f, protocol=2).dump(obj)


def write_fake_cifar10(root: str | Path, n_train: int = 20, n_test: int = 6, seed: int = 0) -> dict:
    """``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` with random images.

    ``n_train`` images are spread over the 5 training batches in order. Returns ``train_data`` /
    ``test_data`` (uint8 N x 3072), ``train_labels`` / ``test_labels`` (lists) and ``label_names``.
    """
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {"label_names": list(CIFAR10_LABEL_NAMES)}
    for split, n in (("train", n_train), ("test", n_test)):
        out[f"{split}_data"] = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        out[f"{split}_labels"] = rng.integers(0, 10, n).tolist()
    parts = np.array_split(np.arange(n_train), 5)
    batches = [(f"data_batch_{k + 1}", "train", idx, f"training batch {k + 1} of 5")
               for k, idx in enumerate(parts)]
    batches.append(("test_batch", "test", np.arange(n_test), "testing batch 1 of 1"))
    for name, split, idx, batch_label in batches:
        write_python2_pickle(folder / name, {
            b"batch_label": batch_label.encode(),
            b"labels": [out[f"{split}_labels"][i] for i in idx],
            b"data": out[f"{split}_data"][idx],
            b"filenames": [f"fake_{split}_{i}.png".encode() for i in idx],
        })
    write_python2_pickle(folder / "batches.meta", {
        b"num_cases_per_batch": max(len(p) for p in parts),
        b"label_names": [name.encode() for name in CIFAR10_LABEL_NAMES],
        b"num_vis": 3072,
    })
    return out


# -- ImageNet -------------------------------------------------------------------------------------
def write_fake_imagenet(root: str | Path, wnids=("n01443537", "n01440764", "n01484850"), n_train: int = 2,
                        n_val: int = 1, size: tuple[int, int] = (12, 10)) -> dict:
    """``<root>/train/<wnid>/<wnid>_<k>.JPEG`` and ``<root>/val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG``.

    Returns ``wnids`` (sorted: the class order) and, per split, a list of (path, label, colour index)
    in ImageFolder order (class, then file name).
    """
    root, wnids = Path(root), sorted(wnids)
    out: dict = {"wnids": wnids, "train": [], "val": []}
    k = 0
    for label, wnid in enumerate(wnids):
        for split, n in (("train", n_train), ("val", n_val)):
            for j in range(n):
                name = f"{wnid}_{j + 1}.JPEG" if split == "train" else f"ILSVRC2012_val_{k + 1:08d}.JPEG"
                out[split].append((write_image(root / split / wnid / name, k, size), label, k))
                k += 1
    return out


# -- CelebA ---------------------------------------------------------------------------------------
def write_fake_celeba(root: str | Path, n_train: int = 4, n_val: int = 2, n_test: int = 3,
                      size: tuple[int, int] = (10, 12), subfolder: bool = False, seed: int = 0) -> dict:
    """``img_align_celeba/000001.jpg...``, ``list_attr_celeba.txt``, ``list_eval_partition.txt``.

    In ``<root>`` (or ``<root>/celeba`` with ``subfolder``). Splits are interleaved (a random order
    of the partition codes). Returns ``names``, ``attrs`` (int N x 40 of -1/1), ``partition``
    (codes 0/1/2 per image, in file order) and ``attribute_names``; image ``k`` has ``color(k)``.
    """
    folder = Path(root) / "celeba" if subfolder else Path(root)
    rng = np.random.default_rng(seed)
    partition = rng.permutation([0] * n_train + [1] * n_val + [2] * n_test).tolist()
    n = len(partition)
    names = [f"{k + 1:06d}.jpg" for k in range(n)]
    attrs = rng.choice([-1, 1], size=(n, len(CELEBA_ATTRIBUTES)))
    for k, name in enumerate(names):
        write_image(folder / "img_align_celeba" / name, k, size)
    with open(folder / "list_attr_celeba.txt", "w") as f:
        f.write(f"{n}\n" + " ".join(CELEBA_ATTRIBUTES) + " \n")
        for name, row in zip(names, attrs, strict=True):
            f.write(name + " " + " ".join(f"{v:2d}" for v in row) + "\n")  # "-1  1 -1", as the real file
    with open(folder / "list_eval_partition.txt", "w") as f:
        f.writelines(f"{name} {code}\n" for name, code in zip(names, partition, strict=True))
    return {"root": folder, "names": names, "attrs": attrs, "partition": partition,
            "attribute_names": list(CELEBA_ATTRIBUTES)}


# -- WaterBirds -----------------------------------------------------------------------------------
WATERBIRDS_SPLIT_GROUP_COUNTS = {0: (3, 1, 1, 2), 1: (1, 1, 1, 1), 2: (1, 1, 1, 1)}


def write_fake_waterbirds(root: str | Path, counts: dict = WATERBIRDS_SPLIT_GROUP_COUNTS,
                          size: tuple[int, int] = (12, 10), subfolder: bool = True,
                          seed: int = 0) -> list[dict]:
    """``<root>/waterbirds_v1.0/metadata.csv`` and the images it names (``subfolder=False``: in ``<root>``).

    ``counts[split code][group]`` images per split and group (group = 2 * y + place). Rows are in a
    random order (the splits interleaved, as in the real file). Returns the rows as dicts of ints and
    strings, plus ``group`` and ``color`` (image ``k`` = row ``k`` has ``color(k)``).
    """
    folder = Path(root) / "waterbirds_v1.0" if subfolder else Path(root)
    birds = {0: "094.White_breasted_Nuthatch/White_Breasted_Nuthatch_{:04d}_86.jpg",
             1: "001.Black_footed_Albatross/Black_Footed_Albatross_{:04d}_18.jpg"}
    places = {0: "/b/bamboo_forest/{:08d}.jpg", 1: "/o/ocean/{:08d}.jpg"}
    cells = [(split, g) for split, per_group in counts.items()
             for g, n in enumerate(per_group) for _ in range(n)]
    rows = []
    for k, i in enumerate(np.random.default_rng(seed).permutation(len(cells))):
        split, g = cells[i]
        y, place = g // 2, g % 2
        rows.append({"img_id": k + 1, "img_filename": birds[y].format(k + 1), "y": y, "split": split,
                     "place": place, "place_filename": places[place].format(k + 1), "group": g, "color": k})
        write_image(folder / rows[-1]["img_filename"], k, size)
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["img_id", "img_filename", "y", "split", "place", "place_filename"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return rows


# -- SpuCoAnimals ---------------------------------------------------------------------------------
SPUCO_GROUP_FOLDERS = [  # group order: (label, spurious) pairs of spuco 2.0.3, sorted
    ("spuco_birds", "landbirds", "land"), ("spuco_birds", "landbirds", "water"),
    ("spuco_birds", "waterbirds", "land"), ("spuco_birds", "waterbirds", "water"),
    ("spuco_dogs", "small_dogs", "indoor"), ("spuco_dogs", "small_dogs", "outdoor"),
    ("spuco_dogs", "big_dogs", "indoor"), ("spuco_dogs", "big_dogs", "outdoor"),
]
SPUCO_SPLIT_GROUP_COUNTS = {"train": (2, 1, 1, 2, 2, 1, 1, 2), "val": (1,) * 8, "test": (1,) * 8}


def write_fake_spuco_animals(root: str | Path, counts: dict = SPUCO_SPLIT_GROUP_COUNTS,
                             size: tuple[int, int] = (12, 10)) -> dict:
    """``<root>/spuco_birds/<split>/<class>/<background>/<n>.jpg`` and the same under ``spuco_dogs``.

    ``counts[split][group]`` images per group (group order ``SPUCO_GROUP_FOLDERS``). File names are
    distinct numbers, not in writing order (spuco's mask lookup parses them as ints). Returns, per
    split, a list of (path, label, group, colour index) ordered by group, then file name.
    """
    root, out, k = Path(root), {}, 0
    for split, per_group in counts.items():
        out[split] = []
        for g, (dataset, cls, background) in enumerate(SPUCO_GROUP_FOLDERS):
            folder = root / dataset / split / cls / background
            folder.mkdir(parents=True, exist_ok=True)
            written = []
            for _ in range(per_group[g]):
                written.append((write_image(folder / f"{(37 * k) % 101}.jpg", k, size), g // 2, g, k))
                k += 1
            out[split] += sorted(written, key=lambda t: t[0].name)
    return out
