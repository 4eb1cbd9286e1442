"""DDPM ancestral sampling (Ho, Jain & Abbeel 2020, Algorithm 2) over a diffusers scheduler.

The model function returns eps (C channels, the one protocol), or eps followed by the learned variance
values v of a guided-diffusion (ADM) model trained with ``learn_sigma`` (2C channels, the layout
diffusers' ``DDPMScheduler`` splits for ``variance_type="learned_range"``; ``UNetBackbone(..., with_variance=
True)`` returns it). With 2C channels the step's variance is guided-diffusion's interpolated one (Nichol &
Dhariwal 2021, eq. 15): log Sigma = frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1) / 2, with beta_t and
the posterior variance beta~_t of the (respaced) chain; with C channels it is the scheduler's ``variance_type``
(``fixed_small``: beta~_t). Every other sampler takes eps only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers import DDPMScheduler

from equidiff.diffusion.schedulers import fresh_scheduler, respaced_timesteps
from equidiff.utils.rng import randn_per_sample

_LEARNED = ("learned", "learned_range")


def ddpm_scheduler(scheduler, timesteps: Sequence[int] | torch.Tensor, *, overrides: dict | None = None,
                   device=None) -> DDPMScheduler:
    """A fresh ``DDPMScheduler`` from ``scheduler``'s config, set to the descending ``timesteps``.

    ``prediction_type`` is forced to ``epsilon``: equidiff's model functions return eps whatever the network
    predicts (``backbones._to_eps``). ``overrides`` (e.g. ``clip_sample``) apply on top.
    """
    sched = fresh_scheduler(scheduler, DDPMScheduler, {"prediction_type": "epsilon", **(overrides or {})})
    sched.set_timesteps(timesteps=[int(t) for t in timesteps], device=device)
    return sched


def ddpm_step(sched: DDPMScheduler, model_output: torch.Tensor, t, x_t: torch.Tensor,
              noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step x_t -> x_{t'} to the scheduler's previous timestep t'; returns (x_{t'}, x0_hat).

    Equal to ``DDPMScheduler.step`` drawing the same ``noise`` (tested bit for bit). It is written out
    because ``DDPMScheduler.step`` draws its noise itself and takes no ``variance_noise``, while the
    differentiable chain must draw it outside the checkpointed step (its recomputation would draw
    again) and per sample. ``noise`` is ignored (may be None) at t = 0, where no noise is added, as in
    diffusers and guided-diffusion. ``model_output``: eps, or eps and v (module docstring).
    """
    c = x_t.shape[1]
    if model_output.shape[1] == 2 * c:
        eps, v = model_output.split(c, dim=1)
        variance_type = "learned_range"
    elif model_output.shape[1] == c:
        eps, v, variance_type = model_output, None, sched.config.variance_type
        if variance_type in _LEARNED:
            raise ValueError(f"variance_type={variance_type!r} needs the model's variance values: give a model "
                             "function returning eps and v (2C channels)")
    else:
        raise ValueError(f"the model output has {model_output.shape[1]} channels for a {c}-channel sample; expected "
                         f"eps ({c}) or eps and learned variance values ({2 * c})")
    prev_t = sched.previous_timestep(t)
    ab_t = sched.alphas_cumprod[t]
    ab_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.one
    beta_prod_t, beta_prod_prev = 1 - ab_t, 1 - ab_prev
    alpha_t = ab_t / ab_prev  # the respaced chain's alpha_t and beta_t (guided-diffusion's SpacedDiffusion)
    beta_t = 1 - alpha_t
    # eq. 15: x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), clipped (clip_denoised)
    x0_hat = (x_t - beta_prod_t ** (0.5) * eps) / ab_t ** (0.5)
    if sched.config.thresholding:
        x0_hat = sched._threshold_sample(x0_hat)
    elif sched.config.clip_sample:
        x0_hat = x0_hat.clamp(-sched.config.clip_sample_range, sched.config.clip_sample_range)
    # eq. 7: the posterior mean mu~(x_t, x0_hat)
    mean = (ab_prev ** (0.5) * beta_t / beta_prod_t) * x0_hat + (alpha_t ** (0.5) * beta_prod_prev / beta_prod_t) * x_t
    if t > 0:
        if noise is None:
            raise ValueError(f"the DDPM step at t={int(t)} needs its noise")
        var = sched._get_variance(t, predicted_variance=v, variance_type=variance_type)
        if variance_type == "learned_range":  # a log-variance
            std = torch.exp(0.5 * var)
        elif variance_type == "fixed_small_log":  # already a standard deviation
            std = var
        else:
            std = var ** (0.5)
        mean = mean + std * noise
    return mean, x0_hat


def draw_ddpm_noise(shape: Sequence[int], generators: Sequence[torch.Generator],
                    timesteps: Sequence[int] | torch.Tensor, *, device=None,
                    dtype=torch.float32) -> list[torch.Tensor | None]:
    """The step noises of a DDPM chain over ``timesteps``, per sample: one z per step with t > 0, None at t = 0."""
    return [randn_per_sample(shape, generators, device=device, dtype=dtype) if int(t) > 0 else None
            for t in timesteps]


def sample_ddpm(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    scheduler,
    *,
    num_steps: int | None = None,
    generators: Sequence[torch.Generator],
    spacing: str = "leading",
    scheduler_overrides: dict | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Ancestral sampling x_T -> x_0; ``num_steps`` respaces the chain (None: all training steps).

    ``model_fn(x_t, t) -> eps`` (or eps and v, module docstring). ``spacing``: ``"leading"`` (diffusers'
    ``DDPMPipeline``, equal to it bit for bit) or ``"guided_diffusion"`` (guided-diffusion's
    ``space_timesteps``), see ``equidiff.diffusion.schedulers``. ``scheduler_overrides`` (e.g.
    ``{"clip_sample": True}``) apply to the fresh ``DDPMScheduler`` built for the call. The step noise z of
    Algorithm 2, line 3 is drawn from the per-sample ``generators``, so a sample depends on its seed alone.
    """
    if generators is None or len(generators) != x_T.shape[0]:
        raise ValueError(f"DDPM sampling needs one generator per sample ({x_T.shape[0]}), got "
                         f"{None if generators is None else len(generators)}")
    steps = num_steps or scheduler.config.num_train_timesteps
    sched = ddpm_scheduler(scheduler, respaced_timesteps(scheduler, steps, spacing), overrides=scheduler_overrides,
                           device=x_T.device)
    x_t = x_T
    for i, t in enumerate(sched.timesteps):
        # 4. x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta) + sigma_t z
        out = model_fn(x_t, t)
        z = randn_per_sample(x_t.shape[1:], generators, device=x_t.device, dtype=x_t.dtype) if t > 0 else None
        x_t, x0_hat = ddpm_step(sched, out, t, x_t, z)
        if callback is not None:
            callback(i, t, x_t, x0_hat)
    return x_t
