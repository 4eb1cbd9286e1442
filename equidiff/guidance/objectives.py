"""Guidance objectives: per-sample losses of a classifier read as an energy model (seed 002).

An objective is an ``nn.Module`` called as ``objective(x, labels) -> loss[B]`` (one value per
sample; guidance follows -grad loss). Sums of objectives compose with ``WeightedSum``. The
classifier receives diffusion images in [-1, 1] (its ``Classifier`` wrapper maps the range).

Objectives run inside the sampling loop and read no tensor on the host: the labels are checked once, before
sampling, by ``ClassifierGuidance`` against the classifier's ``num_classes`` (``energies.check_labels``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from equidiff.errors import ConfigError
from equidiff.guidance.energies import joint_energy, log_p_y_given_x, marginal_energy


class _ClassifierObjective(nn.Module):
    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)  # gradients w.r.t. x only

    @property
    def num_classes(self) -> int | None:
        return getattr(self.classifier, "num_classes", None)


class NegLogLikelihood(_ClassifierObjective):
    """-log p(y | x): guidance by the classifier score grad log p(y | x_t) (Algorithm 6)."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return -log_p_y_given_x(self.classifier(x), labels, check=False)


class JointEnergy(_ClassifierObjective):
    """E(x, y) = -f(x)[y]: class-conditional energy only (section 4.6)."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return joint_energy(self.classifier(x), labels, check=False)


class DualEnergy(_ClassifierObjective):
    """L = E(x, y) + lambda * |Ebar_y - E(x)| (eqs. 4.5-4.6).

    Ebar_y is the mean E(x) over the training images of class y, computed once by
    ``equidiff predict experiment=robust_energy/analysis_class_energy_stats`` and cached; give
    the cached JSON file (``class_means_path``) or the values (``class_means``).
    """

    def __init__(self, classifier: nn.Module, lam: float = 0.15, class_means: Sequence[float] | None = None,
                 class_means_path: str | None = None):
        super().__init__(classifier)
        if (class_means is None) == (class_means_path is None):
            raise ConfigError("DualEnergy needs exactly one of class_means (values) or class_means_path (the JSON "
                              "written by the class-wise energy statistics command)")
        if lam < 0:
            raise ConfigError(f"DualEnergy: lambda must be >= 0, got {lam}")
        if class_means_path is not None:
            from equidiff.analysis.energy_stats import load_class_energy_means

            class_means = load_class_energy_means(class_means_path, self.num_classes)
        means = torch.as_tensor(list(class_means), dtype=torch.float32)
        if self.num_classes is not None and len(means) != self.num_classes:
            raise ConfigError(f"DualEnergy: {len(means)} class means for a classifier of {self.num_classes} classes")
        self.lam = float(lam)
        self.register_buffer("class_means", means)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(x)
        e_xy = joint_energy(logits, labels, check=False)
        delta = (self.class_means[labels.long()] - marginal_energy(logits)).abs()  # Delta E(x), eq. 4.5
        return e_xy + self.lam * delta


class WeightedSum(nn.Module):
    """sum_i w_i * objective_i(x, labels): objectives compose per sample."""

    def __init__(self, terms: Mapping[str, nn.Module] | Sequence[nn.Module], weights: Mapping[str, float] | Sequence[
            float] | None = None):
        super().__init__()
        if isinstance(terms, Mapping):
            names = list(terms)
            self.terms = nn.ModuleList([terms[n] for n in names])
            weights = [1.0] * len(names) if weights is None else [float(weights[n]) for n in names]
        else:
            self.terms = nn.ModuleList(list(terms))
            weights = [1.0] * len(self.terms) if weights is None else [float(w) for w in weights]
        if len(weights) != len(self.terms) or not self.terms:
            raise ConfigError("WeightedSum needs one weight per objective and at least one objective")
        self.weights = weights

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sum(w * obj(x, labels) for w, obj in zip(self.weights, self.terms, strict=True))
