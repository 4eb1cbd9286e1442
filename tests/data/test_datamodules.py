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
    return SpuCoAnimalsDataModule(str(root), image_size=8, **kwargs)


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
def test_imagenet_class_folders_in_sorted_wnid_order(tmp_path):
    w = write_fake_imagenet(tmp_path, n_train=2, n_val=1)
    dm = ImageNetDataModule(str(tmp_path), image_size=8)
    assert dm.num_classes == 3 and dm.wnids == w["wnids"] == sorted(w["wnids"])
    for split, folder in (("train", "train"), ("val", "val"), ("test", "val")):  # test = val
        ds = dm.dataset(split)
        assert len(ds) == len(w[folder])
        for i, (_, label, k) in enumerate(w[folder]):
            item = ds[i]
            check_image(item["image"], (3, 8, 8))
            assert item["label"] == label
            assert_color(item["image"], k)


def test_imagenet_default_size_and_native_size(tmp_path):
    write_fake_imagenet(tmp_path, size=(12, 10))
    check_image(ImageNetDataModule(str(tmp_path)).dataset("val")[0]["image"], (3, 256, 256))
    check_image(ImageNetDataModule(str(tmp_path), image_size=None).dataset("val")[0]["image"], (3, 10, 12))


def test_imagenet_classes_subset_keeps_the_full_indices(tmp_path):
    w = write_fake_imagenet(tmp_path)
    dm = ImageNetDataModule(str(tmp_path), image_size=8, classes=[w["wnids"][2]])
    assert dm.num_classes == 3
    ds = dm.dataset("train")
    assert len(ds) == 2 and [ds[i]["label"] for i in range(2)] == [2, 2]
    with pytest.raises(ConfigError, match="n99999999"):
        ImageNetDataModule(str(tmp_path), classes=["n99999999"])


def test_imagenet_val_only_root(tmp_path):
    write_fake_imagenet(tmp_path)
    shutil.rmtree(tmp_path / "train")
    dm = ImageNetDataModule(str(tmp_path), image_size=8)
    assert dm.num_classes == 3 and len(dm.dataset("test")) == 3
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
    dm = SpuCoAnimalsDataModule(str(tmp_path), image_size=None)
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
    check_image(SpuCoAnimalsDataModule(str(tmp_path)).dataset("val")[0]["image"], (3, 224, 224))


def test_spuco_animals_missing_folder(tmp_path):
    write_fake_spuco_animals(tmp_path)
    shutil.rmtree(tmp_path / "spuco_dogs" / "test" / "big_dogs" / "outdoor")
    with pytest.raises(DataLayoutError, match="spuco_dogs/test/big_dogs/outdoor") as err:
        SpuCoAnimalsDataModule(str(tmp_path))
    assert "spuco_birds" in str(err.value) and "extract" in str(err.value)
