"""Flow-matching sampling on the linear path (SiT / LightningDiT): the time grid, Euler and Heun, the chain.

Convention (SiT's ``transport``, which LightningDiT trains and samples with): time t runs from noise (t = 0)
to data (t = 1) along the linear path

    x_t = t x + (1 - t) eps,    eps ~ N(0, I),

and the network predicts the velocity v(x_t, t) = dx_t/dt = x - eps. A flow model's model function is
``model_fn(x_t, t) -> v`` with t a float in [0, 1] (not a training index): the flow counterpart of the
eps protocol of the DDPM backbones. Sampling integrates the probability-flow ODE dx/dt = v(x, t) from
x_0 = z_T ~ N(0, I) at t = 0 to the data end t = 1 over a fixed grid (``FlowMatchScheduler.time_grid``):

    euler:  x_{k+1} = x_k + (t_{k+1} - t_k) v(x_k, t_k)
    heun2:  k1 = v(x_k, t_k),  k2 = v(x_k + dt k1, t_{k+1}),  x_{k+1} = x_k + dt (k1 / 2 + k2 / 2)

(torchdiffeq's fixed-grid ``euler`` and ``heun2``, which the reference's ``odeint`` call runs). The DDIM update
on this path *is* the Euler step: with alpha_t = t and sigma_t = 1 - t, the velocity gives the data and noise
predictions x_hat = x_t + (1 - t) v and eps_hat = x_t - t v, and DDIM's deterministic update
x_s = alpha_s x_hat + sigma_s eps_hat = s (x_t + (1 - t) v) + (1 - s)(x_t - t v) = x_t + (s - t) v. So
``flow_chain`` is ``ddim_chain`` for a flow model (same arguments, same per-step checkpointing), and
``sample_flow`` is ``sample_ddim``; the grid replaces DDIM's respaced timesteps.

``num_steps`` is the reference's ``num_sampling_steps``: the number of points of the time grid
(``torch.linspace(0, 1, num_steps)``), so Euler evaluates the model num_steps - 1 times (249 for the
reference's 250) and Heun 2 (num_steps - 1) times.

Why not diffusers' ``FlowMatchEulerDiscreteScheduler``: its ``step`` advances an internal step index (a
checkpointed step recomputed on backward would advance it again), its grid ends at sigma_min rather than
at the reference's t = 0, and it runs time the other way (sigma = 1 - t). Its shift is the same map:
LightningDiT's ``timestep_shift`` s on t equals diffusers' ``shift`` 1 / s on sigma = 1 - t (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch.utils.checkpoint import checkpoint as _checkpoint

from equidiff.errors import ConfigError

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
METHODS = ("euler", "heun2")


class FlowMatchScheduler(ConfigMixin):
    """The sampling-time settings of a flow-matching model on the linear path (a diffusers-style config).

    ``timestep_shift`` s > 0 maps each point of the uniform grid t to s t / (1 + (s - 1) t) (LightningDiT's
    ``timestep_shift``; s < 1 spends more steps near the noise end; 0 leaves the grid uniform, as in the
    reference). Like a diffusers scheduler it is a read-only template: samplers and chains rebuild it with
    ``from_config`` and their overrides. ``path_type`` and ``prediction`` name what the weights were trained
    for; only the linear path with velocity prediction is implemented.
    """

    config_name = "scheduler_config.json"
    is_flow_matching = True  # ``schedulers.fresh_scheduler`` refuses to turn it into a DDPM/DDIM scheduler

    @register_to_config
    def __init__(self, timestep_shift: float = 0.0, path_type: str = "linear", prediction: str = "velocity"):
        if path_type != "linear" or prediction != "velocity":
            raise ConfigError(f"only the linear path with velocity prediction is implemented (LightningDiT's "
                              f"transport), got path_type={path_type!r}, prediction={prediction!r}")
        if timestep_shift < 0:
            raise ConfigError(f"timestep_shift must be >= 0 (0: no shift), got {timestep_shift}")

    def time_grid(self, num_steps: int, device=None) -> torch.Tensor:
        """The ascending float32 times t_0 = 0 < ... < t_{N-1} = 1 of an ``num_steps``-point grid, shifted."""
        return shifted_time_grid(num_steps, self.config.timestep_shift, device=device)


def shifted_time_grid(num_steps: int, shift: float = 0.0, device=None) -> torch.Tensor:
    """``torch.linspace(0, 1, num_steps)`` and, for shift s > 0, t -> s t / (1 + (s - 1) t), in float32 as the
    reference computes it (``transport/integrators.py``, ``ode.__init__``)."""
    if int(num_steps) < 2:
        raise ConfigError(f"a flow ODE grid needs num_steps >= 2 points (num_steps - 1 steps), got {num_steps}")
    t = torch.linspace(0, 1, int(num_steps), dtype=torch.float32)
    if shift > 0:
        t = shift * t / (1 + (shift - 1) * t)
    return t.to(device)


def _fresh(scheduler, overrides: dict | None) -> FlowMatchScheduler:
    if not getattr(scheduler, "is_flow_matching", False):
        raise ConfigError(f"the flow sampler and chain need a flow-matching backbone (LightningDiT), got a "
                          f"{type(scheduler).__name__}; use sampler=ddim / the DDIM chain for DDPM backbones")
    return FlowMatchScheduler.from_config(scheduler.config, **(overrides or {}))


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown flow ODE method {method!r}; choose one of {METHODS}")


def flow_step(model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
              method: str = "euler") -> tuple[torch.Tensor, torch.Tensor]:
    """One step x(t) -> x(t_next) of the probability-flow ODE; returns (x(t_next), v(x, t)).

    A pure function of its inputs (safe to recompute under checkpointing).
    """
    dt = t_next - t
    v = model_fn(x, t)
    if method == "euler":
        return x + dt * v, v
    if method == "heun2":  # torchdiffeq's Heun2 tableau: c2 = 1, a21 = 1, b = (1/2, 1/2)
        v2 = model_fn(x + dt * v, t + dt)
        return x + dt * (v * 0.5 + v2 * 0.5), v
    raise ConfigError(f"unknown flow ODE method {method!r}; choose one of {METHODS}")


def sample_flow(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    scheduler,
    *,
    num_steps: int = 250,
    method: str = "euler",
    generators: Sequence[torch.Generator] | None = None,
    scheduler_overrides: dict | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Integrate the probability-flow ODE from noise x_T (t = 0) to data (t = 1): LightningDiT's ODE sampler.

    ``model_fn(x_t, t) -> v``; ``scheduler`` a ``FlowMatchScheduler`` (only read; ``scheduler_overrides``, e.g.
    ``{"timestep_shift": 0.3}``, apply to a fresh copy). The ODE is deterministic: ``generators`` is accepted
    for the samplers' shared signature and not used. ``callback(i, t_next, x, x_hat)`` after each step, with
    x_hat = x_t + (1 - t) v the data prediction at the step's start. No grad mode is set here.
    """
    _check_method(method)
    grid = _fresh(scheduler, scheduler_overrides).time_grid(num_steps, device=x_T.device)
    x = x_T
    for i in range(len(grid) - 1):
        t, t_next = grid[i], grid[i + 1]
        x_t = x
        # 1. v(x_t, t); 2. x_{t_next} = x_t + (t_next - t) v (Euler), or Heun's corrected step
        x, v = flow_step(model_fn, x_t, t, t_next, method)
        if callback is not None:
            callback(i, t_next, x, x_t + (1 - t) * v)
    return x


def flow_chain(
    model_fn: ModelFn,
    x_start: torch.Tensor,
    scheduler,
    *,
    num_steps: int,
    start_index: int = 0,
    eta: float = 0.0,
    noises: Sequence[torch.Tensor] | None = None,
    checkpoint: bool = True,
    scheduler_overrides: dict | None = None,
    method: str = "euler",
) -> torch.Tensor:
    """The flow ODE from grid point ``start_index`` to the data end, differentiably (``ddim_chain``'s signature).

    ``start_index=0`` starts at z_T (t = 0, the full chain); ``start_index=k`` at x(t_k). The ODE has no noise:
    ``eta`` must be 0 and ``noises`` None (they are the DDIM chain's). With ``checkpoint=True`` and grad enabled
    every step is wrapped in ``torch.utils.checkpoint`` (``use_reentrant=False``): activation memory does not
    grow with the number of steps, at the cost of one more forward pass per step on backward.
    """
    if eta != 0 or noises is not None:
        raise ConfigError(f"the flow chain integrates a deterministic ODE: eta must be 0 and noises None (got eta={eta}"
                          f", {'noises' if noises is not None else 'no noises'})")
    _check_method(method)
    grid = _fresh(scheduler, scheduler_overrides).time_grid(num_steps, device=x_start.device)
    if not 0 <= start_index < len(grid) - 1:
        raise ValueError(f"start_index must be in [0, {len(grid) - 2}] for a {num_steps}-point grid, got {start_index}")

    def step(x_t, t, t_next):
        return flow_step(model_fn, x_t, t, t_next, method)[0]

    use_ckpt = checkpoint and torch.is_grad_enabled()
    x = x_start
    for i in range(start_index, len(grid) - 1):
        t, t_next = grid[i], grid[i + 1]
        x = _checkpoint(step, x, t, t_next, use_reentrant=False) if use_ckpt else step(x, t, t_next)
    return x
