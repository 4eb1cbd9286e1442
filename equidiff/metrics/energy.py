"""Mean energies of samples under a classifier read as an energy model (seed 002, Figs. 4.9, 4.15)."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import Metric

from equidiff.guidance.energies import joint_energy, marginal_energy


class EnergyStats(Metric):
    """Mean E(x) and E(x, y) of samples (y = each sample's target label), overall and per class.

    Sum-reduced states: exact under DDP. Samples without a label (-1) count for E(x) only.
    ``compute()`` returns ``mean_energy``, ``mean_joint_energy`` and ``class_mean_energy`` (one
    value per class, NaN for a class without samples), to compare with the training-set class
    means of ``analysis_class_energy_stats`` (Fig. 4.15).
    """

    higher_is_better = None
    is_differentiable = False
    full_state_update = False

    def __init__(self, classifier: nn.Module, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        self.classifier, self.num_classes = classifier, int(num_classes)
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.add_state("n", default=z(()), dist_reduce_fx="sum")
        self.add_state("sum_energy", default=z(()), dist_reduce_fx="sum")
        self.add_state("n_labelled", default=z(()), dist_reduce_fx="sum")
        self.add_state("sum_joint", default=z(()), dist_reduce_fx="sum")
        self.add_state("class_n", default=z(self.num_classes), dist_reduce_fx="sum")
        self.add_state("class_sum_energy", default=z(self.num_classes), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        with torch.no_grad():
            logits = self.classifier(images.float())
        e = marginal_energy(logits).double()
        self.n += len(e)
        self.sum_energy += e.sum()
        if labels is not None:
            known = labels >= 0
            if known.any():
                self.n_labelled += known.sum()
                self.sum_joint += joint_energy(logits[known], labels[known]).double().sum()
                self.class_n += torch.bincount(labels[known], minlength=self.num_classes).double()
                self.class_sum_energy.index_add_(0, labels[known], e[known])

    def compute(self) -> dict[str, torch.Tensor]:
        out = {"mean_energy": self.sum_energy / self.n.clamp_min(1)}
        if self.n_labelled > 0:
            out["mean_joint_energy"] = self.sum_joint / self.n_labelled
            out["class_mean_energy"] = self.class_sum_energy / self.class_n  # NaN where no samples
        return out
