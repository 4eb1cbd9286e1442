"""The folder DataModules read tiny fakes in each dataset's real on-disk format (tests/data/fakes.py)."""

import os
import pickle
import shutil

import pytest
import torch

from equidiff.data import (
    CelebADataModule,
    CIFAR10DataModule,
    ImageNetDataModule,
    SpuCoAnimalsDataModule,
    WaterBirdsDataModule,
)
from equidiff.errors import ConfigError, DataLayoutError
from equidiff.utils.images import to_uint8
from tests.data.fakes import (
    color,
    write_fake_celeba,
    write_fake_cifar10,
    write_fake_imagenet,
    write_fake_spuco_animals,
    write_fake_waterbirds,
)

SPLITS = ("train", "val", "test")


def check_image(image: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert image.dtype == torch.float32 and tuple(image.shape) == shape
    assert image.min() >= -1 and image.max() <= 1


def assert_color(image: torch.Tensor, k: int, tol: float = 4.0) -> None:
    """``image`` (CHW in [-1, 1]) is the solid ``color(k)`` the fake wrote, within ``tol`` levels (JPEG)."""
    mean = (image.mean(dim=(1, 2)) + 1) * 127.5
    assert (mean - torch.tensor(color(k), dtype=torch.float32)).abs().max() <= tol, (mean, color(k))


# -- every DataModule: items, loaders, predict -----------------------------------------------------
def build(name: str, root, **kwargs):
    """A fake of dataset ``name`` under ``root`` and its DataModule at image size 8."""
    if name == "cifar10":
        write_fake_cifar10(root)
        return CIFAR10DataModule(str(root), image_size=8, val_size=5, **kwargs)
    if name == "imagenet":
        write_fake_imagenet(root)
        return ImageNetDataModule(str(root), image_size=8, **kwargs)
    if name == "celeba":
        write_fake_celeba(root)
        return CelebADataModule(str(root), image_size=8, **kwargs)
    if name == "waterbirds":
        write_fake_waterbirds(root)
        return WaterBirdsDataModule(str(root), image_size=8, **kwargs)
    write_fake_spuco_animals(root)
    return SpuCoAnimalsDataModule(str(root), image_size=8, check_counts=False, **kwargs)


EXTRA_KEYS = {"cifar10": set(), "imagenet": set(), "celeba": {"attrs"}, "waterbirds": {"group"},
              "spuco": {"group"}}
NAMES = list(EXTRA_KEYS)


@pytest.mark.parametrize("name", NAMES)
def test_loaders_yield_batches_with_index_and_seed(name, tmp_path):
    dm = build(name, tmp_path, batch_size=4, seed=100)
    dm.setup("fit")
    for split, loader in zip(SPLITS, (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()),
                             strict=True):
        batch = next(iter(loader))
        assert set(batch) == {"image", "label", "index", "seed"} | EXTRA_KEYS[name]
        b = min(4, len(dm.dataset(split)))
        check_image(batch["image"][0], (3, 8, 8))
        assert batch["image"].shape[0] == b and batch["label"].dtype == torch.int64
        assert torch.equal(batch["seed"], batch["index"] + 100)
        assert int(batch["label"].min()) >= 0 and int(batch["label"].max()) < dm.num_classes
    # predict runs over the whole test split, in order, seed = seed + index
    batches = list(dm.predict_dataloader())
    index = torch.cat([b["index"] for b in batches])
    assert torch.equal(index, torch.arange(len(dm.dataset("test"))))
    assert torch.equal(torch.cat([b["seed"] for b in batches]), index + 100)
    assert dm.predict_seeds() == list(range(100, 100 + len(index)))


@pytest.mark.parametrize("name", NAMES)
def test_missing_root_is_a_layout_error(name, tmp_path):
    cls = {"cifar10": CIFAR10DataModule, "imagenet": ImageNetDataModule, "celeba": CelebADataModule,
           "waterbirds": WaterBirdsDataModule, "spuco": SpuCoAnimalsDataModule}[name]
    with pytest.raises(DataLayoutError, match="not a directory") as err:
        cls(str(tmp_path / "nowhere"))
    assert "nowhere" in str(err.value) and "Expected" in str(err.value)


# -- CIFAR-10 --------------------------------------------------------------------------------------
def test_cifar10_splits_labels_and_pixels_round_trip(tmp_path):
    w = write_fake_cifar10(tmp_path, n_train=20, n_test=6)
    dm = CIFAR10DataModule(str(tmp_path), val_size=5)
    assert dm.num_classes == 10 and dm.class_names == w["label_names"]
    expected = {"train": (w["train_data"][:15], w["train_labels"][:15]),  # val = the last val_size
                "val": (w["train_data"][15:], w["train_labels"][15:]),
                "test": (w["test_data"], w["test_labels"])}
    for split, (data, labels) in expected.items():
        ds = dm.dataset(split)
        assert len(ds) == len(labels)
        for i in range(len(ds)):
            item = ds[i]
            assert set(item) == {"image", "label", "index", "seed"} and item["index"] == i
            check_image(item["image"], (3, 32, 32))
            assert item["label"] == labels[i]
            written = torch.from_numpy(data[i].reshape(3, 32, 32))
            assert torch.equal(to_uint8(item["image"][None])[0], written)


def test_cifar10_resize_and_val_size_zero(tmp_path):
    write_fake_cifar10(tmp_path, n_train=10, n_test=2)
    dm = CIFAR10DataModule(str(tmp_path), image_size=16, val_size=0)
    assert len(dm.dataset("train")) == 10 and len(dm.dataset("val")) == 0
    check_image(dm.dataset("test")[0]["image"], (3, 16, 16))


def test_cifar10_missing_batch(tmp_path):
    write_fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataLayoutError, match="test_batch") as err:
        CIFAR10DataModule(str(tmp_path))
    assert "cs.toronto.edu" in str(err.value) and "extract" in str(err.value)


def test_cifar10_val_size_too_large(tmp_path):
    write_fake_cifar10(tmp_path, n_train=10)
    with pytest.raises(ConfigError, match="val_size"):
        CIFAR10DataModule(str(tmp_path), val_size=10).dataset("train")


class _RunsACommand:
    """Unpickling this calls ``os.system`` (what a plain pickle.load of a hostile file does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar10_refuses_a_pickle_that_names_other_globals(tmp_path):
    write_fake_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(_RunsACommand(marker)))
    dm = CIFAR10DataModule(str(tmp_path), val_size=5)
    with pytest.raises(DataLayoutError, match="refusing") as err:
        dm.dataset("train")
    assert "system" in str(err.value) and "data_batch_3" in str(err.value)
    assert not marker.exists()


def test_cifar10_garbage_file(tmp_path):
    write_fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataLayoutError, match="could not read"):
        CIFAR10DataModule(str(tmp_path)).dataset("test")


# -- ImageNet --------------------------------------------------------------------------------------
ZEBRA, SORREL = "n02391049", "n02389026"  # ImageNet-1k classes 340 and 339 (the seed's ACE pair)


def test_ilsvrc2012_wnids_are_the_imagenet_class_order():
    """Independent of the list's source: sorted, 1000 distinct wnids, and torchvision's Imagenette wnids sit at
    the indices of their names in torchvision's ImageNet-1k categories."""
    import torchvision
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    from equidiff.data.imagenet_wnids import ILSVRC2012_WNIDS

    assert len(set(ILSVRC2012_WNIDS)) == 1000 and list(ILSVRC2012_WNIDS) == sorted(ILSVRC2012_WNIDS)
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in ILSVRC2012_WNIDS)
    for wnid, names in torchvision.datasets.Imagenette._WNID_TO_CLASS.items():
        assert ILSVRC2012_WNIDS.index(wnid) == _IMAGENET_CATEGORIES.index(names[0]), (wnid, names)
    assert _IMAGENET_CATEGORIES[ILSVRC2012_WNIDS.index(ZEBRA)] == "zebra" == _IMAGENET_CATEGORIES[340]
    assert _IMAGENET_CATEGORIES[ILSVRC2012_WNIDS.index(SORREL)] == "sorrel"


def test_imagenet_class_folders_in_sorted_wnid_order(tmp_path):
    w = write_fake_imagenet(tmp_path, n_train=2, n_val=1)  # ImageNet-1k classes 0, 1, 2
    for label_map, num_classes in (("auto", 1000), ("ilsvrc2012", 1000), ("folders", 3)):
        dm = ImageNetDataModule(str(tmp_path), image_size=8, label_map=label_map)
        assert dm.num_classes == num_classes and dm.wnids[:3] == w["wnids"] == sorted(w["wnids"])
        for split, folder in (("train", "train"), ("val", "val"), ("test", "val")):  # test = val
            ds = dm.dataset(split)
            assert len(ds) == len(w[folder])
            for i, (_, label, k) in enumerate(w[folder]):
                item = ds[i]
                check_image(item["image"], (3, 8, 8))
                assert item["label"] == label
                assert_color(item["image"], k)


def test_imagenet_val_with_some_class_folders_keeps_imagenet_labels(tmp_path):
    """A val/ holding only some classes (here zebra and sorrel) keeps their ImageNet-1k labels, 340 and 339,
    never 0..k-1: a 1000-class classifier reads them right."""
    write_fake_imagenet(tmp_path, wnids=(ZEBRA, SORREL), n_train=0, n_val=2)
    dm = ImageNetDataModule(str(tmp_path), image_size=8)
    assert dm.label_map == "ilsvrc2012" and dm.num_classes == 1000
    assert [dm.dataset("test")[i]["label"] for i in range(4)] == [339, 339, 340, 340]  # sorted: sorrel first
    only = ImageNetDataModule(str(tmp_path), image_size=8, classes=[ZEBRA]).dataset("val")
    assert [only[i]["label"] for i in range(len(only))] == [340, 340]
    # a train/ with other classes does not change them
    write_fake_imagenet(tmp_path, n_train=1, n_val=0)
    dm = ImageNetDataModule(str(tmp_path), image_size=8)
    assert [dm.dataset("val")[i]["label"] for i in range(4)] == [339, 339, 340, 340]
    assert sorted({dm.dataset("train")[i]["label"] for i in range(3)}) == [0, 1, 2]
    # labels by folder position only when asked for (a custom class set), where train/ and val/ must agree
    with pytest.raises(DataLayoutError, match="different class folders"):
        ImageNetDataModule(str(tmp_path), label_map="folders")
    shutil.rmtree(tmp_path / "train")
    dm = ImageNetDataModule(str(tmp_path), image_size=8, label_map="folders")
    assert dm.num_classes == 2 and [dm.dataset("val")[i]["label"] for i in range(4)] == [0, 0, 1, 1]


def test_imagenet_folders_that_are_not_wnids(tmp_path):
    write_fake_imagenet(tmp_path, wnids=(ZEBRA, "zebra_extra"), n_train=0, n_val=1)
    with pytest.raises(DataLayoutError, match=r"not ILSVRC-2012 wnids \(e.g. \['zebra_extra'\]\)") as err:
        ImageNetDataModule(str(tmp_path))
    assert "Remove them" in str(err.value) and "data.label_map=folders" in str(err.value)
    dm = ImageNetDataModule(str(tmp_path), image_size=8, label_map="folders")  # the custom reading, on request
    assert dm.num_classes == 2
    custom = tmp_path / "custom"
    write_fake_imagenet(custom, wnids=("cat", "dog"), n_train=1, n_val=1)  # a custom set: auto reads folders
    dm = ImageNetDataModule(str(custom), image_size=8)
    assert dm.label_map == "folders" and dm.num_classes == 2 and dm.wnids == ["cat", "dog"]
    with pytest.raises(ConfigError, match="label_map must be one of"):
        ImageNetDataModule(str(custom), label_map="wnid")


def test_imagenet_classes_subset_keeps_the_full_indices(tmp_path):
    w = write_fake_imagenet(tmp_path)
    dm = ImageNetDataModule(str(tmp_path), image_size=8, classes=[w["wnids"][2]], label_map="folders")
    assert dm.num_classes == 3
    ds = dm.dataset("train")
    assert len(ds) == 2 and [ds[i]["label"] for i in range(2)] == [2, 2]
    with pytest.raises(ConfigError, match="n99999999"):
        ImageNetDataModule(str(tmp_path), classes=["n99999999"])
    shutil.rmtree(tmp_path / "val" / w["wnids"][2])
    with pytest.raises(DataLayoutError, match=f"{w['wnids'][2]}.*val"):  # in train/ only
        ImageNetDataModule(str(tmp_path), classes=[w["wnids"][2]]).dataset("val")


def test_imagenet_val_only_root(tmp_path):
    write_fake_imagenet(tmp_path)
    shutil.rmtree(tmp_path / "train")
    dm = ImageNetDataModule(str(tmp_path), image_size=8)
    assert dm.num_classes == 1000 and len(dm.dataset("test")) == 3
    with pytest.raises(DataLayoutError, match="train"):
        dm.dataset("train")


def test_imagenet_gse_indices_and_square_resize(tmp_path):
    # GSE's evaluation: the val images listed in a comma-separated indices file, in its order, resized to a square
    w = write_fake_imagenet(tmp_path, n_val=2, size=(12, 6))
    (tmp_path / "idx.txt").write_text("4, 0, 3")
    dm = ImageNetDataModule(str(tmp_path), image_size=8, square_resize=True, indices_path=str(tmp_path / "idx.txt"))
    val, train = dm.dataset("val"), dm.dataset("train")
    assert len(val) == 3 and len(train) == len(w["train"])  # the training split is not subset
    for i, j in enumerate([4, 0, 3]):
        item = val[i]
        check_image(item["image"], (3, 8, 8))  # squashed from 12 x 6, nothing cropped
        assert item["label"] == w["val"][j][1] and item["index"] == i and item["seed"] == i
        assert_color(item["image"], w["val"][j][2])
    check_image(ImageNetDataModule(str(tmp_path), image_size=8).dataset("val")[0]["image"], (3, 8, 8))
    (tmp_path / "big.txt").write_text("1, 6")
    with pytest.raises(DataLayoutError, match="names image 6"):
        ImageNetDataModule(str(tmp_path), image_size=8, indices_path=str(tmp_path / "big.txt")).dataset("val")
    with pytest.raises(DataLayoutError, match="random_10k_indices"):
        ImageNetDataModule(str(tmp_path), indices_path=str(tmp_path / "missing.txt"))
    (tmp_path / "bad.txt").write_text("1, x")
    with pytest.raises(DataLayoutError, match="integers"):
        ImageNetDataModule(str(tmp_path), indices_path=str(tmp_path / "bad.txt"))


def test_imagenet_unsorted_val_folder(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    with pytest.raises(DataLayoutError, match="no class folders") as err:
        ImageNetDataModule(str(tmp_path))
    assert "valprep" in str(err.value)


# -- CelebA ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("subfolder", [False, True])
def test_celeba_attributes_partition_and_images(tmp_path, subfolder):
    w = write_fake_celeba(tmp_path, n_train=4, n_val=2, n_test=3, size=(10, 12), subfolder=subfolder)
    dm = CelebADataModule(str(tmp_path), image_size=None)  # root may hold celeba/ (torchvision's layout)
    assert dm.num_classes == 2 and dm.attribute_names == w["attribute_names"]
    assert len(dm.attribute_names) == 40
    smiling = w["attribute_names"].index("Smiling")
    for code, split in enumerate(SPLITS):
        ks = [k for k, c in enumerate(w["partition"]) if c == code]
        ds = dm.dataset(split)
        assert len(ds) == len(ks)
        for i, k in enumerate(ks):
            item = ds[i]
            assert set(item) == {"image", "label", "attrs", "index", "seed"}
            check_image(item["image"], (3, 12, 10))
            assert_color(item["image"], k)
            assert torch.equal(item["attrs"], torch.from_numpy((w["attrs"][k] + 1) // 2))
            assert item["label"] == (w["attrs"][k, smiling] + 1) // 2


def test_celeba_other_attribute_and_default_size(tmp_path):
    w = write_fake_celeba(tmp_path)
    dm = CelebADataModule(str(tmp_path), attribute="Male")
    male = w["attribute_names"].index("Male")
    k = w["partition"].index(2)
    item = dm.dataset("test")[0]
    check_image(item["image"], (3, 128, 128))
    assert item["label"] == (w["attrs"][k, male] + 1) // 2


def test_celeba_unknown_attribute_lists_the_valid_names(tmp_path):
    write_fake_celeba(tmp_path)
    with pytest.raises(ConfigError, match="Smilling") as err:
        CelebADataModule(str(tmp_path), attribute="Smilling")
    assert "Smiling" in str(err.value) and "Young" in str(err.value) and "5_o_Clock_Shadow" in str(err.value)


def test_celeba_missing_partition_file(tmp_path):
    write_fake_celeba(tmp_path)
    (tmp_path / "list_eval_partition.txt").unlink()
    with pytest.raises(DataLayoutError, match="list_eval_partition.txt") as err:
        CelebADataModule(str(tmp_path))
    assert "mmlab" in str(err.value)


# -- WaterBirds ------------------------------------------------------------------------------------
@pytest.mark.parametrize("inner", [False, True])
def test_waterbirds_labels_groups_and_order(tmp_path, inner):
    rows = write_fake_waterbirds(tmp_path, size=(12, 10))
    root = tmp_path / "waterbirds_v1.0" if inner else tmp_path
    dm = WaterBirdsDataModule(str(root), image_size=None)
    assert (dm.num_classes, dm.num_groups, len(dm.group_names)) == (2, 4, 4)
    for code, split in enumerate(SPLITS):
        expected = [row for row in rows if row["split"] == code]
        ds = dm.dataset(split)
        assert len(ds) == len(expected)
        for i, row in enumerate(expected):
            item = ds[i]
            assert set(item) == {"image", "label", "group", "index", "seed"}
            check_image(item["image"], (3, 10, 12))
            assert (item["label"], item["group"]) == (row["y"], 2 * row["y"] + row["place"])
            assert_color(item["image"], row["color"])
    assert dm.train_group_counts().tolist() == [3, 1, 1, 2]


def test_waterbirds_default_size(tmp_path):
    write_fake_waterbirds(tmp_path)
    check_image(WaterBirdsDataModule(str(tmp_path)).dataset("test")[0]["image"], (3, 224, 224))
    check_image(WaterBirdsDataModule(str(tmp_path), square_resize=False).dataset("test")[0]["image"],
                (3, 224, 224))


def test_waterbirds_missing_metadata_or_column(tmp_path):
    write_fake_waterbirds(tmp_path)
    metadata = tmp_path / "waterbirds_v1.0" / "metadata.csv"
    text = metadata.read_text()
    metadata.write_text(text.replace("place,", "background,", 1))
    with pytest.raises(DataLayoutError, match="place"):
        WaterBirdsDataModule(str(tmp_path)).dataset("train")
    metadata.unlink()
    with pytest.raises(DataLayoutError, match="metadata.csv") as err:
        WaterBirdsDataModule(str(tmp_path))
    assert "wilds.stanford.edu" in str(err.value)


# -- SpuCoAnimals ----------------------------------------------------------------------------------
def test_spuco_animals_labels_groups_and_order(tmp_path):
    w = write_fake_spuco_animals(tmp_path, size=(12, 10))
    dm = SpuCoAnimalsDataModule(str(tmp_path), image_size=None, check_counts=False)
    assert (dm.num_classes, dm.num_groups) == (4, 8)
    assert dm.class_names == ["landbird", "waterbird", "small_dog", "big_dog"]
    assert dm.group_names[3] == "waterbird_water" and dm.group_names[5] == "small_dog_outdoor"
    for split in SPLITS:
        ds = dm.dataset(split)
        assert len(ds) == len(w[split])
        for i, (_, label, group, k) in enumerate(w[split]):
            item = ds[i]
            assert set(item) == {"image", "label", "group", "index", "seed"}
            check_image(item["image"], (3, 10, 12))
            assert (item["label"], item["group"]) == (label, group)
            assert_color(item["image"], k)
    assert dm.train_group_counts().tolist() == [2, 1, 1, 2, 2, 1, 1, 2]
    check_image(SpuCoAnimalsDataModule(str(tmp_path), check_counts=False).dataset("val")[0]["image"], (3, 224, 224))


# spuco 2.0.3 (spuco_birds.py / spuco_dogs.py): MAJORITY_SIZE / MINORITY_SIZE per split; the majority folders
# are landbirds/land, waterbirds/water, small_dogs/indoor, big_dogs/outdoor
SPUCO_SIZES = {"train": (10000, 500), "val": (500, 25), "test": (500, 500)}
SPUCO_MAJORITY = ("landbirds/land", "waterbirds/water", "small_dogs/indoor", "big_dogs/outdoor")


def spuco_folders(root, split):
    return [root / d / split / c / b for d, c, b in
            [("spuco_birds", c, b) for c in ("landbirds", "waterbirds") for b in ("land", "water")]
            + [("spuco_dogs", c, b) for c in ("small_dogs", "big_dogs") for b in ("indoor", "outdoor")]]


def test_spuco_animals_folder_sizes_are_checked_as_spuco_does(tmp_path):
    write_fake_spuco_animals(tmp_path)  # 1-2 images per folder
    dm = SpuCoAnimalsDataModule(str(tmp_path), image_size=8)
    with pytest.raises(DataLayoutError, match=r"landbirds/land' holds 2 images; spuco 2.0.3 has 10000 there") as err:
        dm.dataset("train")
    assert "Re-extract" in str(err.value) and "data.check_counts=false" in str(err.value)
    with pytest.raises(DataLayoutError, match="holds 2 images"):
        dm.train_group_counts()
    # the val split at spuco's sizes (empty files: the sizes are checked before any image is opened)
    for folder in spuco_folders(tmp_path, "val"):
        for f in folder.iterdir():
            f.unlink()
        major, minor = SPUCO_SIZES["val"]
        n = major if "/".join(folder.parts[-2:]) in SPUCO_MAJORITY else minor
        for i in range(n):
            (folder / f"{i}.jpg").touch()
    ds = dm.dataset("val")
    assert len(ds) == 4 * 500 + 4 * 25
    (spuco_folders(tmp_path, "val")[1] / "7.jpg").unlink()  # landbirds/water: 24 of 25
    with pytest.raises(DataLayoutError, match=r"landbirds/water' holds 24 images; spuco 2.0.3 has 25 there"):
        SpuCoAnimalsDataModule(str(tmp_path), image_size=8).dataset("val")


@pytest.mark.parametrize("check_counts", [True, False])
def test_spuco_animals_entries_that_are_not_images_are_errors(tmp_path, check_counts):
    """spuco counts every entry of a folder: a stray file fails its size check; here it is named, never skipped."""
    write_fake_spuco_animals(tmp_path)
    folder = tmp_path / "spuco_dogs" / "test" / "small_dogs" / "indoor"
    (folder / "notes.txt").write_text("x")
    (folder / "3.jpeg.part").write_bytes(b"")
    dm = SpuCoAnimalsDataModule(str(tmp_path), image_size=8, check_counts=check_counts)
    with pytest.raises(DataLayoutError, match=r"small_dogs/indoor' holds 2 entries that are not an image file "
                                              r"\(3\.jpeg\.part, notes\.txt;") as err:
        dm.dataset("test")
    assert "move them out of the dataset folder" in str(err.value)


def test_spuco_animals_missing_folder(tmp_path):
    write_fake_spuco_animals(tmp_path)
    shutil.rmtree(tmp_path / "spuco_dogs" / "test" / "big_dogs" / "outdoor")
    with pytest.raises(DataLayoutError, match="spuco_dogs/test/big_dogs/outdoor") as err:
        SpuCoAnimalsDataModule(str(tmp_path))
    assert "spuco_birds" in str(err.value) and "extract" in str(err.value)
