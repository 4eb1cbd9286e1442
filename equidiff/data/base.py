"""The DataModule base every equidiff dataset uses.

Items are dicts. Image datasets yield ``{"image": float CHW in [-1, 1], "label": int, ...}``
(plus ``"group"`` where the dataset has groups); the base adds ``"index"`` (position in the
split) and ``"seed"`` (= ``seed + index``), so predict-time randomness is per sample and
generation/explanation is a predict over seeds. The [-1, 1] range is the diffusion convention;
classifier adapters map it to each classifier's own range.

Resume: the sample writer tells the DataModule which seeds are already on disk
(``skip_seeds``); the predict dataloader leaves them out. Because every sample's randomness
comes from its own seed, leaving samples out changes no other sample.

Predict under DDP: the items still to do are sharded like val/test (rank r takes the r-th, the
(r + world)-th, ...). A process left without an item (fewer items to do than processes: a small N,
or the last samples of a resumed run) would skip Lightning's whole predict loop, epoch-end hooks
and their collectives included, and the others would wait for it; it runs item 0 instead, and
``predict_padding`` tells the callbacks (writer, metrics) to ignore what it predicts.

Exact evaluation under DDP: Lightning's validate/test loops would inject a padding
``DistributedSampler`` (samples repeated so that every rank gets as many), which counts some
samples twice. Under DDP the val/test loaders here carry their own ``ShardSampler`` (rank r
takes items r, r + world, ...; nothing repeated, a rank may get one item fewer), and Lightning
keeps a sampler that is already a ``DistributedSampler``. Metrics then need sum-reduced states
(torchmetrics) and no per-step ``self.log(..., sync_dist=True)``, which would wait for a batch
that a shorter rank never runs. Training keeps Lightning's shuffling ``DistributedSampler``
and predict its unrepeated sampler.
"""

from __future__ import annotations

from collections.abc import Iterable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from equidiff.errors import ConfigError

SPLITS = ("train", "val", "test")


class WithIndexAndSeed(Dataset):
    """Adds ``index`` and ``seed = seed + index`` to every item of a dict-returning dataset."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.dataset[i])
        item.setdefault("index", i)
        item.setdefault("seed", self.seed + i)
        return item


class ShardSampler(DistributedSampler):
    """Items ``rank, rank + world, ...`` of a dataset, in order, none repeated (exact evaluation under DDP).

    A ``DistributedSampler`` subclass so that Lightning keeps it instead of injecting its padding one.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class IndexSampler(DistributedSampler):
    """Exactly ``indices`` of a dataset, in order: this process's share, chosen by the DataModule.

    A ``DistributedSampler`` subclass so that Lightning keeps it instead of sharding the items again.
    """

    def __init__(self, dataset: Dataset, indices: list[int], num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.indices = list(indices)
        self.num_samples = len(self.indices)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples


class EquidiffDataModule(L.LightningDataModule):
    """Base DataModule: subclasses implement ``make_dataset(split)`` (and may set ``num_classes``).

    Args:
        batch_size: batch size of every dataloader (per process).
        num_workers: DataLoader workers.
        seed: base seed; item ``i`` of a split carries seed ``seed + i``.
        predict_split: which split ``predict`` iterates over (counterfactuals, explanations).
        shuffle_train: shuffle the training split.
    """

    num_classes: int | None = None

    def __init__(self, *, batch_size: int = 64, num_workers: int = 0, seed: int = 0,
                 predict_split: str = "test", shuffle_train: bool = True, pin_memory: bool = False):
        super().__init__()
        if predict_split not in SPLITS:
            raise ValueError(f"predict_split must be one of {SPLITS}, got {predict_split!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.num_workers, self.seed = int(batch_size), int(num_workers), int(seed)
        self.predict_split, self.shuffle_train, self.pin_memory = predict_split, shuffle_train, pin_memory
        self.skip_seeds: set[int] = set()
        self.predict_padding = False  # this process has no predict item of its own (see the module docstring)
        self._datasets: dict[str, Dataset] = {}

    # -- subclasses --------------------------------------------------------------------
    def make_dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    # -- datasets ----------------------------------------------------------------------
    def dataset(self, split: str) -> Dataset:
        """The split's dataset with ``index`` and ``seed`` added (built once, cached)."""
        if split not in self._datasets:
            self._datasets[split] = WithIndexAndSeed(self.make_dataset(split), self.seed)
        return self._datasets[split]

    def predict_seeds(self) -> list[int]:
        """Every seed a full predict run produces (the writer checks the merged set against it)."""
        n = len(self.dataset(self.predict_split))
        return list(range(self.seed, self.seed + n))

    def set_skip_seeds(self, seeds: Iterable[int]) -> None:
        self.skip_seeds = {int(s) for s in seeds}

    # -- loaders -----------------------------------------------------------------------
    def _loader(self, ds: Dataset, shuffle: bool = False, generator=None, sampler=None) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
                          generator=generator, sampler=sampler)

    def _eval_loader(self, split: str) -> DataLoader:
        """The split in order; under DDP an unpadded shard per rank (``ShardSampler``)."""
        ds = self.dataset(split)
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        if world == 1:
            return self._loader(ds)
        if len(ds) < world:
            raise ConfigError(f"the {split} split has {len(ds)} item(s), fewer than the {world} processes; "
                              f"run on fewer devices (trainer.devices=...)")
        return self._loader(ds, sampler=ShardSampler(ds, num_replicas=world, rank=trainer.global_rank))

    def train_dataloader(self):
        g = torch.Generator().manual_seed(self.seed) if self.shuffle_train else None
        return self._loader(self.dataset("train"), shuffle=self.shuffle_train, generator=g)

    def val_dataloader(self):
        return self._eval_loader("val")

    def test_dataloader(self):
        return self._eval_loader("test")

    def predict_dataloader(self):
        """The items whose seed is not in ``skip_seeds``; under DDP this process's shard of them (one padding
        item, ``predict_padding``, when the shard is empty)."""
        ds = self.dataset(self.predict_split)
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        todo = [i for i, s in enumerate(self.predict_seeds()) if s not in self.skip_seeds]
        mine = todo[rank::world]
        self.predict_padding = not mine
        return self._loader(ds, sampler=IndexSampler(ds, mine or [0], num_replicas=world, rank=rank))
