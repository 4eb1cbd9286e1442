"""(query, seed) pairs for invariant-set sampling: each query gets ``samples_per_query`` seeds.

Item k: query q = k // S (S = samples_per_query), with its own seed = seed + k. The query is an item of
a source DataModule's split (``source`` + ``query_indices``), a given point/image (``points``), or
absent when explicit target values are given (``targets``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from equidiff.data.base import EquidiffDataModule
from equidiff.errors import ConfigError


class QueryDataset(Dataset):
    def __init__(self, queries: list[dict], samples_per_query: int):
        self.queries, self.s = queries, int(samples_per_query)

    def __len__(self) -> int:
        return len(self.queries) * self.s

    def __getitem__(self, k: int) -> dict:
        q = k // self.s
        return {**self.queries[q], "query_index": q, "sample_index": k % self.s}


class QueryDataModule(EquidiffDataModule):
    """Predict-only DataModule of (query, seed) pairs.

    Args:
        source: a DataModule whose ``split`` provides the queries (items' ``query_key``, e.g. ``image``
            or ``x``, and ``label``).
        query_indices: which items of the split are queries (default: the first ``num_queries``).
        points: queries given as values (lists), instead of a source.
        targets: target values L(x*) given directly (one list per query), instead of queries.
        samples_per_query: S, samples drawn for each query (each with its own seed).
    """

    def __init__(self, *, source: EquidiffDataModule | None = None, split: str = "test",
                 query_indices: Sequence[int] | None = None, num_queries: int = 4, points: Sequence | None = None,
                 targets: Sequence | None = None, samples_per_query: int = 8, query_key: str = "image", **kwargs):
        super().__init__(**kwargs)
        given = [a is not None for a in (source, points, targets)]
        if sum(given) != 1:
            raise ConfigError("give exactly one of data.source (a DataModule), data.points or data.targets")
        if samples_per_query < 1:
            raise ConfigError(f"samples_per_query must be >= 1, got {samples_per_query}")
        self.source, self.split, self.query_key = source, split, query_key
        self.query_indices = list(query_indices) if query_indices is not None else None
        self.num_queries, self.points, self.targets = num_queries, points, targets
        self.samples_per_query = int(samples_per_query)
        self.num_classes = getattr(source, "num_classes", None)
        self._queries = self._build()

    def _build(self) -> list[dict]:
        if self.points is not None:
            return [{"query": torch.as_tensor(list(p), dtype=torch.float32), "label": -1} for p in self.points]
        if self.targets is not None:
            return [{"target": torch.as_tensor(list(t) if isinstance(t, Sequence) else [t], dtype=torch.float32),
                     "label": -1} for t in self.targets]
        ds = self.source.dataset(self.split)
        idx = self.query_indices if self.query_indices is not None else list(range(min(self.num_queries, len(ds))))
        if not idx or max(idx) >= len(ds) or min(idx) < 0:
            raise ConfigError(f"query indices {idx[:10]} are outside the {self.split} split of {len(ds)} items")
        out = []
        for i in idx:
            item = ds[i]
            if self.query_key not in item:
                raise ConfigError(f"the source items have no {self.query_key!r} entry (they have {sorted(item)}); "
                                  "set data.query_key")
            out.append({"query": item[self.query_key], "label": int(item.get("label", -1)), "source_index": i})
        return out

    def make_dataset(self, split: str) -> Dataset:
        if split != self.predict_split:
            raise ConfigError("QueryDataModule only provides the predict split (it is for invariant-set sampling)")
        return QueryDataset(self._queries, self.samples_per_query)
