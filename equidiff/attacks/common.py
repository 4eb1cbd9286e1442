"""Pieces the solvers share: the box, the classification losses, per-sample gradients."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from equidiff.errors import ConfigError
from equidiff.utils.precision import upcast

LOSSES = ("margin", "ce")


def resolve_box(x: torch.Tensor, box) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) broadcastable to ``x``: the actionable set A = [lo, hi] (scalars or per-feature tensors).

    Raises a ConfigError if some x lies outside the box: the solvers search x' in A around x.
    """
    if box is None or len(box) != 2:
        raise ConfigError(f"box must be (low, high), got {box!r}")
    lo, hi = (torch.as_tensor(b, dtype=x.dtype, device=x.device) for b in box)
    feat = x.shape[1:]
    lo, hi = (b.reshape(feat) if b.numel() > 1 and b.numel() == x[0].numel() else b for b in (lo, hi))
    if (lo > hi).any():
        raise ConfigError(f"the box has low > high somewhere: {box!r}")
    tol = 1e-5 * (1 + (hi - lo).abs().max())
    outside = ((x < lo - tol) | (x > hi + tol)).flatten(1).any(1)
    if outside.any():
        i = int(outside.nonzero()[0])
        raise ConfigError(f"the box [{lo.min().item():.3g}, {hi.max().item():.3g}] excludes {int(outside.sum())} "
                          f"input(s) (first: position {i}, values in [{x[i].min().item():.3g}, "
                          f"{x[i].max().item():.3g}]); the counterfactual must stay in a box that contains x: "
                          f"widen the box or scale the data into it")
    return lo, hi


def margin_loss(logits: torch.Tensor, labels: torch.Tensor, *, targeted: bool = True, kappa: float = 0.0
                ) -> torch.Tensor:
    """Carlini-Wagner margin per sample: relu(max_{j != y} Z_j - Z_y + kappa) (targeted: reach y),
    relu(Z_y - max_{j != y} Z_j + kappa) (untargeted: leave y). In fp32 whatever the logits' dtype."""
    logits = upcast(logits)
    z_y = logits.gather(1, labels[:, None])[:, 0]
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf")).amax(1)
    return F.relu(others - z_y + kappa) if targeted else F.relu(z_y - others + kappa)


def classification_loss(kind: str, logits: torch.Tensor, labels: torch.Tensor, *, targeted: bool = True,
                        kappa: float = 0.0) -> torch.Tensor:
    """L(f(x'), y~) per sample: ``margin`` (CW) or ``ce`` (cross-entropy; negated when untargeted), in fp32."""
    logits = upcast(logits)
    if kind == "margin":
        return margin_loss(logits, labels, targeted=targeted, kappa=kappa)
    if kind == "ce":
        ce = F.cross_entropy(logits, labels, reduction="none")
        return ce if targeted else -ce
    raise ConfigError(f"unknown loss {kind!r}; choose one of {list(LOSSES)}")


def per_sample_grad(objective: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective(w) [B], d objective_b / d w_b): per-sample losses summed just before autograd.grad."""
    with torch.enable_grad():
        w = w.detach().requires_grad_(True)
        values = objective(w)
        (grad,) = torch.autograd.grad(values.sum(), w)
    return values.detach(), grad


def predict(classifier, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return classifier(x).argmax(-1)


def success(pred: torch.Tensor, target: torch.Tensor, targeted: bool = True) -> torch.Tensor:
    """Validity: f(x') = y~ (targeted) or f(x') != y (untargeted)."""
    return pred == target if targeted else pred != target
