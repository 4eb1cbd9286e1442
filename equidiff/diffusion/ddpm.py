"""DDPM ancestral sampling (Ho, Jain & Abbeel 2020, Algorithm 2) over a diffusers scheduler."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers import DDPMScheduler

from equidiff.diffusion.schedulers import fresh_scheduler


def sample_ddpm(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    scheduler,
    *,
    num_steps: int | None = None,
    generators: Sequence[torch.Generator],
    scheduler_overrides: dict | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Ancestral sampling x_T -> x_0; ``num_steps`` respaces the chain (None: all training steps).

    ``model_fn(x_t, t) -> eps``. The step noise z ~ N(0, I) of Algorithm 2, line 3 is drawn from
    the per-sample ``generators`` (diffusers draws each sample with its own generator), so a
    sample depends on its seed alone. A fresh ``DDPMScheduler`` is built for every call.
    """
    if generators is None or len(generators) != x_T.shape[0]:
        raise ValueError(f"DDPM sampling needs one generator per sample ({x_T.shape[0]}), got "
                         f"{None if generators is None else len(generators)}")
    sched = fresh_scheduler(scheduler, DDPMScheduler, scheduler_overrides)
    sched.set_timesteps(num_steps or sched.config.num_train_timesteps, device=x_T.device)
    gens = list(generators)
    x_t = x_T
    for i, t in enumerate(sched.timesteps):
        # 4. x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta) + sigma_t z
        eps = model_fn(x_t, t)
        out = sched.step(eps, t, x_t, generator=gens if len(gens) > 1 else gens[0])
        x_t = out.prev_sample
        if callback is not None:
            callback(i, t, x_t, out.pred_original_sample)
    return x_t
