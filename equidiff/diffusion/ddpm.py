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
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

from equidiff.diffusion.schedulers import fresh_scheduler, respaced_timesteps
from equidiff.utils.rng import PerSampleNoise

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


@dataclass(frozen=True)
class DDPMSteps:
    """The per-step numbers of a DDPM chain over a scheduler's timesteps: fp32 tensors ``[n]`` on the device.

    Computed once on the host, with the expressions of ``DDPMScheduler.step`` / ``_get_variance`` on 0-d fp32
    tensors as there, and moved to the device in one copy: the loop (``step``) reads no tensor on the host.
    ``host_timesteps`` are the same timesteps on the host (step i adds noise when t > 0). For a fixed variance
    type ``std[i]`` is the step's standard deviation; for ``learned_range`` the model's v interpolates
    ``min_log[i]`` (log beta~_t) and ``max_log[i]`` (log beta_t).
    """

    scheduler: DDPMScheduler
    timesteps: torch.Tensor
    host_timesteps: tuple[int, ...]
    sqrt_one_minus_alpha_bar: torch.Tensor
    sqrt_alpha_bar: torch.Tensor
    coef_x0: torch.Tensor
    coef_xt: torch.Tensor
    std: torch.Tensor
    min_log: torch.Tensor
    max_log: torch.Tensor

    @classmethod
    def build(cls, sched: DDPMScheduler, *, device=None, timesteps: Sequence[int] | None = None) -> DDPMSteps:
        """The steps of ``sched`` (set to its timesteps, e.g. by ``ddpm_scheduler``), or of the listed ``timesteps``."""
        ts = [int(t) for t in (sched.timesteps.tolist() if timesteps is None else timesteps)]
        fixed = sched.config.variance_type
        rows = []
        for t in ts:
            prev_t = int(sched.previous_timestep(t))
            ab_t = sched.alphas_cumprod[t]
            ab_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.one
            beta_prod_t, beta_prod_prev = 1 - ab_t, 1 - ab_prev
            alpha_t = ab_t / ab_prev  # the respaced chain's alpha_t and beta_t (guided-diffusion's SpacedDiffusion)
            beta_t = 1 - alpha_t
            # the posterior variance beta~_t, clamped as _get_variance does before taking its log
            post = ((1 - ab_prev) / (1 - ab_t) * beta_t).clamp(min=1e-20)
            if fixed in _LEARNED:
                std = torch.tensor(float("nan"))  # given by the model's v in the step
            else:
                var = sched._get_variance(t, variance_type=fixed)
                std = var if fixed == "fixed_small_log" else var ** (0.5)  # fixed_small_log: already a std
            rows.append((beta_prod_t ** (0.5), ab_t ** (0.5), ab_prev ** (0.5) * beta_t / beta_prod_t,
                         alpha_t ** (0.5) * beta_prod_prev / beta_prod_t, std, torch.log(post), torch.log(beta_t)))
        cols = [torch.stack(c).to(device) for c in zip(*rows, strict=True)]
        return cls(sched, torch.tensor(ts, dtype=torch.long).to(device), tuple(ts), *cols)

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def has_noise(self) -> tuple[bool, ...]:
        """Whether each step adds noise (t > 0; the step to x_0 adds none, as in diffusers and guided-diffusion)."""
        return tuple(t > 0 for t in self.host_timesteps)

    def step(self, i: int, model_output: torch.Tensor, x_t: torch.Tensor,
             noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Step i, x_t -> x_{t'}; returns (x_{t'}, x0_hat). ``model_output``: eps, or eps and v (module docstring)."""
        cfg = self.scheduler.config
        c = x_t.shape[1]
        if model_output.shape[1] == 2 * c:
            eps, v = model_output.split(c, dim=1)
            variance_type = "learned_range"
        elif model_output.shape[1] == c:
            eps, v, variance_type = model_output, None, cfg.variance_type
            if variance_type in _LEARNED:
                raise ValueError(f"variance_type={variance_type!r} needs the model's variance values: give a model "
                                 "function returning eps and v (2C channels)")
        else:
            raise ValueError(f"the model output has {model_output.shape[1]} channels for a {c}-channel sample; "
                             f"expected eps ({c}) or eps and learned variance values ({2 * c})")
        # eq. 15: x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), clipped (clip_denoised)
        x0_hat = (x_t - self.sqrt_one_minus_alpha_bar[i] * eps) / self.sqrt_alpha_bar[i]
        if cfg.thresholding:
            x0_hat = self.scheduler._threshold_sample(x0_hat)
        elif cfg.clip_sample:
            x0_hat = x0_hat.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        # eq. 7: the posterior mean mu~(x_t, x0_hat)
        mean = self.coef_x0[i] * x0_hat + self.coef_xt[i] * x_t
        if self.host_timesteps[i] > 0:
            if noise is None:
                raise ValueError(f"the DDPM step at t={self.host_timesteps[i]} needs its noise")
            if variance_type == "learned_range":  # log Sigma = frac log beta_t + (1 - frac) log beta~_t (eq. 15)
                frac = (v + 1) / 2
                std = torch.exp(0.5 * (frac * self.max_log[i] + (1 - frac) * self.min_log[i]))
            elif variance_type == "learned":  # diffusers' reading of the raw v as the variance
                std = v ** (0.5)
            else:
                std = self.std[i]
            mean = mean + std * noise
        return mean, x0_hat


def ddpm_step(sched: DDPMScheduler, model_output: torch.Tensor, t, x_t: torch.Tensor,
              noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step x_t -> x_{t'} to the scheduler's previous timestep t'; returns (x_{t'}, x0_hat).

    Equal to ``DDPMScheduler.step`` drawing the same ``noise`` (tested bit for bit). It is written out
    because ``DDPMScheduler.step`` draws its noise itself and takes no ``variance_noise``, while the
    differentiable chain must draw it outside the checkpointed step (its recomputation would draw
    again) and per sample; and because it reads the timestep on the host. ``noise`` is ignored (may be None)
    at t = 0, where no noise is added, as in diffusers and guided-diffusion. ``model_output``: eps, or eps and v
    (module docstring). This one-step form reads t on the host; loops use ``DDPMSteps`` (no host sync).
    """
    steps = DDPMSteps.build(sched, device=x_t.device, timesteps=[int(t)])
    return steps.step(0, model_output, x_t, noise)


def draw_ddpm_noise(shape: Sequence[int], generators: Sequence[torch.Generator],
                    timesteps: Sequence[int] | torch.Tensor, *, device=None,
                    dtype=torch.float32) -> list[torch.Tensor | None]:
    """The step noises of a DDPM chain over ``timesteps``, per sample: one z per step with t > 0, None at t = 0
    (drawn as one stream per sample, ``equidiff.utils.rng.PerSampleNoise``)."""
    ts = [int(t) for t in timesteps]
    noise = PerSampleNoise(shape, generators, sum(t > 0 for t in ts), device=device, dtype=dtype)
    return [noise.next() if t > 0 else None for t in ts]


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
    n = num_steps or scheduler.config.num_train_timesteps
    sched = ddpm_scheduler(scheduler, respaced_timesteps(scheduler, n, spacing), overrides=scheduler_overrides)
    steps = DDPMSteps.build(sched, device=x_T.device)
    has_noise = steps.has_noise
    noise = PerSampleNoise(x_T.shape[1:], generators, sum(has_noise), device=x_T.device, dtype=x_T.dtype,
                           transient=True)
    x_t = x_T
    for i in range(len(steps)):
        t = steps.timesteps[i]
        # 4. x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta) + sigma_t z
        out = model_fn(x_t, t)
        x_t, x0_hat = steps.step(i, out, x_t, noise.next() if has_noise[i] else None)
        if callback is not None:
            callback(i, t, x_t, x0_hat)
    return x_t
