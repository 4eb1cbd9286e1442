"""Helpers over diffusers schedulers (never re-implemented, only rebuilt fresh)."""

from __future__ import annotations

import torch


def fresh_scheduler(scheduler, cls=None, overrides: dict | None = None):
    """A new scheduler of class ``cls`` (default: the same class) from ``scheduler``'s config.

    diffusers schedulers keep state (``set_timesteps``); samplers and the differentiable chain
    rebuild one per call so that optimisation iterations and concurrent samplers never share it.
    """
    cls = cls or type(scheduler)
    return cls.from_config(scheduler.config, **(overrides or {}))


def alpha_bar(scheduler, t: torch.Tensor | int) -> torch.Tensor:
    """alpha_bar_t of a diffusers scheduler at training timestep(s) t."""
    ab = scheduler.alphas_cumprod
    t = torch.as_tensor(t, device=ab.device).long()
    return ab[t]
