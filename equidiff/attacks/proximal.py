"""Proximal operators of the sparsity terms of S-CFE and GSE (seed 001), elementwise and batched.

Every operator solves, coordinate by coordinate, the one-dimensional problem

    prox(v) = argmin_z  1/2 (z - v)^2 + lam * |z|^p                                 (seed eq. 6)

in closed form: p = 1 soft thresholding, p = 1/2 the half-thresholding of Xu et al. (2012), p = 2/3 the
thresholding of Cao, Sun & Xu (2013), p = 0 hard thresholding. The published formulas are written for
(z - v)^2 + lambda |z|^p, without the 1/2; here ``lam`` is the weight in the form above (lambda = 2 lam).
The reference code (wagnermoritz/SCFE, GSE) passes its weight straight into the published p = 1/2 formula,
so there its beta is twice ours (S-CFE's ``beta_convention="reference"`` halves it); its l0 and l1
operators use the form above, so beta agrees for them. GSE's lambda is found by bisection, where the
convention cancels out.

``prox_box`` adds the box: z must keep x + z in [lo, hi] (an interval around 0 for every coordinate).
For p < 1 the penalty is not convex and clamping the unconstrained minimiser is not enough: the
minimiser over the interval is the clamped value or 0, whichever is lower (the reference's l0 prox
does this comparison; its p = 1/2 prox only clamps). ``project_l0_box`` is the projection onto
{||z||_0 <= m} intersected with the box (seed eq. 15), the prox of S-CFE's constrained form.

lam, lo, hi broadcast against v, so every sample (and every pixel) can have its own.
"""

from __future__ import annotations

import math

import torch

from equidiff.errors import ConfigError

SPARSITY_NORMS = {"l0": 0.0, "l1/2": 0.5, "l2/3": 2.0 / 3.0, "l1": 1.0}


def sparsity_exponent(p) -> float:
    """``p`` as a number: 0, 1/2, 2/3 or 1 (also the names "l0", "l1/2", "l2/3", "l1", or 0.5, 0.66..)."""
    if isinstance(p, str):
        key = p.lower().replace(" ", "")
        if key in SPARSITY_NORMS:
            return SPARSITY_NORMS[key]
        try:
            p = float(key.split("/")[0]) / float(key.split("/")[1]) if "/" in key else float(key)
        except ValueError:
            p = None
    for q in SPARSITY_NORMS.values():
        if p is not None and abs(float(p) - q) < 1e-2:
            return q
    raise ConfigError(f"unknown sparsity exponent p={p!r}; choose one of 0, 1/2, 2/3, 1 "
                      f"(or {list(SPARSITY_NORMS)})")


def penalty(z: torch.Tensor, lam, p: float) -> torch.Tensor:
    """lam * |z|^p elementwise (|z|^0 counts non-zeros)."""
    if p == 0:
        return lam * (z != 0).to(z.dtype)
    return lam * z.abs() ** p


def prox_l1(v: torch.Tensor, lam) -> torch.Tensor:
    """Soft thresholding: argmin_z 1/2 (z - v)^2 + lam |z|."""
    return v.sign() * (v.abs() - lam).clamp_min(0)


def prox_l0(v: torch.Tensor, lam) -> torch.Tensor:
    """Hard thresholding: argmin_z 1/2 (z - v)^2 + lam [z != 0]; keeps v where v^2 / 2 > lam."""
    return torch.where(v * v > 2 * lam, v, torch.zeros_like(v))


def prox_half(v: torch.Tensor, lam) -> torch.Tensor:
    """Half thresholding (Xu et al. 2012): argmin_z 1/2 (z - v)^2 + lam |z|^(1/2).

    With lambda = 2 lam: z = 2/3 v (1 + cos(2 pi / 3 - 2/3 phi)), phi = arccos(lambda / 8 (|v| / 3)^(-3/2)),
    for |v| > 54^(1/3) / 4 lambda^(2/3), else 0.
    """
    big_lam = 2 * torch.as_tensor(lam, dtype=v.dtype, device=v.device)
    thresh = (54 ** (1 / 3) / 4) * big_lam ** (2 / 3)
    a = v.abs()
    keep = a > thresh
    a_safe = torch.where(keep, a, torch.ones_like(a))  # no inf/NaN in the branch that is thrown away
    arg = (big_lam / 8 * (a_safe / 3) ** -1.5).clamp(-1, 1)
    phi = torch.arccos(arg)
    z = 2 / 3 * v * (1 + torch.cos(2 * math.pi / 3 - 2 / 3 * phi))
    return torch.where(keep, z, torch.zeros_like(v))


def prox_two_thirds(v: torch.Tensor, lam) -> torch.Tensor:
    """2/3-thresholding (Cao, Sun & Xu 2013): argmin_z 1/2 (z - v)^2 + lam |z|^(2/3).

    With lambda = 2 lam: for |v| > 2/3 (3 lambda^3)^(1/4),
    z = sgn(v) ((A + sqrt(2 |v| / A - A^2)) / 2)^3 with A = 2 / sqrt(3) lambda^(1/4) cosh(theta / 3)^(1/2),
    theta = arccosh(27 v^2 / 16 lambda^(-3/2)); else 0.
    """
    big_lam = 2 * torch.as_tensor(lam, dtype=v.dtype, device=v.device)
    thresh = 2 / 3 * (3 * big_lam ** 3) ** 0.25
    a = v.abs()
    keep = (a > thresh) & (big_lam > 0)
    lam_safe = torch.where(big_lam > 0, big_lam, torch.ones_like(big_lam))
    theta = torch.arccosh((27 / 16 * a * a * lam_safe ** -1.5).clamp_min(1))
    amp = 2 / math.sqrt(3) * lam_safe ** 0.25 * torch.cosh(theta / 3).sqrt()
    amp = torch.where(keep, amp, torch.ones_like(amp))
    inner = (2 * a / amp - amp * amp).clamp_min(0)
    z = v.sign() * ((amp + inner.sqrt()) / 2) ** 3
    z = torch.where(keep, z, torch.zeros_like(v))
    return torch.where(big_lam > 0, z, v)  # lam = 0: the identity


PROX = {0.0: prox_l0, 0.5: prox_half, 2.0 / 3.0: prox_two_thirds, 1.0: prox_l1}


def prox(v: torch.Tensor, lam, p) -> torch.Tensor:
    """The closed-form prox of lam |z|^p for p in {0, 1/2, 2/3, 1}."""
    return PROX[sparsity_exponent(p)](v, lam)


def prox_box(v: torch.Tensor, lam, p, lo, hi) -> torch.Tensor:
    """argmin over lo <= z <= hi of 1/2 (z - v)^2 + lam |z|^p, elementwise, for intervals with lo <= 0 <= hi.

    The minimiser over the interval is 0 or the clamped unconstrained minimiser, whichever costs less
    (on each side of 0 the objective has at most one interior local minimum, the unconstrained one).
    """
    p = sparsity_exponent(p)
    cand = torch.minimum(torch.maximum(prox(v, lam, p), torch.as_tensor(lo, dtype=v.dtype, device=v.device)),
                         torch.as_tensor(hi, dtype=v.dtype, device=v.device))
    cost = 0.5 * (cand - v) ** 2 + penalty(cand, lam, p)
    return torch.where(cost < 0.5 * v * v, cand, torch.zeros_like(v))


def project_box(v: torch.Tensor, lo, hi) -> torch.Tensor:
    """Clamp to [lo, hi] (the prox of the box indicator alone: CFE-l2, FGSM, PGD)."""
    return torch.minimum(torch.maximum(v, torch.as_tensor(lo, dtype=v.dtype, device=v.device)),
                         torch.as_tensor(hi, dtype=v.dtype, device=v.device))


def project_l0_box(v: torch.Tensor, m, lo, hi) -> torch.Tensor:
    """Projection of each sample's v (first dim B) onto {||z||_0 <= m} intersected with [lo, hi] (seed eq. 15).

    Keeping coordinate i at its clamped value c_i instead of 0 saves v_i^2 - (c_i - v_i)^2 of squared
    distance; the projection keeps the m coordinates that save most (and only those that save something).
    ``m`` is an int or a tensor [B] (one budget per sample).
    """
    b = v.shape[0]
    flat = v.reshape(b, -1)
    c = project_box(v, lo, hi).reshape(b, -1)
    m = torch.as_tensor(m, device=v.device).reshape(-1).expand(b) if torch.is_tensor(m) else torch.full(
        (b,), int(m), device=v.device)
    if (m < 1).any():
        raise ConfigError(f"the l0 budget m must be >= 1 (changed coordinates per sample), got {m.min().item()}")
    gain = flat * flat - (c - flat) ** 2
    k = int(min(int(m.max()), flat.shape[1]))
    top = gain.topk(k, dim=1).indices  # sorted by gain, so the first m[b] columns are sample b's m best
    rank_ok = torch.arange(k, device=v.device)[None, :] < m[:, None]
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, rank_ok)
    keep &= gain > 0
    return torch.where(keep, c, torch.zeros_like(c)).reshape(v.shape)
