"""Group-robustness metrics (seed 001, learning from counterfactuals): worst-group accuracy.

Groups are (label x spurious attribute) cells, e.g. WaterBirds' (bird type x place). Conventions
(research notes; anniesch/jtt#2, izmailovpavel/spurious_feature_learning#2):

* ``worst_group_acc``: the lowest accuracy over the groups that have samples (not necessarily the
  smallest group);
* ``avg_acc``: the plain accuracy over all samples;
* ``weighted_acc`` (with ``weights``): the group accuracies averaged with the given proportions, e.g.
  WaterBirds' training group counts [3498, 184, 56, 1057], the "average accuracy" of the literature;
* ``group_acc``: one accuracy per group; an **empty group is NaN** and is left out of the worst group and
  of the weighted average (whose weights are renormalised over the non-empty groups).

The states are per-group sums (correct, total), sum-reduced: exact under DDP with any sharding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from equidiff.errors import ConfigError


def _check_inputs(preds: torch.Tensor, target: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Class indices of ``preds`` (logits [B, K] are arg-maxed); raise on bad shapes or group ids."""
    if preds.ndim == 2:
        preds = preds.argmax(-1)
    if not (preds.shape == target.shape == groups.shape) or preds.ndim != 1:
        raise ConfigError(f"preds, target and groups need one entry per sample (shape [B]); got {tuple(preds.shape)}, "
                          f"{tuple(target.shape)}, {tuple(groups.shape)}")
    if len(groups) and (int(groups.min()) < 0 or int(groups.max()) >= num_groups):
        raise ConfigError(f"group ids must lie in 0..{num_groups - 1}, got ids from {int(groups.min())} to "
                          f"{int(groups.max())}; set num_groups to the dataset's number of groups")
    return preds


def group_counts(preds: torch.Tensor, target: torch.Tensor, groups: torch.Tensor,
                 num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (correct, total) counts, float64 [G] each."""
    preds = _check_inputs(preds, target, groups, num_groups)
    correct = torch.zeros(num_groups, dtype=torch.float64, device=groups.device)
    total = torch.zeros_like(correct)
    correct.index_add_(0, groups.long(), (preds == target).double())
    total.index_add_(0, groups.long(), torch.ones_like(groups, dtype=torch.float64))
    return correct, total


def _normalised_weights(weights: Sequence[float] | None, num_groups: int) -> torch.Tensor | None:
    if weights is None:
        return None
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    if w.shape != (num_groups,) or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"weights need {num_groups} non-negative values with a positive sum (one per group, e.g. "
                          f"training group counts), got {list(weights)}")
    return w / w.sum()


def group_accuracy_summary(correct: torch.Tensor, total: torch.Tensor,
                           weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``worst_group_acc``, ``avg_acc``, ``group_acc`` (NaN for empty groups) and, with weights, ``weighted_acc``."""
    present = total > 0
    group_acc = torch.where(present, correct / total.clamp_min(1), torch.full_like(total, float("nan")))
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=total.device)
    out = {"worst_group_acc": group_acc[present].min() if present.any() else nan,
           "avg_acc": correct.sum() / total.sum() if total.sum() > 0 else nan,
           "group_acc": group_acc}
    if weights is not None:
        w = weights.to(total.device) * present
        out["weighted_acc"] = (w * group_acc.nan_to_num()).sum() / w.sum() if w.sum() > 0 else nan
    return out


def worst_group_accuracy(preds: torch.Tensor, target: torch.Tensor, groups: torch.Tensor, num_groups: int,
                         weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """The functional twin of ``WorstGroupAccuracy`` (one call over all samples)."""
    correct, total = group_counts(preds, target, groups, num_groups)
    return group_accuracy_summary(correct, total, _normalised_weights(weights, num_groups))


class WorstGroupAccuracy(Metric):
    """Worst-group, average, per-group and (optionally) proportion-weighted accuracy (see the module docstring).

    Args:
        num_groups: the number of groups G; ``update`` refuses ids outside 0..G-1.
        weights: optional G proportions (any positive scale) for ``weighted_acc``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_groups: int, weights: Sequence[float] | None = None, **kwargs):
        super().__init__(**kwargs)
        if int(num_groups) < 1:
            raise ConfigError(f"num_groups must be >= 1, got {num_groups}")
        self.num_groups = int(num_groups)
        self.weights = _normalised_weights(weights, self.num_groups)
        self.add_state("correct", torch.zeros(self.num_groups, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(self.num_groups, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, groups: torch.Tensor) -> None:
        correct, total = group_counts(preds, target, groups, self.num_groups)
        self.correct += correct.to(self.correct.device)
        self.total += total.to(self.total.device)

    def compute(self) -> dict[str, torch.Tensor]:
        return group_accuracy_summary(self.correct, self.total, self.weights)
