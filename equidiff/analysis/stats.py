"""Per-cell moments as a torchmetrics Metric with sum-reduced states (exact under any sharding).

A "cell" is one point of an analysis grid, e.g. (classifier, timestep) or (classifier, class). Each
sample adds its values (correct in {0, 1}, E(x), E(x, y), ...) to its cell's count, sum and sum of
squares. The states are float64 sums, so sharding the data over processes (or batches) changes
nothing: 0/1 counts are exact, and energies agree to float64 rounding.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


def grid_moments(cells: torch.Tensor, values: torch.Tensor, num_cells: int) -> dict[str, torch.Tensor]:
    """Functional twin of ``GridMoments``: count, mean and std (unbiased) of ``values`` per cell.

    Args:
        cells: int [N], the cell of each sample, in 0..num_cells-1.
        values: [N, V] (or [N]), the per-sample values.
    Returns:
        ``{"count": [C], "mean": [C, V], "std": [C, V]}`` (float64; NaN where a cell has too few samples).
    """
    m = GridMoments(num_cells, 1 if values.ndim == 1 else values.shape[1])
    m.update(cells, values)
    return m.compute()


class GridMoments(Metric):
    """Count, sum and sum of squares of per-sample values in ``num_cells`` cells (sum-reduced).

    ``update(cells [N], values [N, V])``; ``compute()`` gives ``count`` [C], ``sum`` [C, V], ``mean``
    [C, V] and ``std`` [C, V] (unbiased, n - 1; NaN for a cell with fewer than 2 samples).
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, num_cells: int, num_values: int = 1, **kwargs):
        super().__init__(**kwargs)
        if num_cells < 1 or num_values < 1:
            raise ValueError(f"GridMoments needs num_cells >= 1 and num_values >= 1, got {num_cells}, {num_values}")
        self.num_cells, self.num_values = int(num_cells), int(num_values)
        self.add_state("count", torch.zeros(num_cells, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_cells, num_values, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", torch.zeros(num_cells, num_values, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, cells: torch.Tensor, values: torch.Tensor) -> None:
        cells = torch.as_tensor(cells, device=self.count.device).long().reshape(-1)
        values = values.detach().to(self.total.device, torch.float64)
        values = values.reshape(len(cells), -1)
        if values.shape[1] != self.num_values:
            raise ValueError(f"expected {self.num_values} value(s) per sample, got {values.shape[1]}")
        if cells.numel() and (cells.min() < 0 or cells.max() >= self.num_cells):
            raise ValueError(f"cells must lie in 0..{self.num_cells - 1}, "
                             f"got {cells.min().item()}..{cells.max().item()}")
        self.count.index_add_(0, cells, torch.ones_like(cells, dtype=torch.float64))
        self.total.index_add_(0, cells, values)
        self.total_sq.index_add_(0, cells, values.square())

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.count.unsqueeze(1)
        mean = self.total / n
        var = (self.total_sq - n * mean.square()) / (n - 1)
        std = var.clamp_min(0).sqrt().where(n > 1, torch.full_like(var, float("nan")))
        return {"count": self.count.clone(), "sum": self.total.clone(), "mean": mean, "std": std}
