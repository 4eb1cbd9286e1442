"""Projected gradient descent (Madry et al. 2018) through IBM's Adversarial Robustness Toolbox.

equidiff images live in [-1, 1]; attack budgets are given in the literature's unit, pixels in
[0, 1] (so eps = 0.5 for an L2 budget of 0.5 as in the robustness library's tables). The attack
runs on the classifier composed with the [0, 1] -> [-1, 1] map, clipped to [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from equidiff.errors import ConfigError


class _From01(nn.Module):
    """classifier(2 x - 1): the classifier seen from [0, 1] images (what ART attacks)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.classifier(x01 * 2 - 1)


def pgd_attack(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int,
               step_size: float | None = None, norm: str | int | float = 2, targeted: bool = False,
               random_init: bool = False, num_classes: int | None = None, seed: int | None = None) -> torch.Tensor:
    """PGD on images ``x`` in [-1, 1] with labels ``y``; returns the adversarial images in [-1, 1].

    Args:
        eps, step_size: budget and step in [0, 1] pixel units (step_size default 2.5 eps / steps,
            the robustness library's evaluation setting).
        norm: 2, "inf" (or np.inf) or 1.
        targeted: move towards ``y`` instead of away from it.
        random_init: start from a random point of the eps-ball (ART's num_random_init=1).
    """
    from art.attacks.evasion import ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    if eps < 0 or steps < 0:
        raise ConfigError(f"PGD needs eps >= 0 and steps >= 0, got eps={eps}, steps={steps}")
    if eps == 0 or steps == 0:
        return x.detach().clone()
    norm = {"2": 2, "l2": 2, "inf": np.inf, "linf": np.inf, "1": 1, "l1": 1}.get(str(norm).lower(), norm)
    step_size = 2.5 * eps / steps if step_size is None else step_size
    modes = {m: m.training for m in classifier.modules()}  # ART switches the model to eval mode
    model = _From01(classifier)
    k = num_classes or getattr(classifier, "num_classes", None)
    if k is None:
        with torch.no_grad():
            k = classifier(x[:1]).shape[-1]
    device = "gpu" if x.is_cuda else "cpu"
    est = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=int(k),
                            clip_values=(0.0, 1.0), device_type=device)
    attack = ProjectedGradientDescentPyTorch(est, norm=norm, eps=eps, eps_step=step_size, max_iter=steps,
                                             targeted=targeted, num_random_init=int(random_init),
                                             batch_size=x.shape[0], verbose=False)
    if seed is not None:
        np.random.seed(seed)
    x01 = ((x.detach() + 1) / 2).clamp(0, 1).cpu().numpy().astype(np.float32)
    adv = attack.generate(x01, y=y.detach().cpu().numpy())
    for m, training in modes.items():  # restore each submodule's own mode
        m.training = training
    return torch.from_numpy(adv).to(x.device, x.dtype) * 2 - 1
