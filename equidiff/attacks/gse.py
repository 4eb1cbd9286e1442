"""GSE: group-wise sparse and explainable adversarial attacks (seed 001; Sadiku, Wagner & Pokutta).

For an image x in [lo, hi] and a target y~ (or the true class y, untargeted), with the CW margin loss L and
F(r) = L(f(x + r), y~) + mu ||r||_2^2, iteration j of one run (t_0 = 1, t' = (1 + sqrt(1 + 4 t^2)) / 2):

    g = grad F(r)                                                    (1. at the current iterate, also at j = k_hat)
    j = k_hat:  V = {lambda <= lambda_0};  r, v_old <- r on V, 0 elsewhere  (end of phase I; after g, as the code)
    j < k_hat:  v = prox_{sigma lambda |.|^(1/2)}(r - sigma g)      (2. phase I: FBS step, per-pixel 1/2 prox)
    j >= k_hat: v = (r - sigma g) on V, 0 elsewhere                  (2. phase II: projected gradient step)
    r <- (t / t') v + (1 - t / t') v_old;  v_old <- v                 (3. the reference's momentum)
    j < k_hat:  lambda <- lambda / Mbar(r)              (4. M = blur(sign(sum_c |r|)); Mbar = M + 1, q off it)
    r <- clip(x + r) - x;  t <- t'; a sample stops at its first successful iterate

An outer search on lambda_0 (``search_steps``): success -> lambda_0 grows (x ``search_factor`` until a failure
bounds it, then bisection), failure -> lambda_0 <- 0.9 lb + 0.1 lambda_0; the successful example with the fewest
changed patches (d_{2,0}, exact non-zero test) over the search is kept, x itself if none. The first lambda_0 is
``init_factor`` (0.01) times the largest lambda for which the first prox step is non-zero (the reference bisects
50 times for it; here it is in closed form). In the last two search steps a sample whose runs never succeeded
gets a 10x larger step.

lambda is the reference's weight: the prox is the published half-thresholding with parameter sigma lambda,
i.e. ``proximal.prox_half(v, sigma lambda / 2)`` in equidiff's 1/2 (z - v)^2 convention.

Everything follows wagnermoritz/GSE ``GSEAttack`` (the whole attack is tested equal to it on a random CNN) and
its defaults: iters 200, search_steps 10, search_factor 2, blur 5x5 with sigma 1.5, mu 1, sigma 0.0025, k_hat 10,
q 0.25 (its tuned settings are in attackParams.json; see conf/solver/gse*.yaml). One documented option:
``momentum="fista"`` replaces step 3 by the seed's FISTA/Nesterov extrapolation r <- v + (t - 1) / t' (v - v_old)
(everything else unchanged). The l2 term is the code's mu ||r||^2 (the slides write mu ||r||).
Everything is per sample (own lambda, step, bracket, stopping), so batch-mates do not interact.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms.functional import gaussian_blur

from equidiff.attacks.common import margin_loss, per_sample_grad, predict, resolve_box, success
from equidiff.attacks.proximal import prox_half
from equidiff.attacks.targets import check_targets
from equidiff.errors import ConfigError
from equidiff.metrics.counterfactual import changed_patches

MOMENTUM = ("reference", "fista")
# the published half-thresholding with parameter w is non-zero iff |v| > 54^(1/3) / 4 w^(2/3)
_HALF_THRESHOLD = 54 ** (1 / 3) / 4


def initial_lambda(grad: torch.Tensor, sigma: torch.Tensor, factor: float = 0.01) -> torch.Tensor:
    """factor x the largest lambda with a non-zero first step prox(sigma grad, sigma lambda), per sample.

    The reference finds it by doubling and 50 bisection steps; the threshold of the half-thresholding gives it
    in closed form: max |sigma grad| = 54^(1/3) / 4 (sigma lambda)^(2/3).
    """
    top = (sigma.reshape(-1, 1) * grad.flatten(1)).abs().amax(1)
    lam_max = (top / _HALF_THRESHOLD) ** 1.5 / sigma.reshape(-1)
    return factor * lam_max


def adjust_lambda(lam: torch.Tensor, r: torch.Tensor, q: float, blur_size: int, blur_sigma: float) -> torch.Tensor:
    """lambda / Mbar: M = Gaussian blur of the support sign(sum_c |r|); Mbar = M + 1 on M != 0, else q."""
    support = r.abs().mean(1, keepdim=True).sign()
    m = gaussian_blur(support, [blur_size, blur_size], [blur_sigma, blur_sigma]) + 1
    m = torch.where(m == 1, torch.full_like(m, q), m)
    return lam / m[:, 0]


def momentum_step(v: torch.Tensor, v_old: torch.Tensor, t: float, t_new: float, kind: str = "reference"
                  ) -> torch.Tensor:
    """The next iterate from the step's output v and the previous one v_old.

    ``reference``: (t / t') v + (1 - t / t') v_old (wagnermoritz/GSE, attacks.py); ``fista``: the seed's
    Nesterov extrapolation v + (t - 1) / t' (v - v_old).
    """
    if kind == "reference":
        a = t / t_new
        return a * v + (1 - a) * v_old
    return v + ((t - 1) / t_new) * (v - v_old)


def _attack_once(classifier, x, target, lam0, sigma, lo, hi, *, targeted, mu, iters, k_hat, q, blur_size,
                 blur_sigma, kappa, momentum):
    """One run of phases I and II for every sample; returns (first successful x' or x, found)."""
    b = len(x)
    lam = lam0[:, None, None].expand(b, *x.shape[2:]).clone()  # per-pixel lambda (B, H, W)
    r = torch.zeros_like(x)
    v_old = torch.zeros_like(x)
    frozen = torch.zeros_like(x, dtype=torch.bool)
    active = torch.ones(b, dtype=torch.bool, device=x.device)
    result, found = x.clone(), torch.zeros(b, dtype=torch.bool, device=x.device)
    t = 1.0
    for j in range(iters):
        idx = active.nonzero()[:, 0]
        if len(idx) == 0:
            break
        xa, ya, sa = x[idx], target[idx], sigma[idx].reshape(-1, *[1] * (x.ndim - 1))

        def objective(ra, xa=xa, ya=ya):
            loss = margin_loss(classifier(xa + ra), ya, targeted=targeted, kappa=kappa)
            return loss + mu * (ra * ra).flatten(1).sum(1)

        _, grad = per_sample_grad(objective, r[idx])  # 1. at the current iterate (at k_hat: before the mask)
        t_new = 0.5 * (1 + math.sqrt(1 + 4 * t * t))
        if j == k_hat:  # end of phase I: V = {lambda <= lambda_0}; the other coordinates are set to 0 for good
            frozen = (lam > lam0[:, None, None])[:, None].expand_as(x)
            r = torch.where(frozen, 0, r)
            v_old = r.clone()
        step = r[idx] - sa * grad
        if j < k_hat:
            v = prox_half(step, lam[idx][:, None] * sa / 2)  # 2. FBS step, the per-pixel 1/2 prox (phase I)
        else:
            v = torch.where(frozen[idx], 0, step)  # 2. projected gradient step on V (phase II)
        ra = momentum_step(v, v_old[idx], t, t_new, momentum)  # 3. momentum
        if j < k_hat:
            lam[idx] = adjust_lambda(lam[idx], ra, q, blur_size, blur_sigma)  # 4. grow groups, shrink the rest
        x_adv = torch.minimum(torch.maximum(xa + ra, lo), hi)  # clip to the box
        r[idx], v_old[idx] = x_adv - xa, v
        t = t_new
        ok = success(predict(classifier, x_adv), ya, targeted)
        if ok.any():  # a sample stops at its first successful iterate
            done = idx[ok]
            result[done], found[done] = x_adv[ok], True
            active[done] = False
    return result, found


def gse(classifier, x: torch.Tensor, target: torch.Tensor, *, source: torch.Tensor | None = None, box=(-1.0, 1.0),
        generators=None, targeted: bool = True, mu: float = 1.0, sigma: float = 0.0025, k_hat: int = 10,
        q: float = 0.25, iters: int = 200, search_steps: int = 10, search_factor: float = 2.0, blur_size: int = 5,
        blur_sigma: float = 1.5, patch_size: int = 8, kappa: float = 0.0, init_factor: float = 0.01,
        momentum: str = "reference") -> torch.Tensor:
    """GSE adversarial examples of images ``x`` (B, C, H, W); returns x' (x itself where the attack failed).

    Args:
        target: the target class (targeted) or the true class (``targeted=False``).
        source: the true classes; a target equal to its source class is a ConfigError when targeted.
        box: image range (the reference's [-1, 1]).
        generators: unused (GSE is deterministic); accepted for the common solver signature.
        mu, sigma, k_hat, q: l2 weight, step size, phase-I length, lambda growth factor off the groups.
        iters, search_steps, search_factor: iterations per run and the outer search on lambda_0.
        blur_size, blur_sigma: the Gaussian kernel K (odd size).
        patch_size: patch side of d_{2,0}, which picks the best example of the search (8 in GSE).
        kappa: margin of the CW loss.
        init_factor: the first lambda_0 as a fraction of the largest useful one (0.01 in GSE).
        momentum: ``reference`` (the authors' code, default) or ``fista`` (see the module docstring).
    """
    if x.ndim != 4:
        raise ConfigError(f"GSE attacks images (B, C, H, W), got shape {tuple(x.shape)}")
    if targeted and source is not None:
        check_targets(source, target)
    if blur_size < 1 or blur_size % 2 == 0:
        raise ConfigError(f"blur_size must be a positive odd number, got {blur_size}")
    if not 0 < q <= 1 or sigma <= 0 or mu < 0 or iters < 1 or search_steps < 1:
        raise ConfigError("GSE needs 0 < q <= 1, sigma > 0, mu >= 0, iters >= 1 and search_steps >= 1")
    if momentum not in MOMENTUM:
        raise ConfigError(f"unknown GSE momentum {momentum!r}; choose one of {list(MOMENTUM)} "
                          f"(reference: the authors' code, the default)")
    lo, hi = resolve_box(x, box)
    x, target = x.detach(), target.long()
    b = len(x)
    base_sigma = torch.full((b,), float(sigma), dtype=x.dtype, device=x.device)

    _, grad0 = per_sample_grad(lambda r: margin_loss(classifier(x + r), target, targeted=targeted, kappa=kappa),
                               torch.zeros_like(x))  # the code's mu ||r|| term has gradient 0 at r = 0
    lam0 = initial_lambda(grad0, base_sigma, init_factor)
    lower, upper = torch.zeros_like(lam0), torch.full_like(lam0, math.inf)
    best, best_d20 = x.clone(), torch.full_like(lam0, math.inf)
    last = x.clone()  # the last successful example of any search step (the reference's ``result``)
    for step in range(search_steps):
        # a sample whose runs never moved it gets a 10x step in the last two search steps
        never = (last - x).abs().flatten(1).sum(1) == 0
        sig = torch.where(never & (step >= search_steps - 2), base_sigma * 10, base_sigma)
        x_adv, found = _attack_once(classifier, x, target, lam0, sig, lo, hi, targeted=targeted, mu=mu, iters=iters,
                                    k_hat=k_hat, q=q, blur_size=blur_size, blur_sigma=blur_sigma, kappa=kappa,
                                    momentum=momentum)
        last[found] = x_adv[found]
        d20 = changed_patches(x, x_adv, patch_size, atol=0.0).to(lam0.dtype)
        better = found & (d20 < best_d20)  # keep the successful example with the fewest changed patches
        best[better], best_d20[better] = x_adv[better], d20[better]
        # search on lambda_0: success -> larger (x factor, or bisect below a failing value); failure -> smaller
        upper = torch.where(found, upper, lam0)
        new_lam = torch.where(found, torch.where(torch.isinf(upper), lam0 * search_factor, (upper + lam0) / 2),
                              0.9 * lower + 0.1 * lam0)
        lower = torch.where(found, lam0, lower)
        lam0 = new_lam
    return best
