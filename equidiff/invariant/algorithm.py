"""Algorithm 1 of seed 000 (appendix .2): invariant-set generation by optimising z_T through the sampler.

For each sample: draw z_T, run the deterministic chain (gradient checkpointing) and decode to x, and
minimise  lambda * (||L(x) - t||^2 + ||L(F(x)) - t||^2)  over z_T for at most B iterations, where
t = L(x*) is the target value of the query x* and F a low-pass filter. A sample whose loss falls below
tau stops changing while the others go on; each sample keeps its best iterate.

Per-sample independence: every sample owns its own parameter tensor (so Shampoo's preconditioners and
every optimiser state are per sample), its own loss, stopping and renormalisation; the losses are
summed just before ``backward``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from equidiff.errors import ConfigError
from equidiff.invariant.objectives import as_vector
from equidiff.utils.precision import full_precision, upcast


def invariance_loss(values: torch.Tensor, values_filtered: torch.Tensor | None, target: torch.Tensor,
                    lam: float) -> torch.Tensor:
    """lambda * (||L(x) - t||^2 + ||L(F(x)) - t||^2) per sample (Algorithm 1, lines 18-20)."""
    loss = (values - target).square().sum(-1)
    if values_filtered is not None:
        loss = loss + (values_filtered - target).square().sum(-1)
    return lam * loss


def evaluate(objective: nn.Module, x: torch.Tensor, target: torch.Tensor, lam: float,
             low_pass: Callable | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss [B], L(x) [B, m], L(F(x)) [B, m] or None) for images or points x.

    Computed in fp32 with autocast off whatever the run's precision: the loss decides convergence at tolerance
    tau, which bf16 values (8 significant bits) would blur (``equidiff.utils.precision``).
    """
    with full_precision():
        return _evaluate(objective, upcast(x), upcast(target), lam, low_pass)


def _evaluate(objective, x, target, lam, low_pass):
    b = x.shape[0]
    values = upcast(as_vector(objective(x), b))  # line 15
    if values.shape != target.shape:
        raise ConfigError(f"the target has shape {tuple(target.shape)} but the objective gives {tuple(values.shape)} "
                          "per batch; give one target vector per sample with the objective's size")
    filtered = upcast(as_vector(objective(low_pass(x)), b)) if low_pass is not None else None  # lines 16-17
    return invariance_loss(values, filtered, target, lam), values, filtered


def invariant_optimize(generate: Callable[[torch.Tensor, list[int]], torch.Tensor], objective: nn.Module,
                       z_T: torch.Tensor, target: torch.Tensor, *, optimizer: Callable, budget: int = 100,
                       tau: float = 1e-3, lam: float = 1.0, low_pass: Callable | None = None,
                       renormalize: bool = False, callback: Callable | None = None) -> dict[str, torch.Tensor]:
    """Run Algorithm 1 for a batch of starting latents ``z_T`` with per-sample ``target`` values [B, m].

    Args:
        generate: (z, active) -> x, the differentiable (checkpointed) chain plus decoding of the latents z of
            the samples ``active`` (indices into the batch; converged samples are left out).
        optimizer: ``optimizer(params) -> torch.optim.Optimizer`` (SGD with momentum, Shampoo, Adam...).
        budget: B, the most iterations (each: one chain, the loss, and unless converged one optimiser step).
        tau: convergence threshold on the loss.
        lam: the loss weight lambda ("step size" in the seed).
        low_pass: F, or None for the unfiltered loss only.
        renormalize: rescale each z_T to its initial L2 norm after every step (as DiG-IN does).

    Returns per sample: ``x`` (best iterate), ``z_T`` (its latent), ``loss`` (best), ``iterations``
    (steps taken before converging, or B), ``converged`` (bool).
    """
    if budget < 1:
        raise ConfigError(f"the step budget B must be >= 1, got {budget}")
    if tau < 0 or lam <= 0:
        raise ConfigError(f"need tau >= 0 and lambda > 0, got tau={tau}, lambda={lam}")
    b = z_T.shape[0]
    params = [nn.Parameter(z_T[i : i + 1].detach().clone()) for i in range(b)]  # line 1, one tensor per sample
    init_norm = [p.detach().norm() for p in params]
    opt = optimizer(params)  # line 6
    done = torch.zeros(b, dtype=torch.bool)
    iterations = torch.full((b,), budget, dtype=torch.long)
    best_loss = torch.full((b,), float("inf"))
    best_x, best_z = None, z_T.detach().clone()
    for step in range(budget):  # line 8
        active = (~done).nonzero().flatten().tolist()
        with torch.enable_grad():
            z = torch.cat([params[i] for i in active])
            x = generate(z, active)  # lines 9-14
            loss, _, _ = evaluate(objective, x, target[active], lam, low_pass)  # lines 15-20
        # the iteration's one host read: convergence and the best iterates are decided on the host
        losses = loss.detach().cpu().tolist()
        if not all(math.isfinite(v) for v in losses):
            bad = [i for j, i in enumerate(active) if not math.isfinite(losses[j])]
            raise ConfigError(f"the invariance loss became non-finite at iteration {step} for batch items {bad}; the "
                              "optimiser diverged: lower its learning rate (optimizer.lr) or the loss weight lambda")
        if best_x is None:
            best_x = torch.zeros((b, *x.shape[1:]), dtype=x.dtype, device=x.device)
        for j, i in enumerate(active):  # keep each sample's best iterate
            if losses[j] < best_loss[i]:
                best_loss[i] = losses[j]
                best_x[i] = x[j].detach()
                best_z[i] = params[i].detach()[0]
        converged_now = [i for j, i in enumerate(active) if losses[j] < tau]  # line 21
        for i in converged_now:
            done[i], iterations[i] = True, step
        if callback is not None:
            callback(step, active, loss.detach())
        if done.all():
            break
        keep = torch.tensor([i not in converged_now for i in active], device=loss.device)
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            (loss * keep).sum().backward()  # line 24: gradients w.r.t. each sample's own z_T
        for i in converged_now:
            params[i].grad = None  # no step at all (momentum included) for a converged sample
        opt.step()  # line 25
        with torch.no_grad():
            for i in active:
                if renormalize and not done[i]:
                    params[i].mul_(init_norm[i] / params[i].norm().clamp_min(1e-12))
    return {"x": best_x, "z_T": best_z, "loss": best_loss, "iterations": iterations, "converged": done}
