"""The training loader (equidiff.data.base.ResumableDataLoader): torch's shuffling order, kept when it resumes."""

import torch
from torch.utils.data import DataLoader

from equidiff.data.base import EquidiffDataModule, ResumableDataLoader

DATA = [{"x": i} for i in range(23)]


def _epochs(loader, n):
    return [[b["x"].tolist() for b in loader] for _ in range(n)]


def _loader(cls=ResumableDataLoader, **kw):
    return cls(DATA, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3), **kw)


def test_the_order_is_torchs_random_sampler_order():
    # the order every existing model was trained with: torch's DataLoader with the same generator
    assert _epochs(_loader(), 3) == _epochs(_loader(DataLoader), 3)


def test_persistent_workers_give_the_same_order():
    # torch draws the workers' base seed only once with persistent workers; here every epoch draws it
    assert _epochs(_loader(num_workers=1, persistent_workers=True), 3) == _epochs(_loader(), 3)


def test_a_loader_resumed_mid_epoch_or_at_an_epoch_boundary_continues_the_stream():
    straight = _epochs(_loader(), 3)

    first = _loader()
    _epochs(first, 1)
    it = iter(first)
    head = [next(it)["x"].tolist() for _ in range(2)]  # epoch 1 stops after 2 batches
    mid = first.state_dict()
    resumed = _loader()
    resumed.load_state_dict(mid)
    assert head + _epochs(resumed, 1)[0] == straight[1]
    assert _epochs(resumed, 1)[0] == straight[2]

    first = _loader()
    _epochs(first, 2)
    boundary = first.state_dict()
    resumed = _loader()
    resumed.start_next_epoch_from(boundary)
    assert _epochs(resumed, 1)[0] == straight[2]
    assert len(resumed) == len(first) == 6  # the skipping wrapper keeps the loader's length


class _Ints(EquidiffDataModule):
    def make_dataset(self, split):
        return DATA


def test_the_datamodule_carries_the_loader_state_through_a_checkpoint():
    dm = _Ints(batch_size=4, seed=3)
    straight = _epochs(dm.train_dataloader(), 3)
    dm = _Ints(batch_size=4, seed=3)
    _epochs(dm.train_dataloader(), 2)
    state = dm.state_dict()
    fresh = _Ints(batch_size=4, seed=3)
    fresh.load_state_dict(state)
    assert _epochs(fresh.train_dataloader(), 1) == straight[2:]
