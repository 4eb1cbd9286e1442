"""CelebA-HQ and BDD100K DataModules on fakes in the real layouts; the released classifier layouts; exported models."""

import pytest
import torch

from equidiff.data.bdd100k import BDD100kDataModule
from equidiff.data.celebahq import CelebAHQDataModule
from equidiff.errors import ConfigError, DataLayoutError
from equidiff.explain.classifiers import DenseNetDecision, load_densenet_decision, load_exported_model
from tests.ace.standins import tiny_densenet_decision, tiny_exported, write_fake_bdd100k, write_fake_celebahq
from tests.data.fakes import CELEBA_ATTRIBUTES, color


def test_celebahq_splits_follow_celeba_and_labels_are_the_attribute(tmp_path):
    fake = write_fake_celebahq(tmp_path, n=7)
    dm = CelebAHQDataModule(str(tmp_path), attribute="Young", image_size=8, batch_size=2)
    for split, code in (("train", 0), ("val", 1), ("test", 2)):
        ds = dm.dataset(split)
        ks = [k for k in range(7) if fake["codes"][k] == code]
        assert len(ds) == len(ks)
        for i, k in enumerate(ks):
            item = ds[i]
            assert item["image"].shape == (3, 8, 8) and item["seed"] == i
            assert item["label"] == int(fake["attrs"][k, CELEBA_ATTRIBUTES.index("Young")] == 1)
            assert torch.equal(item["attrs"], (fake["attrs"][k] == 1).long())
            mean = (item["image"].mean((1, 2)) + 1) * 127.5
            assert torch.allclose(mean, torch.tensor(color(k), dtype=torch.float32), atol=4)


def test_celebahq_bad_layouts(tmp_path):
    with pytest.raises(DataLayoutError, match="CelebAMask-HQ-attribute-anno.txt"):
        CelebAHQDataModule(str(tmp_path))
    write_fake_celebahq(tmp_path, n=3)
    with pytest.raises(ConfigError, match="unknown attribute 'Smile'"):
        CelebAHQDataModule(str(tmp_path), attribute="Smile")
    (tmp_path / "list_eval_partition.txt").write_text("000001.jpg 0\n")
    with pytest.raises(DataLayoutError, match="no CelebA partition"):
        CelebAHQDataModule(str(tmp_path)).dataset("test")


def test_bdd100k_images_are_resized_to_256_by_512_and_unlabelled(tmp_path):
    write_fake_bdd100k(tmp_path, {"val": 2})
    ds = BDD100kDataModule(str(tmp_path)).dataset("val")
    assert len(ds) == 2 and ds[0]["image"].shape == (3, 256, 512) and ds[1]["label"] == -1
    with pytest.raises(DataLayoutError, match="no images"):
        BDD100kDataModule(str(tmp_path)).dataset("train")
    with pytest.raises(DataLayoutError, match="images/100k"):
        BDD100kDataModule(str(tmp_path / "images"))


@pytest.mark.parametrize("layout, num_classes, query", [("dive", 40, 31), ("steex", 3, 1)])
def test_densenet_decision_models_load_in_their_released_layouts(tmp_path, layout, num_classes, query):
    clf = tiny_densenet_decision(str(tmp_path / "clf.pth"), layout=layout, num_classes=num_classes,
                                 query_label=query, image_size=32)
    torch.manual_seed(0)
    ref = DenseNetDecision(num_classes).eval()  # the weights the stand-in saved
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(clf(x), ref(x)[:, query : query + 1])  # [-1, 1] = Normalize(0.5, 0.5) of [0, 1]
    assert clf.num_classes == 1
    with pytest.raises(ConfigError, match="holds"):
        load_densenet_decision(tmp_path / "clf.pth", layout="steex" if layout == "dive" else "dive",
                               num_classes=num_classes, query_label=query)
    with pytest.raises(ConfigError, match="not found"):
        load_densenet_decision(tmp_path / "missing.pth")


def test_exported_models_load_and_missing_ones_say_how_to_export(tmp_path):
    model = tiny_exported(str(tmp_path / "m.pt2"), outputs=5, image_size=16)
    assert model(torch.zeros(3, 3, 16, 16)).shape == (3, 5)
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match="torch.export.save"):
        load_exported_model(tmp_path / "oracle.pt2", "the CelebA attribute oracle (MNAC)")
    (tmp_path / "bad.pt2").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="could not be loaded"):
        load_exported_model(tmp_path / "bad.pt2")
