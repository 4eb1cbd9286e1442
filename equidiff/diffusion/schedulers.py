"""Helpers over diffusers schedulers (never re-implemented, only rebuilt fresh), and timestep respacing.

Which spacing each sampler uses (``spacing`` below):

* ``sample_ddim``, ``ddim_chain`` and ``sample_ddpm`` default to diffusers' ``"leading"`` spacing (t = 0, T/N,
  ..., the ``DDIMPipeline`` / ``DDPMPipeline`` timesteps), the reference for the methods built on diffusers
  (robust-energy guidance, invariant-set sampling, the digits demos).
* ACE (``equidiff.explain.ace``) uses guided-diffusion's ``space_timesteps`` (``"guided_diffusion"``), the
  respacing of its authors' code (ACE and DiME run guided-diffusion's ``SpacedDiffusion``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDPMScheduler

from equidiff.errors import ConfigError

DIFFUSERS_SPACINGS = ("leading", "trailing", "linspace")
SPACINGS = (*DIFFUSERS_SPACINGS, "guided_diffusion", "guided_diffusion_ddim")


def fresh_scheduler(scheduler, cls=None, overrides: dict | None = None):
    """A new scheduler of class ``cls`` (default: the same class) from ``scheduler``'s config.

    diffusers schedulers keep state (``set_timesteps``); samplers and the differentiable chain
    rebuild one per call so that optimisation iterations and concurrent samplers never share it.
    """
    cls = cls or type(scheduler)
    if getattr(scheduler, "is_flow_matching", False) and not getattr(cls, "is_flow_matching", False):
        # from_config would silently build a default DDPM/DDIM schedule for a flow model
        raise ConfigError(f"a flow-matching backbone (LightningDiT) cannot run a {cls.__name__} sampler or chain; use "
                          "sampler=flow (equidiff.diffusion.sample_flow) and the flow chain (flow_chain)")
    return cls.from_config(scheduler.config, **(overrides or {}))


def alpha_bar(scheduler, t: torch.Tensor | int) -> torch.Tensor:
    """alpha_bar_t of a diffusers scheduler at training timestep(s) t."""
    ab = scheduler.alphas_cumprod
    t = torch.as_tensor(t, device=ab.device).long()
    return ab[t]


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """The training timesteps guided-diffusion keeps when it respaces a ``num_timesteps`` chain, ascending.

    guided-diffusion's rule (``respace.space_timesteps``; diffusers has no equivalent spacing):

    * ``"N1,N2,..."`` (or a list): split [0, T) into as many equal sections as counts (the first
      T mod k sections one step longer) and take N_i points of section i at the fractional stride
      (size - 1) / (N_i - 1) from its start, each rounded with Python's ``round`` (half to even), so a
      section's first and last steps are both kept. ``"25"`` of 1000 gives 0, 42, 83, 125, 166, ..., 999.
    * ``"ddimN"``: every s-th step from 0, for the smallest stride s giving exactly N steps
      (``"ddim25"`` of 1000: 0, 40, ..., 960, the same as diffusers' ``"leading"``).
    """
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            wanted = _count(text[4:], section_counts, minimum=1)
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == wanted:
                    return list(range(0, num_timesteps, stride))
            raise ConfigError(f"{section_counts!r}: no fixed stride gives exactly {wanted} of {num_timesteps} steps; "
                              "use plain section counts (e.g. '25') instead")
        counts = [_count(part, section_counts) for part in text.split(",")]
    else:
        counts = [_count(c, section_counts) for c in section_counts]
    if not counts or sum(counts) < 1:
        raise ConfigError(f"timestep respacing {section_counts!r} keeps no step")
    base, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if count > size:
            raise ConfigError(f"cannot take {count} steps from a section of {size} steps ({section_counts!r} of "
                              f"{num_timesteps})")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        position = 0.0
        for _ in range(count):  # accumulated, as guided-diffusion does (the rounding of .5 cases depends on it)
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


def _count(text, whole, minimum: int = 0) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"timestep respacing {whole!r}: expected comma-separated step counts or 'ddimN'") from None
    if value < minimum:
        raise ConfigError(f"timestep respacing {whole!r}: step counts must be >= {minimum}")
    return value


def respaced_timesteps(scheduler, num_steps: int, spacing: str = "leading") -> torch.Tensor:
    """The descending training timesteps t_N > ... > t_1 of a ``num_steps`` chain under ``spacing``.

    ``"leading"``, ``"trailing"``, ``"linspace"``: diffusers' ``set_timesteps`` (with the scheduler's
    ``steps_offset``); ``"guided_diffusion"``: ``space_timesteps(T, str(num_steps))``;
    ``"guided_diffusion_ddim"``: ``space_timesteps(T, f"ddim{num_steps}")``.
    """
    n_train = int(scheduler.config.num_train_timesteps)
    if not 1 <= int(num_steps) <= n_train:
        raise ConfigError(f"num_steps must be in [1, {n_train}] (the training steps), got {num_steps}")
    if spacing in DIFFUSERS_SPACINGS:
        sched = fresh_scheduler(scheduler, DDPMScheduler, {"timestep_spacing": spacing})
        sched.set_timesteps(int(num_steps))
        return sched.timesteps.clone()
    if spacing == "guided_diffusion":
        kept = space_timesteps(n_train, str(int(num_steps)))
    elif spacing == "guided_diffusion_ddim":
        kept = space_timesteps(n_train, f"ddim{int(num_steps)}")
    else:
        raise ConfigError(f"unknown timestep spacing {spacing!r}; choose one of {SPACINGS}")
    return torch.tensor(kept[::-1], dtype=torch.long)


def check_num_steps(scheduler, num_steps, *, eta=None, tau=None, name: str = "num_steps") -> None:
    """Check a chain's settings against the scheduler its model was trained with, at build time.

    diffusers checks ``num_steps <= num_train_timesteps`` only in ``set_timesteps``, i.e. once a run is going;
    ``eta`` (DDIM: 0 deterministic, 1 DDPM-like) it does not check. ``num_steps=None`` means all training steps.
    ``tau`` counts steps of the chain from its clean end (ACE), so 1 <= tau <= num_steps.
    """
    from equidiff.errors import ConfigError

    prefix = name.rpartition(".")[0]
    prefix = f"{prefix}." if prefix else ""
    if "num_train_timesteps" not in scheduler.config:  # a continuous-time (flow) model: num_steps counts grid points
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2):
            raise ConfigError(f"{name}={num_steps!r}: a flow ODE grid needs at least 2 points (num_steps - 1 steps)")
        if tau is not None and num_steps is not None and not 1 <= tau <= num_steps:
            raise ConfigError(f"{prefix}tau={tau!r}: tau counts steps of the chain, so 1 <= tau <= {num_steps}")
        return
    total = int(scheduler.config.num_train_timesteps)
    if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int)
                                  or not 1 <= num_steps <= total):
        raise ConfigError(f"{name}={num_steps!r}: the diffusion model was trained with {total} steps, so its "
                          f"sampling chain takes 1 to {total} steps; set {name} in that range")
    if eta is not None and not 0 <= float(eta) <= 1:
        raise ConfigError(f"{prefix}eta={eta!r}: DDIM's eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like)")
    steps = total if num_steps is None else num_steps
    if tau is not None and not 1 <= tau <= steps:
        raise ConfigError(f"{prefix}tau={tau!r}: tau counts steps of the {steps}-step chain, so 1 <= tau <= {steps}")
