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


def check_num_steps(scheduler, num_steps, *, eta=None, tau=None, name: str = "num_steps") -> None:
    """Check a chain's settings against the scheduler its model was trained with, at build time.

    diffusers checks ``num_steps <= num_train_timesteps`` only in ``set_timesteps``, i.e. once a run is going;
    ``eta`` (DDIM: 0 deterministic, 1 DDPM-like) it does not check. ``num_steps=None`` means all training steps.
    ``tau`` counts steps of the chain from its clean end (ACE), so 1 <= tau <= num_steps.
    """
    from equidiff.errors import ConfigError

    total = int(scheduler.config.num_train_timesteps)
    prefix = name.rpartition(".")[0]
    prefix = f"{prefix}." if prefix else ""
    if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int)
                                  or not 1 <= num_steps <= total):
        raise ConfigError(f"{name}={num_steps!r}: the diffusion model was trained with {total} steps, so its "
                          f"sampling chain takes 1 to {total} steps; set {name} in that range")
    if eta is not None and not 0 <= float(eta) <= 1:
        raise ConfigError(f"{prefix}eta={eta!r}: DDIM's eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like)")
    steps = total if num_steps is None else num_steps
    if tau is not None and not 1 <= tau <= steps:
        raise ConfigError(f"{prefix}tau={tau!r}: tau counts steps of the {steps}-step chain, so 1 <= tau <= {steps}")
