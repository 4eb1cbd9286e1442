"""A classifier read as an energy-based model (Grathwohl et al. 2020; seed 002, section 2.5).

For logits f(x):
    E(x, y) = -f(x)[y]                     (-log p(x, y) up to log Z, eq. 2.34)
    E(x)    = -logsumexp_k f(x)[k]          (-log p(x) up to log Z, eq. 2.33)
    log p(y | x) = f(x)[y] - logsumexp f(x) = E(x) - E(x, y)   (eq. 2.38)
All functions are per sample (shape [B]) and differentiable. Labels are checked against the logits
(``check=True``, a host read); inside a sampling loop the caller checks them once beforehand and passes
``check=False`` (``ClassifierGuidance`` does), so the loop reads no tensor on the host.
"""

from __future__ import annotations

import torch


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """A label outside the classifier's classes is an error (not a silent index wrap or crash)."""
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)].unique().tolist()
        raise ValueError(f"labels {bad[:10]} are outside the classifier's {num_classes} classes (0..{num_classes - 1})")


def joint_energy(logits: torch.Tensor, labels: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """E(x, y) = -f(x)[y]."""
    if check:
        check_labels(labels, logits.shape[-1])
    return -logits.gather(-1, labels.long().reshape(-1, 1)).squeeze(-1)


def marginal_energy(logits: torch.Tensor) -> torch.Tensor:
    """E(x) = -logsumexp_y f(x)[y]."""
    return -torch.logsumexp(logits, dim=-1)


def log_p_y_given_x(logits: torch.Tensor, labels: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """log p(y | x) = E(x) - E(x, y)."""
    return marginal_energy(logits) - joint_energy(logits, labels, check=check)
