"""Classifier guidance as a wrapper around the model function (seed 002, Algorithms 6 and 8).

``ClassifierGuidance(objective, ...)(model_fn, batch, scheduler)`` returns a new
``model_fn(x_t, t) -> eps_hat`` with

    eps_hat = eps_theta(x_t, t) - s * w(t) * g(x_t),        g = -grad_x objective(x, y)

(Algorithm 6, line 7, with w(t) = sqrt(1 - alpha_bar_t) for the ``Standard`` schedule). Samplers
never see guidance. Every sample's direction comes from its own loss: the per-sample losses are
summed just before ``autograd.grad``, and every norm is taken per sample, so a sample's guidance
does not depend on its batch-mates.

Options: guidance that starts after a fraction of the steps (section 4.3, Fig. 4.4); gradient
accumulation over n inner steps (section 4.3); PGD-based guidance (Algorithm 8); and the
gradient taken through the predicted clean image x0_hat instead of x_t.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from equidiff.errors import ConfigError
from equidiff.guidance.schedules import Standard, before

INPUTS = ("x_t", "x0_hat", "x0_hat_detached")


def _per_sample_unit(g: torch.Tensor) -> torch.Tensor:
    """g / ||g||_2, the norm taken per sample."""
    return g / g.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, *([1] * (g.ndim - 1)))


class ClassifierGuidance(nn.Module):
    """Guide a diffusion model with a classifier objective (see module docstring).

    Args:
        objective: ``objective(x, labels) -> loss[B]`` (``NegLogLikelihood``, ``JointEnergy``,
            ``DualEnergy``, ``WeightedSum``...). Guidance follows -grad loss.
        scale: guidance strength s. ``scale=0`` returns the unguided eps exactly.
        schedule: w(t, alpha_bar_t, T) (default ``Standard``: sqrt(1 - alpha_bar_t), Algorithm 6).
        start_fraction: guidance is off for the first ``start_fraction`` of the reverse process
            (Fig. 4.4 uses 0.2).
        accumulate_steps: n > 1 sums the directions of n intermediate images (section 4.3):
            x_{t_0} = x_t, x_{t_{i+1}} = x_{t_i} + accumulate_gamma * g_i / ||g_i||, g = sum_i g_i.
            The seed does not give the intermediate step; equidiff uses this normalised ascent step.
        pgd_steps, pgd_gamma: n > 0 applies Algorithm 8: n steps
            x <- (1 + gamma) x - gamma * grad L(x) / ||grad L(x)||, then the direction is taken at the
            last point (and applied to x_t).
        input: where the objective is evaluated: ``x_t`` (the noisy sample, as the seed), ``x0_hat``
            (the predicted clean image, gradient back-propagated through the denoiser to x_t), or
            ``x0_hat_detached`` (gradient w.r.t. x0_hat, applied to x_t; no denoiser backward).
        label_key: the batch entry holding each sample's target label.
    """

    def __init__(self, objective: nn.Module, *, scale: float = 1.0, schedule: Callable | None = None,
                 start_fraction: float = 0.0, accumulate_steps: int = 1, accumulate_gamma: float = 0.05,
                 pgd_steps: int = 0, pgd_gamma: float = 0.01, input: str = "x_t", label_key: str = "label"):
        super().__init__()
        if input not in INPUTS:
            raise ConfigError(f"guidance input must be one of {INPUTS}, got {input!r}")
        if scale < 0:
            raise ConfigError(f"guidance scale must be >= 0, got {scale}")
        if not 0.0 <= start_fraction < 1.0:
            raise ConfigError(f"start_fraction must be in [0, 1), got {start_fraction}")
        if accumulate_steps < 1 or pgd_steps < 0:
            raise ConfigError(f"accumulate_steps must be >= 1 and pgd_steps >= 0, got {accumulate_steps}, {pgd_steps}")
        if accumulate_steps > 1 and pgd_steps > 0:
            raise ConfigError("choose gradient accumulation (accumulate_steps > 1) or PGD guidance (pgd_steps > 0), "
                              "not both")
        self.objective = objective
        self.scale, self.schedule = float(scale), schedule if schedule is not None else Standard()
        self.start_fraction = float(start_fraction)
        self.accumulate_steps, self.accumulate_gamma = int(accumulate_steps), float(accumulate_gamma)
        self.pgd_steps, self.pgd_gamma = int(pgd_steps), float(pgd_gamma)
        self.input, self.label_key = input, label_key

    @property
    def num_classes(self) -> int | None:
        return getattr(self.objective, "num_classes", None)

    # ------------------------------------------------------------------ directions
    def _direction_at(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """g = -grad_x objective(x, y), per sample."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.objective(x, labels).sum(), x)
        return -grad

    def direction(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The guidance direction at x: plain, accumulated (section 4.3) or PGD-based (Algorithm 8)."""
        if self.pgd_steps > 0:
            for _ in range(self.pgd_steps):  # Algorithm 8, lines 1-2 (grad L = -direction)
                x = (1 + self.pgd_gamma) * x + self.pgd_gamma * _per_sample_unit(self._direction_at(x, labels))
            return self._direction_at(x, labels)  # line 3: the score at the last point
        total = torch.zeros_like(x)
        for i in range(self.accumulate_steps):
            g = self._direction_at(x, labels)
            total = total + g
            if i + 1 < self.accumulate_steps:
                x = x + self.accumulate_gamma * _per_sample_unit(g)
        return total

    # ------------------------------------------------------------------ the wrapper
    def forward(self, model_fn: Callable, batch: dict, scheduler) -> Callable:
        """The guided model function for this batch (``guidance(model_fn, batch, scheduler)``)."""
        labels = batch[self.label_key]
        if self.num_classes is not None:  # checked once here (one host read per batch), not by the objective per step
            bad = (labels < 0) | (labels >= self.num_classes)
            if bad.any():
                raise ConfigError(f"guidance labels {labels[bad].unique().tolist()[:10]} are outside the classifier's "
                                  f"{self.num_classes} classes; set data.labels / data.num_classes to match it")
        # every number the guided function needs per timestep, for all T training timesteps, computed once on the host
        # and moved to the labels' device (the sampling device) in one copy: the loop reads no tensor on the host
        T = scheduler.config.num_train_timesteps
        device = labels.device
        ab_host = scheduler.alphas_cumprod.float()
        alpha_bar, ab_values = ab_host.to(device), ab_host.tolist()
        # s * w(t), with w of the fp32 alpha_bar_t
        strength = torch.tensor([self.scale * self.schedule(t, ab_values[t], T) for t in range(T)],
                                dtype=torch.float32).to(device)
        # guidance is off in the first start_fraction of the reverse process: decided per timestep here; in the loop
        # a torch.where selects eps there (the direction is computed and dropped: a branch would read t on the host)
        active = (torch.tensor([not before(t, T, self.start_fraction) for t in range(T)]).to(device)
                  if self.start_fraction > 0 else None)

        def guided(x_t: torch.Tensor, t) -> torch.Tensor:
            if self.scale == 0:
                return model_fn(x_t, t)
            ab, sw = _at(alpha_bar, t), _at(strength, t)
            if self.input == "x0_hat":  # objective on x0_hat(x_t), back-propagated through eps_theta
                with torch.enable_grad():
                    x = x_t.detach().requires_grad_(True)
                    eps = model_fn(x, t)
                    x0_hat = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
                    (grad,) = torch.autograd.grad(self.objective(x0_hat, labels.to(x.device)).sum(), x)
                eps = eps.detach()
                out = eps + sw * grad  # eps - s w g with g = -grad
            else:
                eps = model_fn(x_t, t)
                x = x_t if self.input == "x_t" else (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
                g = self.direction(x, labels.to(x_t.device))
                out = eps - sw * g  # Algorithm 6, line 7
            return out if active is None else torch.where(_at(active, t), out, eps)

        return guided


def _at(table: torch.Tensor, t) -> torch.Tensor:
    """table[t] as a 0-d tensor on the table's device, without reading a tensor t on the host."""
    if isinstance(t, torch.Tensor):
        return table.index_select(0, t.reshape(1).to(device=table.device, dtype=torch.long)).squeeze(0)
    return table[int(t)]
