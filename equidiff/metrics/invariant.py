"""Metrics of invariant-set sampling (seed 000): means of per-sample quantities, and diversity per query."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from equidiff.metrics.sync import with_empty_rank_sync


class RecordMean(Metric):
    """The mean of a per-sample value (a scalar, or a vector averaged element-wise) over all samples.

    Sum-reduced: exact under DDP. Used for the invariance error |L(x) - L(x*)| (unfiltered and
    filtered), the deviation per low-pass cutoff (frequency analysis), the iterations to converge and the
    convergence rate.
    """

    higher_is_better = None
    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        v = values.double().reshape(len(values), -1).sum(0)
        self.total = self.total + (v if v.numel() > 1 else v[0])  # a vector value broadcasts the 0-d start
        self.n += len(values)

    def compute(self) -> torch.Tensor:
        return self.total / self.n.clamp_min(1)


class Diversity(Metric):
    """Mean pairwise L2 distance between the samples of one query, averaged over queries.

    Images are compared at most ``size`` x ``size`` (area-downsampled) to bound memory; points as they
    are. Samples are gathered with their seeds and sorted, so the value does not depend on sharding (a process
    may have fed nothing).
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(self, size: int = 32, **kwargs):
        super().__init__(**with_empty_rank_sync(kwargs))
        self.size = size
        self.add_state("queries", default=[], dist_reduce_fx="cat")
        self.add_state("seeds", default=[], dist_reduce_fx="cat")
        self.add_state("features", default=[], dist_reduce_fx="cat")

    def update(self, samples: torch.Tensor, query_index: torch.Tensor, seeds: torch.Tensor) -> None:
        x = samples.float()
        if x.ndim == 4 and max(x.shape[-2:]) > self.size:
            x = F.adaptive_avg_pool2d(x, self.size)
        self.features.append(x.flatten(1))
        self.queries.append(query_index.long())
        self.seeds.append(seeds.long())

    def compute(self) -> torch.Tensor:
        feats, queries, seeds = (dim_zero_cat(s) for s in (self.features, self.queries, self.seeds))
        order = seeds.argsort()
        feats, queries = feats[order].double(), queries[order]
        per_query = []
        for q in queries.unique():
            f = feats[queries == q]
            if len(f) > 1:
                d = torch.cdist(f, f)
                per_query.append(d.sum() / (len(f) * (len(f) - 1)))
        return torch.stack(per_query).mean() if per_query else torch.tensor(float("nan"), dtype=torch.float64)
