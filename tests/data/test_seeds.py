"""SeedDataset / SeedDataModule: generation as a predict over seeds."""

import pytest
import torch

from equidiff.data import SeedDataModule, SeedDataset


def test_items_carry_seed_index_and_label():
    ds = SeedDataset(5, seed=100, labels="cycle", num_classes=3)
    assert [ds[i]["seed"] for i in range(5)] == [100, 101, 102, 103, 104]
    assert [ds[i]["label"] for i in range(5)] == [0, 1, 2, 0, 1]
    assert SeedDataset(3, labels=None)[2]["label"] == -1
    assert SeedDataset(3, labels=7)[1]["label"] == 7
    assert [SeedDataset(3, labels=[4, 5])[i]["label"] for i in range(3)] == [4, 5, 4]


def test_random_labels_depend_on_the_seed_only():
    a = SeedDataset(50, seed=0, labels="random", num_classes=10)
    b = SeedDataset(20, seed=30, labels="random", num_classes=10)  # overlaps a on seeds 30..49
    assert [a[30 + i]["label"] for i in range(20)] == [b[i]["label"] for i in range(20)]
    assert len({a[i]["label"] for i in range(50)}) > 5


@pytest.mark.parametrize("kwargs, msg", [
    (dict(num_samples=0), "num_samples"),
    (dict(num_samples=3, labels="cycle"), "num_classes"),
    (dict(num_samples=3, labels="bogus", num_classes=2), "labels must be"),
])
def test_bad_arguments(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SeedDataModule(**kwargs)


def test_predict_loader_skips_finished_seeds_but_feeds_every_process():
    dm = SeedDataModule(6, seed=10, batch_size=4)
    dm.set_skip_seeds({10, 11, 13})
    seeds = torch.cat([b["seed"] for b in dm.predict_dataloader()]).tolist()
    assert seeds == [12, 14, 15]
    dm.set_skip_seeds(set(range(10, 16)))
    assert len(torch.cat([b["seed"] for b in dm.predict_dataloader()])) == 1  # one per process (world 1)
    assert dm.predict_seeds() == list(range(10, 16))
