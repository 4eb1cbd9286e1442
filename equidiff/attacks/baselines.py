"""Baselines of seed 001: FGSM (eq. 4), PGD-l2 / PGD-linf (eq. 5, IBM's Adversarial Robustness Toolbox) and
CFE-l2 (Wachter et al. 2017: ||x' - x||^2 + gamma L(f(x'), y~), the S-CFE solver without sparsity or
plausibility).

They share the solvers' signature ``solver(classifier, x, target, *, source, box, generators, **settings)``.
Budgets eps are in units of the box width (for images in [-1, 1]: [0, 1] pixel units, the literature's and
``equidiff.attacks.pgd_attack``'s unit); ``box`` is the actionable set the result is clipped to.
"""

from __future__ import annotations

import torch
from torch import nn

from equidiff.attacks.common import classification_loss, per_sample_grad, resolve_box
from equidiff.attacks.pgd import pgd_attack
from equidiff.attacks.proximal import project_box
from equidiff.attacks.scfe import scfe
from equidiff.attacks.targets import check_targets
from equidiff.errors import ConfigError


def fgsm(classifier, x: torch.Tensor, target: torch.Tensor, *, source: torch.Tensor | None = None, box=(-1.0, 1.0),
         generators=None, eps: float = 0.03, targeted: bool = True, loss: str = "ce") -> torch.Tensor:
    """FGSM: x' = x - eps sign(grad L(f(x), y~)) (targeted, eq. 4), x + eps sign(grad L(f(x), y)) (untargeted),
    clipped to the box; eps in units of the box width."""
    if eps < 0:
        raise ConfigError(f"FGSM needs eps >= 0, got {eps}")
    if targeted and source is not None:
        check_targets(source, target)
    lo, hi = resolve_box(x, box)
    _, grad = per_sample_grad(lambda xp: classification_loss(loss, classifier(xp), target), x)
    direction = -grad.sign() if targeted else grad.sign()
    return project_box(x.detach() + eps * (hi - lo) * direction, lo, hi)


class _FromUnitBox(nn.Module):
    """classifier(lo + (u + 1) / 2 (hi - lo)): the classifier seen from [-1, 1] (what ``pgd_attack`` takes)."""

    def __init__(self, classifier: nn.Module, lo: torch.Tensor, hi: torch.Tensor):
        super().__init__()
        self.classifier, self.lo, self.hi = classifier, lo, hi
        self.num_classes = getattr(classifier, "num_classes", None)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.lo + (u + 1) / 2 * (self.hi - self.lo))


def pgd(classifier, x: torch.Tensor, target: torch.Tensor, *, source: torch.Tensor | None = None, box=(-1.0, 1.0),
        generators=None, eps: float = 0.5, steps: int = 20, step_size: float | None = None, norm="2",
        targeted: bool = True) -> torch.Tensor:
    """PGD (Madry et al. 2018; seed eq. 5) through ART: targeted toward ``target`` or untargeted away from it,
    inside the ``norm`` ball of radius eps (units of the box width) around x and inside the box.

    Starts from x itself (no random start, so the result depends on the sample alone); step_size defaults
    to 2.5 eps / steps.
    """
    if targeted and source is not None:
        check_targets(source, target)
    lo, hi = resolve_box(x, box)
    if ((hi - lo) <= 0).any():
        raise ConfigError("PGD needs a box with low < high in every feature")
    scalar = lo.numel() == 1 and hi.numel() == 1 and float(lo) == -1.0 and float(hi) == 1.0
    net = classifier if scalar else _FromUnitBox(classifier, lo, hi)
    u = x if scalar else (x - lo) / (hi - lo) * 2 - 1
    with torch.enable_grad():
        adv = pgd_attack(net, u.detach(), target, eps=eps, steps=steps, step_size=step_size, norm=norm,
                         targeted=targeted, num_classes=getattr(classifier, "num_classes", None))
    return adv if scalar else lo + (adv + 1) / 2 * (hi - lo)


def cfe_l2(classifier, x: torch.Tensor, target: torch.Tensor, *, source: torch.Tensor | None = None,
           box=(0.0, 1.0), generators=None, gamma: float = 0.1, gamma_steps: int = 10, iters: int = 200,
           step_size: float = 0.1, step_decay: str = "cumulative", loss: str = "margin",
           kappa: float = 0.0) -> torch.Tensor:
    """CFE-l2 (Wachter et al.): min_{x' in A} ||x' - x||^2 + gamma L(f(x'), y~), with S-CFE's solver and
    bisection on gamma, without sparsity or plausibility terms."""
    return scfe(classifier, x, target, source=source, box=box, sparsity=None, density=None, tau=0.0, gamma=gamma,
                gamma_steps=gamma_steps, iters=iters, step_size=step_size, step_decay=step_decay, loss=loss,
                kappa=kappa)
