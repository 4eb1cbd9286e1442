"""DDIM sampling (Song, Meng & Ermon 2021) over a diffusers scheduler, with no host sync in the loop.

``DDIMSteps`` holds the numbers of every step of a chain (alpha_bar_t, alpha_bar_{t-1}, sigma_t and the
direction coefficient of eq. 12), computed once on the host from a fresh ``DDIMScheduler`` with diffusers'
own formulas and moved to the device in one copy. ``DDIMScheduler.step`` itself is not called in the loop: it
indexes the scheduler's CPU ``alphas_cumprod`` with the (device) timestep and branches on
``prev_timestep >= 0``, two host syncs per step on a GPU. ``DDIMSteps.step`` is the same arithmetic on the
precomputed numbers, equal to ``DDIMScheduler.step`` bit for bit on the CPU (tests/diffusion/test_samplers.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from equidiff.diffusion.schedulers import fresh_scheduler
from equidiff.utils.rng import PerSampleNoise

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DDIMSteps:
    """The per-step numbers of a ``num_steps`` DDIM chain, fp32 tensors ``[n]`` on the sampling device.

    ``timesteps[i]`` is the training timestep t of step i (the value given to the model), ``sqrt_alpha_bar``,
    ``sqrt_one_minus_alpha_bar`` and ``sqrt_alpha_bar_prev`` those of t and of t - T/n (``final_alpha_cumprod``
    past the end), ``sigma`` = eta sqrt(var_t) (eq. 16) and ``direction`` = sqrt(1 - alpha_bar_prev - sigma^2).
    """

    scheduler: DDIMScheduler
    timesteps: torch.Tensor
    sqrt_alpha_bar: torch.Tensor
    sqrt_one_minus_alpha_bar: torch.Tensor
    sqrt_alpha_bar_prev: torch.Tensor
    direction: torch.Tensor
    sigma: torch.Tensor
    eta: float
    use_clipped_model_output: bool

    @classmethod
    def build(cls, scheduler, num_steps: int, *, eta: float = 0.0, device=None, overrides: dict | None = None,
              use_clipped_model_output: bool | None = None) -> DDIMSteps:
        """The steps of a fresh ``DDIMScheduler`` from ``scheduler``'s config (+ ``overrides``) for ``num_steps``."""
        sched = fresh_scheduler(scheduler, DDIMScheduler, overrides)
        sched.set_timesteps(num_steps)  # on the host: the numbers below are read here, once
        stride = sched.config.num_train_timesteps // sched.num_inference_steps
        rows = []
        for t in sched.timesteps.tolist():
            # the expressions of DDIMScheduler.step and _get_variance, on 0-d fp32 tensors as there
            prev = t - stride
            ab = sched.alphas_cumprod[t]
            ab_prev = sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
            beta_prod = 1 - ab
            std = eta * sched._get_variance(t, prev) ** (0.5)
            rows.append((ab ** (0.5), beta_prod ** (0.5), ab_prev ** (0.5), (1 - ab_prev - std**2) ** (0.5), std))
        cols = [torch.stack(c).to(device) for c in zip(*rows, strict=True)]
        return cls(sched, sched.timesteps.to(device), *cols, eta=float(eta),
                   use_clipped_model_output=bool(use_clipped_model_output))

    def __len__(self) -> int:
        return len(self.timesteps)

    def step(self, i: int, eps: torch.Tensor, x_t: torch.Tensor,
             z: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Step i, x_t -> x_{t-1}, given eps_theta(x_t, t) and (eta > 0) the noise z; returns (x_{t-1}, x0_hat)."""
        cfg = self.scheduler.config
        # eq. 12: x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
        x0_hat = (x_t - self.sqrt_one_minus_alpha_bar[i] * eps) / self.sqrt_alpha_bar[i]
        if cfg.thresholding:
            x0_hat = self.scheduler._threshold_sample(x0_hat)
        elif cfg.clip_sample:
            x0_hat = x0_hat.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        if self.use_clipped_model_output:  # eps re-derived from the clipped x0_hat
            eps = (x_t - self.sqrt_alpha_bar[i] * x0_hat) / self.sqrt_one_minus_alpha_bar[i]
        # x_{t-1} = sqrt(alpha_bar_{t-1}) x0_hat + sqrt(1 - alpha_bar_{t-1} - sigma_t^2) eps + sigma_t z
        x_prev = self.sqrt_alpha_bar_prev[i] * x0_hat + self.direction[i] * eps
        if self.eta > 0:
            if z is None:
                raise ValueError(f"the DDIM step with eta={self.eta} needs its noise z")
            x_prev = x_prev + self.sigma[i] * z
        return x_prev, x0_hat


def sample_ddim(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    scheduler,
    *,
    num_steps: int = 50,
    eta: float = 0.0,
    generators: Sequence[torch.Generator] | None = None,
    use_clipped_model_output: bool | None = None,
    scheduler_overrides: dict | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Sample x_0 from x_T with DDIM (eq. 12 of the DDIM paper), ``eta`` in [0, 1].

    ``model_fn(x_t, t) -> eps`` predicts the noise; t is the training timestep as a 0-d tensor on x_T's device.
    ``scheduler`` is only read: a fresh ``DDIMScheduler`` is built from its config for every call (as
    ``DDIMPipeline`` does), so no state leaks between calls. With ``eta > 0`` the step noise is drawn from
    ``generators`` (one per sample, ``equidiff.utils.rng.PerSampleNoise``), so a sample depends on its seed alone.
    The loop reads no tensor on the host (``DDIMSteps``). No grad mode is set here: the caller decides.
    """
    if eta > 0 and (generators is None or len(generators) != x_T.shape[0]):
        raise ValueError(f"eta={eta} needs one generator per sample ({x_T.shape[0]}), got "
                         f"{None if generators is None else len(generators)}")
    steps = DDIMSteps.build(scheduler, num_steps, eta=eta, device=x_T.device, overrides=scheduler_overrides,
                            use_clipped_model_output=use_clipped_model_output)
    noise = (PerSampleNoise(x_T.shape[1:], generators, len(steps), device=x_T.device, dtype=x_T.dtype,
                            transient=True) if eta > 0 else None)
    x_t = x_T
    for i in range(len(steps)):
        t = steps.timesteps[i]
        # 1. eps_theta(x_t, t)
        eps = model_fn(x_t, t)
        # 2. x_{t-1} = sqrt(a_{t-1}) x0_hat + sqrt(1 - a_{t-1} - sigma_t^2) eps + sigma_t z   (eq. 12)
        x_t, x0_hat = steps.step(i, eps, x_t, noise.next() if noise is not None else None)
        if callback is not None:
            callback(i, t, x_t, x0_hat)
    return x_t
