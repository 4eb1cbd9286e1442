"""DDIM sampling (Song, Meng & Ermon 2021) over a diffusers scheduler."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers import DDIMScheduler

from equidiff.diffusion.schedulers import fresh_scheduler
from equidiff.utils.rng import randn_per_sample

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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

    ``model_fn(x_t, t) -> eps`` predicts the noise. ``scheduler`` is only read: a fresh
    ``DDIMScheduler`` is built from its config for every call (as ``DDIMPipeline`` does), so
    no state leaks between calls. With ``eta > 0`` the step noise is drawn from ``generators``
    (one per sample, in the order diffusers draws it), so a sample depends on its seed alone.
    No grad mode is set here: the caller decides.
    """
    if eta > 0 and (generators is None or len(generators) != x_T.shape[0]):
        raise ValueError(f"eta={eta} needs one generator per sample ({x_T.shape[0]}), got "
                         f"{None if generators is None else len(generators)}")
    sched = fresh_scheduler(scheduler, DDIMScheduler, scheduler_overrides)
    sched.set_timesteps(num_steps, device=x_T.device)
    x_t = x_T
    for i, t in enumerate(sched.timesteps):
        # 1. eps_theta(x_t, t)
        eps = model_fn(x_t, t)
        # 2. x_{t-1} = sqrt(a_{t-1}) x0_hat + sqrt(1 - a_{t-1} - sigma_t^2) eps + sigma_t z   (eq. 12)
        z = None
        if eta > 0:
            z = randn_per_sample(x_t.shape[1:], generators, device=x_t.device, dtype=x_t.dtype)
        out = sched.step(eps, t, x_t, eta=eta, use_clipped_model_output=use_clipped_model_output,
                         variance_noise=z)
        x_t = out.prev_sample
        if callback is not None:
            callback(i, t, x_t, out.pred_original_sample)
    return x_t
