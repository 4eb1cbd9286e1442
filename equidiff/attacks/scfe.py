"""S-CFE: simple counterfactual explanations by accelerated proximal gradient (seed 001, eqs. 12-15).

For a factual x and target y~ it solves, over the perturbation w = x' - x,

    min_w  h(w) + g(w),   h(w) = ||w||^2 + gamma L(f(x + w), y~) - tau q(x + w, y~)            (eq. 12)
                          g(w) = I_A(x + w) + beta ||w||_p^p,  p in {0, 1/2, 2/3, 1}            (eq. 13)
                     or   g(w) = I_A(x + w) + I{||w||_0 <= m}                                  (eq. 15)

with FISTA (eq. 14): v_{i+1} = prox_{sigma_i g}(w_i - sigma_i grad h(w_i)), w_{i+1} = v_{i+1} + (t_i - 1) /
t_{i+1} (v_{i+1} - v_i), and an outer bisection on the loss weight gamma that secures validity: a sample
whose counterfactual is valid halves gamma towards its last invalid value, one that is not multiplies it
by 10 until valid (then bisects); the valid counterfactual with the smallest ||w||_2 over the search is
kept. Settings follow the reference (wagnermoritz/SCFE ``APG0_CFE``): 200 iterations, 10 search steps,
gamma_0 = 0.1, the CW margin loss, and its step schedule sigma_i = sigma_{i-1} sqrt(1 - i / T)
(``step_decay="cumulative"``; ``"sqrt"`` gives sigma_0 sqrt(1 - i / T)).

As the reference, the solver can work in box coordinates (``unit_box=True``): x is mapped onto u = (x - lo) /
(hi - lo) in [0, 1], the perturbation w, ||w||^2, the step sizes and the sparsity term live there, and the
classifier and the density see lo + (u + w)(hi - lo). With data in [0, 1] this changes nothing. (The
reference also clamps w to [mins, maxs], its default range, in these coordinates; that bites only where a
feature's range does not cover [-1, 1], never for z-scored wine or MNIST in [-1, 1], and is left out.)

The sparsity weight beta follows the reference by default (``beta_convention="reference"``): its l0 and l1
operators are the prox of sigma beta ||w||_p^p in the form 1/2 ||z - v||^2 + ..., as eq. 13-14 read, but its
l1/2 operator feeds sigma beta into the published half-thresholding formula, written for ||z - v||^2 +
lambda |z|^(1/2) without the 1/2, which is the prox of (sigma beta / 2) |z|^(1/2): the reference's (and the
paper's printed) beta is twice the beta of eq. 13 for p = 1/2, and here for p = 2/3 by the same formula.
``beta_convention="objective"`` reads beta as in eq. 13 for every p.

Everything is per sample: each sample has its own gamma, bracket and best iterate, the losses are summed
only for autograd, and norms are taken per sample, so a sample's counterfactual does not depend on its
batch-mates. CFE-l2 (Wachter et al.) is the same solver with g = I_A only (``baselines.cfe_l2``).
"""

from __future__ import annotations

import math

import torch

from equidiff.attacks.common import classification_loss, per_sample_grad, predict, resolve_box, success
from equidiff.attacks.density import Density
from equidiff.attacks.proximal import project_box, project_l0_box, prox_box, sparsity_exponent
from equidiff.attacks.targets import check_targets
from equidiff.errors import ConfigError

BETA_CONVENTIONS = ("reference", "objective")


def sparsity_prox(sparsity, beta: float, m: int | None, beta_convention: str = "reference"):
    """prox_{sigma g}(v; lo, hi) for g = box + beta ||.||_p^p, box + l0 ball of radius m, or the box alone.

    ``beta_convention`` "reference": beta as the reference (and the paper's tables) use it, i.e. half of it
    for p = 1/2 and 2/3 (see the module docstring); "objective": beta of eq. 13 as it stands.
    """
    if beta_convention not in BETA_CONVENTIONS:
        raise ConfigError(f"unknown beta_convention {beta_convention!r}; choose one of {list(BETA_CONVENTIONS)}")
    if m is not None:
        if int(m) < 1:
            raise ConfigError(f"the l0 budget m must be >= 1 (changed features per sample), got {m}")
        if sparsity not in (None, "l0", 0, 0.0):
            raise ConfigError(f"m={m} is the l0 constraint (eq. 15); drop sparsity={sparsity!r} or m")
        return lambda v, sigma, lo, hi: project_l0_box(v, int(m), lo, hi)
    if sparsity is None or beta == 0:
        return lambda v, sigma, lo, hi: project_box(v, lo, hi)
    if beta < 0:
        raise ConfigError(f"beta must be >= 0, got {beta}")
    p = sparsity_exponent(sparsity)
    weight = beta / 2 if beta_convention == "reference" and p in (0.5, 2.0 / 3.0) else beta
    return lambda v, sigma, lo, hi: prox_box(v, sigma * weight, p, lo, hi)


def step_sizes(step_size: float, iters: int, decay: str = "cumulative") -> list[float]:
    """sigma_0 .. sigma_{T-1}: the reference's sigma_i = sigma_{i-1} sqrt(1 - i / T), or sigma_0 sqrt(1 - i / T)."""
    if decay == "cumulative":
        out, s = [], step_size
        for i in range(iters):
            s *= math.sqrt(1 - i / iters)
            out.append(s)
        return out
    if decay == "sqrt":
        return [step_size * math.sqrt(1 - i / iters) for i in range(iters)]
    if decay == "none":
        return [step_size] * iters
    raise ConfigError(f"unknown step_decay {decay!r}; choose cumulative, sqrt or none")


def apg(objective, prox_step, shape, *, like: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """FISTA (eq. 14) from w = 0: ``objective(w) -> [B]``, ``prox_step(v, sigma) -> v``; returns the last v."""
    w = torch.zeros(shape, dtype=like.dtype, device=like.device)
    v_old, t = w, 1.0
    for sigma in sigmas:
        _, grad = per_sample_grad(objective, w)
        v = prox_step(w - sigma * grad, sigma)  # 1. forward-backward step at the extrapolated point
        t_new = 0.5 * (1 + math.sqrt(1 + 4 * t * t))
        w = v + ((t - 1) / t_new) * (v - v_old)  # 2. Nesterov extrapolation
        v_old, t = v, t_new
    return v_old


def scfe(classifier, x: torch.Tensor, target: torch.Tensor, *, source: torch.Tensor | None = None,
         box=(0.0, 1.0), generators=None, sparsity: str | float | None = "l0", beta: float = 0.0,
         m: int | None = None, density: Density | None = None, tau: float = 0.0, gamma: float = 0.1,
         gamma_steps: int = 10, iters: int = 200, step_size: float = 0.1, step_decay: str = "cumulative",
         loss: str = "margin", kappa: float = 0.0, unit_box: bool = False,
         beta_convention: str = "reference") -> torch.Tensor:
    """S-CFE counterfactuals of ``x`` (B, ...) for targets ``target`` (B,); returns x' (x where none was found).

    Args:
        source: the true classes (a target equal to its source class is a ConfigError).
        box: the actionable set A = [lo, hi] (scalars or per-feature tensors); it must contain x.
        generators: unused (S-CFE is deterministic); accepted for the common solver signature.
        sparsity, beta: g's penalty beta ||w||_p^p, p = "l0", "l1/2", "l2/3" or "l1" (eq. 13); None: none.
        beta_convention: "reference" (beta as the reference code and the paper's tables) or "objective".
        m: the l0 constraint ||w||_0 <= m instead (eq. 15).
        density, tau: the plausibility term -tau q(x', y~) (a fitted ``Density``).
        gamma, gamma_steps: initial loss weight and number of bisection steps on it.
        iters, step_size, step_decay: FISTA iterations and step schedule.
        loss, kappa: the classification loss L ("margin": CW margin with confidence kappa; "ce").
        unit_box: solve in the box coordinates u = (x - lo) / (hi - lo) (the reference's [0, 1] scaling).
    """
    if source is not None:
        check_targets(source, target)
    if gamma_steps < 1 or iters < 1 or step_size <= 0 or gamma <= 0:
        raise ConfigError("S-CFE needs gamma_steps >= 1, iters >= 1, step_size > 0 and gamma > 0")
    if tau and density is None:
        raise ConfigError("tau > 0 needs a plausibility density (solver.density=...)")
    lo, hi = resolve_box(x, box)
    x = x.detach()
    b = len(x)
    prox_step = sparsity_prox(sparsity, beta, m, beta_convention)
    q = density.bind(x, target) if density is not None and tau else None
    sigmas = step_sizes(step_size, iters, step_decay)
    if unit_box:  # the reference's CFE.__call__: work in [0, 1], map back for the model (a flat box: width 1)
        width = torch.where(hi > lo, hi - lo, torch.ones_like(hi - lo))
        u, lo_u, hi_u = (x - lo) / width, (lo - lo) / width, (hi - lo) / width

        def to_x(v):
            return v * width + lo
    else:
        u, lo_u, hi_u = x, lo, hi

        def to_x(v):
            return v

    weight = torch.full((b,), float(gamma), dtype=x.dtype, device=x.device)
    lower, upper = torch.zeros_like(weight), torch.full_like(weight, math.inf)
    best, best_norm = x.clone(), torch.full_like(weight, math.inf)
    for _ in range(gamma_steps):
        def h(w, weight=weight):  # eq. 12, one value per sample
            xp = to_x(u + w)
            val = (w * w).flatten(1).sum(1) + weight * classification_loss(loss, classifier(xp), target, kappa=kappa)
            return val - tau * q(xp) if q is not None else val

        w = apg(h, lambda v, sigma: prox_step(v, sigma, lo_u - u, hi_u - u), x.shape, like=x, sigmas=sigmas)
        x_cf = to_x(u + w)
        valid = success(predict(classifier, x_cf), target)
        norm = w.flatten(1).norm(dim=1)
        better = valid & (norm < best_norm)  # keep the closest valid counterfactual of the search
        best[better], best_norm[better] = x_cf[better], norm[better]
        # bisection on gamma: valid -> new upper bound, invalid -> new lower bound (x10 while no upper bound)
        upper = torch.where(valid, weight, upper)
        lower = torch.where(valid, lower, weight)
        weight = torch.where(torch.isfinite(upper), (lower + upper) / 2, weight * 10)
    return best
