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
that a shorter rank never runs. Under DDP the training loader carries the shuffling
``DistributedSampler`` Lightning would inject (so Lightning keeps the loader object), and predict
its unrepeated sampler.

Fit resume: the training loader is a ``ResumableDataLoader``. Its place in the shuffling stream is
saved in every checkpoint (the DataModule's ``state_dict``, and Lightning's stateful-loader state
for a checkpoint written mid-epoch), so a resumed fit sees exactly the batches an uninterrupted one
would have seen.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

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


class _SkipFirst:
    """An index (batch) sampler whose next pass leaves out its first ``skip`` entries, without loading them."""

    def __init__(self, sampler):
        self.sampler, self.skip = sampler, 0

    def __iter__(self) -> Iterator:
        it = iter(self.sampler)  # draws this epoch's permutation, as an uninterrupted epoch does
        skip, self.skip = self.skip, 0
        for _ in range(skip):
            next(it, None)
        yield from it

    def __len__(self) -> int:
        return len(self.sampler)


class ResumableDataLoader(DataLoader):
    """The training DataLoader: a torch ``DataLoader`` whose place in its shuffling stream can be saved and restored.

    Why not a library: torch's DataLoader keeps no such state, and torchdata's ``StatefulDataLoader`` (not a
    dependency) shuffles differently from torch's ``RandomSampler``, so every trained model would change.
    This class keeps torch's draws:
    every epoch takes one int64 (the workers' base seed) and then the sampler's permutation from
    ``generator``. With persistent workers torch draws the base seed only for the first epoch; here a
    base seed is drawn (and dropped) on later epochs too, so the order does not depend on ``num_workers``.

    ``state_dict()`` (Lightning's protocol for stateful loaders; Lightning loads it when a fit resumes
    mid-epoch): ``generator`` = the generator's state when the current epoch began, ``batches`` = batches
    handed out in that epoch, ``next_epoch`` = the generator's state now (where the next epoch begins).
    ``load_state_dict`` continues that epoch: the generator goes back to the epoch's start and the first
    ``batches`` batches are left out by index. ``start_next_epoch_from`` is the epoch-boundary resume.
    Exact for worker-free loading (``num_workers=0``) and for workers without randomness of their own: a
    resumed process seeds its workers from the resumed epoch's base seed.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._skipper: _SkipFirst | None = None
        self._epoch_start: torch.Tensor | None = None
        self._skipped = 0
        self._live = None

    @property
    def _index_sampler(self):
        if getattr(self, "_skipper", None) is None:
            self._skipper = _SkipFirst(super()._index_sampler)
        return self._skipper

    def __iter__(self):
        g = self.generator
        self._epoch_start = g.get_state() if g is not None else None
        if g is not None and self.persistent_workers and self.num_workers > 0 and self._iterator is not None:
            torch.empty((), dtype=torch.int64).random_(generator=g)  # the base seed a fresh iterator would draw
        self._skipped = self._index_sampler.skip
        self._live = super().__iter__()
        return self._live

    def state_dict(self) -> dict:
        if self._live is None:
            return {}
        state = {"batches": self._skipped + self._live._num_yielded}
        if self.generator is not None:
            state.update(generator=self._epoch_start, next_epoch=self.generator.get_state())
        return state

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])
        self._index_sampler.skip = int(state["batches"])

    def start_next_epoch_from(self, state: dict) -> None:
        """Resume at an epoch boundary: the next epoch draws from where the saved one's stream stood."""
        if self.generator is not None and state.get("next_epoch") is not None:
            self.generator.set_state(state["next_epoch"])


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
        self._train_loader: ResumableDataLoader | None = None
        self._train_loader_state: dict | None = None

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
        """Shuffled by a generator seeded with ``seed``; under DDP by ``DistributedSampler(seed=seed)``, set to the
        current epoch here (Lightning sets it only after the first batches of a resumed process are drawn)."""
        ds, trainer = self.dataset("train"), self.trainer
        g = torch.Generator().manual_seed(self.seed) if self.shuffle_train else None
        sampler = None
        if trainer is not None and trainer.world_size > 1:
            sampler = DistributedSampler(ds, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                         shuffle=self.shuffle_train, seed=self.seed)
            sampler.set_epoch(trainer.current_epoch)
        loader = ResumableDataLoader(ds, batch_size=self.batch_size, shuffle=self.shuffle_train and sampler is None,
                                     sampler=sampler, num_workers=self.num_workers, pin_memory=self.pin_memory,
                                     persistent_workers=self.num_workers > 0, generator=g)
        if self._train_loader_state:
            # a resumed fit: the next epoch continues the saved stream (Lightning then calls load_state_dict on the
            # loader itself when it resumes in the middle of an epoch)
            loader.start_next_epoch_from(self._train_loader_state)
            self._train_loader_state = None
        self._train_loader = loader
        return loader

    # -- checkpoints: the training loader's place (Lightning saves and restores a DataModule's state) --------
    def state_dict(self) -> dict:
        state = self._train_loader.state_dict() if self._train_loader is not None else {}
        return {"train_loader": state} if state else {}

    def load_state_dict(self, state: dict) -> None:
        self._train_loader_state = state.get("train_loader")

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
