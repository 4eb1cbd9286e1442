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


def _seeds(loader):
    return torch.cat([b["seed"] for b in loader]).tolist()


def test_predict_loader_skips_finished_seeds_but_feeds_every_process():
    dm = SeedDataModule(6, seed=10, batch_size=4)
    dm.set_skip_seeds({10, 11, 13})
    assert _seeds(dm.predict_dataloader()) == [12, 14, 15] and not dm.predict_padding
    dm.set_skip_seeds(set(range(10, 16)))
    # nothing left: one padding item, or Lightning would skip the epoch-end hooks (merge, metrics)
    assert _seeds(dm.predict_dataloader()) == [10] and dm.predict_padding
    assert dm.predict_seeds() == list(range(10, 16))


def test_predict_shards_under_ddp_and_pads_a_process_without_items():
    from types import SimpleNamespace

    from torch.utils.data import DistributedSampler

    dm = SeedDataModule(7, seed=10, batch_size=2)
    dm.set_skip_seeds({10, 13})
    shards, padding = [], []
    for rank in range(3):
        dm.trainer = SimpleNamespace(world_size=3, global_rank=rank)
        loader = dm.predict_dataloader()
        assert isinstance(loader.sampler, DistributedSampler)  # so Lightning keeps it instead of sharding again
        shards.append(_seeds(loader))
        padding.append(dm.predict_padding)
    assert shards == [[11, 15], [12, 16], [14]] and padding == [False] * 3  # each item to do once
    one = SeedDataModule(1, batch_size=2)  # N = 1 on 2 processes
    one.trainer = SimpleNamespace(world_size=2, global_rank=1)
    assert _seeds(one.predict_dataloader()) == [0] and one.predict_padding  # rank 1 runs item 0, ignored
    one.trainer = SimpleNamespace(world_size=2, global_rank=0)
    assert _seeds(one.predict_dataloader()) == [0] and not one.predict_padding
