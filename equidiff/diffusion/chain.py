"""The differentiable denoising chain, for optimisation through the sampler.

Invariant-set sampling optimises z_T through the whole deterministic DDIM chain (``ddim_chain``);
ACE noises an image to step tau and back-propagates through the DDPM chain from tau
(``ddpm_chain``, guided-diffusion's respacing and learned variance where the model has one). Both
need the chain as an ordinary differentiable function with O(1) activation memory in the number of
steps, which per-step gradient checkpointing gives (one extra forward per step on backward).

Noise (for eta > 0) is drawn *outside* the checkpointed function and passed in, so the
recomputation on backward sees exactly the same numbers (pitfalls A3: checkpoint RNG replay
covers only global RNG state, not our per-sample generators). The steps' numbers are computed once before the
loop (``DDIMSteps``, ``DDPMSteps``): the loops read no tensor on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from equidiff.diffusion.ddim import DDIMSteps
from equidiff.diffusion.ddpm import DDPMSteps, ddpm_scheduler
from equidiff.diffusion.schedulers import respaced_timesteps
from equidiff.utils.rng import PerSampleNoise


def chain_timesteps(scheduler, num_steps: int, spacing: str = "leading") -> torch.Tensor:
    """The respaced timesteps t_N > ... > t_1 a chain visits (``"leading"``: ``ddim_chain``'s, a fresh DDIMScheduler's;
    ``"guided_diffusion"``: guided-diffusion's ``space_timesteps``, see ``equidiff.diffusion.schedulers``)."""
    return respaced_timesteps(scheduler, num_steps, spacing)


def draw_chain_noise(
    shape: Sequence[int], generators: Sequence[torch.Generator], num_steps: int, *, start_index: int = 0,
    device=None, dtype=torch.float32,
) -> list[torch.Tensor]:
    """Per-step, per-sample noises z for a stochastic chain (eta > 0), drawn ahead of time (one stream per sample,
    ``equidiff.utils.rng.PerSampleNoise``)."""
    return PerSampleNoise(shape, generators, max(num_steps - start_index, 0), device=device, dtype=dtype).take(
        max(num_steps - start_index, 0))


def noise_to_step(x_0: torch.Tensor, scheduler, *, num_steps: int, start_index: int, noise: torch.Tensor,
                  spacing: str = "leading"):
    """q(x_tau | x_0): x_tau = sqrt(alpha_bar_tau) x_0 + sqrt(1 - alpha_bar_tau) eps (DDPM eq. 4).

    ``start_index`` indexes the respaced schedule (0 = the noisiest step t_N); ``noise`` is eps.
    Returns (x_tau, tau) with tau the training timestep.
    """
    _check_start(start_index, num_steps)
    timesteps = chain_timesteps(scheduler, num_steps, spacing)
    tau = timesteps[start_index]
    ab = scheduler.alphas_cumprod[int(tau)]  # a host scalar: no copy of the table to the device
    return ab.sqrt() * x_0 + (1 - ab).sqrt() * noise, tau


def ddim_chain(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_start: torch.Tensor,
    scheduler,
    *,
    num_steps: int,
    start_index: int = 0,
    eta: float = 0.0,
    noises: Sequence[torch.Tensor] | None = None,
    checkpoint: bool = True,
    scheduler_overrides: dict | None = None,
) -> torch.Tensor:
    """Run the DDIM chain from respaced step ``start_index`` to x_0, differentiably.

    ``start_index=0`` starts at z_T (the full chain); ``start_index=k`` starts at x_tau with
    tau = timesteps[k] (a partial chain, e.g. from ``noise_to_step``). With ``eta=0`` the chain
    is deterministic; with ``eta > 0`` pass ``noises`` (one tensor per remaining step, see
    ``draw_chain_noise``). With ``checkpoint=True`` and grad enabled, every step is wrapped in
    ``torch.utils.checkpoint`` (``use_reentrant=False``), so activation memory does not grow
    with the number of steps.
    """
    _check_start(start_index, num_steps)
    steps = DDIMSteps.build(scheduler, num_steps, eta=eta, device=x_start.device, overrides=scheduler_overrides)
    todo = range(start_index, len(steps))
    if eta > 0 and (noises is None or len(noises) != len(todo)):
        raise ValueError(f"eta={eta} needs one noise tensor per remaining step ({len(todo)}), "
                         f"got {None if noises is None else len(noises)}; use draw_chain_noise")

    def step(x_t, i, z):
        # one DDIM update x_t -> x_{t-1}; a pure function of its inputs (safe to recompute)
        return steps.step(i, model_fn(x_t, steps.timesteps[i]), x_t, z)[0]

    use_ckpt = checkpoint and torch.is_grad_enabled()
    x_t = x_start
    for k, i in enumerate(todo):
        z = noises[k] if eta > 0 else None
        x_t = _checkpoint(step, x_t, i, z, use_reentrant=False) if use_ckpt else step(x_t, i, z)
    return x_t


def ddpm_chain(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_start: torch.Tensor,
    scheduler,
    *,
    timesteps: Sequence[int] | torch.Tensor,
    noises: Sequence[torch.Tensor | None],
    checkpoint: bool = True,
    scheduler_overrides: dict | None = None,
) -> torch.Tensor:
    """Run DDPM ancestral steps from x_{timesteps[0]} down to x_0, differentiably.

    ``timesteps``: the descending training timesteps to visit, the tail of a respaced chain (e.g.
    ``chain_timesteps(s, 25, "guided_diffusion")[20:]``); each step goes to the next one, the last to
    x_0. ``model_fn`` returns eps, or eps and learned variance values (2C channels; ``ddpm_step``).
    ``noises``: one per step, None where t = 0 (``draw_ddpm_noise``), drawn outside the checkpointed
    steps. ``scheduler_overrides`` apply to the fresh ``DDPMScheduler`` (e.g. ``{"clip_sample": True}``
    for guided-diffusion's ``clip_denoised``).
    """
    timesteps = torch.as_tensor(timesteps).long().reshape(-1)
    if len(noises) != len(timesteps) or any(z is None for z, t in zip(noises, timesteps.tolist(), strict=True)
                                             if t > 0):
        raise ValueError(f"the DDPM chain needs one noise per step with t > 0 ({len(timesteps)} steps over "
                         f"{timesteps.tolist()}); use draw_ddpm_noise")
    steps = DDPMSteps.build(ddpm_scheduler(scheduler, timesteps, overrides=scheduler_overrides), device=x_start.device)
    return run_ddpm_steps(model_fn, x_start, steps, noises, checkpoint=checkpoint)


def run_ddpm_steps(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_start: torch.Tensor,
                   steps: DDPMSteps, noises: Sequence[torch.Tensor | None], *, checkpoint: bool = True) -> torch.Tensor:
    """``ddpm_chain`` over prebuilt ``steps`` (for a caller running the same chain many times, e.g. ACE's PGD)."""

    def step(x_t, i, z):
        # one ancestral step x_t -> x_{t'}; a pure function of its inputs (safe to recompute)
        return steps.step(i, model_fn(x_t, steps.timesteps[i]), x_t, z)[0]

    use_ckpt = checkpoint and torch.is_grad_enabled()
    x_t = x_start
    for i, z in enumerate(noises):
        x_t = _checkpoint(step, x_t, i, z, use_reentrant=False) if use_ckpt else step(x_t, i, z)
    return x_t


def _check_start(start_index: int, num_steps: int) -> None:
    if not 0 <= start_index < num_steps:
        raise ValueError(f"start_index (tau) must be in [0, {num_steps - 1}] for a {num_steps}-step chain, "
                         f"got {start_index}")
