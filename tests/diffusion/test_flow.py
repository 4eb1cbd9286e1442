"""Flow-matching sampling (equidiff.diffusion.flow): the time grid, Euler and Heun against closed forms, the chain."""

import functools

import pytest
import torch

from equidiff.diffusion import FlowMatchScheduler, ddim_chain, flow_chain, flow_step, sample_ddim, sample_flow
from equidiff.diffusion.flow import shifted_time_grid
from equidiff.errors import ConfigError

UNIFORM, SHIFTED = FlowMatchScheduler(), FlowMatchScheduler(timestep_shift=0.3)


# ------------------------------------------------------------------------------------------------ the grid
@pytest.mark.parametrize("shift", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("n", [2, 10, 250])
def test_shifted_grid_is_the_formula(shift, n):
    grid = FlowMatchScheduler(timestep_shift=shift).time_grid(n)
    u = torch.arange(n, dtype=torch.float64) / (n - 1)  # the uniform grid i / (N - 1)
    expected = shift * u / (1 + (shift - 1) * u)  # t' = s t / (1 + (s - 1) t)
    assert grid.dtype == torch.float32 and grid[0] == 0 and grid[-1] == 1
    torch.testing.assert_close(grid.double(), expected, rtol=0, atol=3e-7)
    assert (grid.diff() > 0).all()


def test_no_shift_is_the_uniform_grid():
    torch.testing.assert_close(UNIFORM.time_grid(5), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]), rtol=0, atol=0)


def test_shift_on_t_is_diffusers_inverse_shift_on_sigma():
    # LightningDiT's shift s on t equals diffusers' flow-matching shift 1 / s on sigma = 1 - t (SD3's convention)
    from diffusers import FlowMatchEulerDiscreteScheduler

    n, s = 12, 0.3
    sd3 = FlowMatchEulerDiscreteScheduler(shift=1 / s)
    sd3.set_timesteps(sigmas=(1 - torch.linspace(0, 1, n)[:-1]).tolist())
    torch.testing.assert_close(1 - shifted_time_grid(n, s), sd3.sigmas.float(), rtol=0, atol=1e-6)


def test_bad_grids_and_methods_are_errors():
    with pytest.raises(ConfigError, match="num_steps >= 2"):
        UNIFORM.time_grid(1)
    with pytest.raises(ConfigError, match="timestep_shift"):
        FlowMatchScheduler(timestep_shift=-0.1)
    with pytest.raises(ConfigError, match="linear path"):
        FlowMatchScheduler(path_type="vp")
    with pytest.raises(ConfigError, match="method"):
        sample_flow(lambda x, t: x, torch.zeros(1, 2), UNIFORM, num_steps=3, method="rk4")


# ------------------------------------------------------------------------------------------------ the steps
def test_euler_step_is_x_plus_dt_v():
    x, v = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 4.0]])
    out, v0 = flow_step(lambda x_t, t: v, x, torch.tensor(0.2), torch.tensor(0.45))
    torch.testing.assert_close(out, torch.tensor([[1.125, -1.0]]))  # x + 0.25 v
    assert v0 is v


def test_euler_step_is_the_ddim_update_on_the_linear_path():
    # x_t = t x + (1 - t) eps, v = x - eps: x_hat = x_t + (1 - t) v, eps_hat = x_t - t v;
    # DDIM: s x_hat + (1 - s) eps_hat
    g = torch.Generator().manual_seed(0)
    x_t, v = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    t, s = torch.tensor(0.3), torch.tensor(0.55)
    x_hat, eps_hat = x_t + (1 - t) * v, x_t - t * v
    torch.testing.assert_close(flow_step(lambda *_: v, x_t, t, s)[0], s * x_hat + (1 - s) * eps_hat)


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_euler_on_a_linear_field_is_the_product_formula(shift):
    # v(x, t) = c x: every Euler step multiplies by (1 + c dt_k), so x_N = x_0 prod_k (1 + c (t_{k+1} - t_k))
    c, n = -0.7, 9
    x0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    grid = FlowMatchScheduler(timestep_shift=shift).time_grid(n).double()
    out = sample_flow(lambda x, t: c * x, x0.double(), FlowMatchScheduler(timestep_shift=shift), num_steps=n)
    torch.testing.assert_close(out, x0.double() * torch.prod(1 + c * grid.diff()), rtol=1e-6, atol=1e-7)


def test_euler_follows_the_straight_path_to_a_point_mass():
    # data = the point mu: the true velocity is v(x, t) = (mu - x) / (1 - t); the ODE's paths are the straight lines
    # x_t = t mu + (1 - t) z, on which Euler is exact: every iterate lies on the line and the last one is mu
    mu = torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.float64)
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    seen = []
    out = sample_flow(lambda x, t: (mu - x) / (1 - t), z, SHIFTED, num_steps=7,
                      callback=lambda i, t, x, x_hat: seen.append((t.double(), x, x_hat)))
    assert len(seen) == 6
    for t, x, x_hat in seen[:-1]:  # (float32 time differences: 1e-6)
        torch.testing.assert_close(x, t * mu + (1 - t) * z, rtol=0, atol=1e-6)
        torch.testing.assert_close(x_hat, mu.expand_as(x_hat), rtol=0, atol=1e-6)  # x_hat = x_t + (1 - t) v = mu
    torch.testing.assert_close(out, mu.expand_as(out), rtol=0, atol=1e-6)


def test_heun_is_exact_for_a_velocity_linear_in_time():
    # v(t) = a + b t: x(1) = x(0) + a + b / 2 exactly (trapezoid rule), for any grid; Euler is the left Riemann sum
    a, b, n = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5]), 6
    x0 = torch.zeros(1, 2, dtype=torch.float64)
    field = lambda x, t: (a + b * t).double().expand_as(x)  # noqa: E731
    heun = sample_flow(field, x0, SHIFTED, num_steps=n, method="heun2")
    torch.testing.assert_close(heun, (a + b / 2).double()[None], rtol=0, atol=1e-6)
    grid = SHIFTED.time_grid(n).double()
    euler = sample_flow(field, x0, SHIFTED, num_steps=n)
    torch.testing.assert_close(euler, (a.double() + b.double() * (grid[:-1] * grid.diff()).sum())[None], rtol=0,
                               atol=1e-6)


def test_the_number_of_model_evaluations():
    calls = []

    def field(x, t):
        calls.append(float(t))
        return x

    sample_flow(field, torch.zeros(1, 1), UNIFORM, num_steps=5)
    assert calls == [0.0, 0.25, 0.5, 0.75]  # N - 1 Euler steps, never at t = 1
    calls.clear()
    sample_flow(field, torch.zeros(1, 1), UNIFORM, num_steps=3, method="heun2")
    assert calls == [0.0, 0.5, 0.5, 1.0]


# ------------------------------------------------------------------------------------------------ the chain
def _field(x, t):  # a smooth nonlinear velocity with gradients in x and t
    return torch.tanh(x * (1 + t)) - 0.5 * x


def test_chain_equals_the_sampler_and_starts_anywhere():
    z = torch.randn(2, 3, generator=torch.Generator().manual_seed(3))
    seen = []
    full = sample_flow(_field, z, SHIFTED, num_steps=8, callback=lambda i, t, x, x_hat: seen.append(x))
    torch.testing.assert_close(flow_chain(_field, z, SHIFTED, num_steps=8), full, rtol=0, atol=0)
    # from grid point 3 (after 3 steps) to the end = the rest of the sampler's trajectory
    torch.testing.assert_close(flow_chain(_field, seen[2], SHIFTED, num_steps=8, start_index=3), full, rtol=0, atol=0)
    with pytest.raises(ValueError, match="start_index"):
        flow_chain(_field, z, SHIFTED, num_steps=8, start_index=7)


@pytest.mark.parametrize("checkpoint", [True, False])
@pytest.mark.parametrize("method", ["euler", "heun2"])
def test_chain_gradient_on_a_linear_field_is_the_closed_form(method, checkpoint):
    # v(x, t) = c x: an Euler step multiplies x by (1 + c dt), a Heun step by (1 + c dt + (c dt)^2 / 2) (k1 = c x,
    # k2 = c (x + dt k1)); the chain is x_N = z prod_k m_k, so d sum(x_N) / dz = prod_k m_k for every entry
    c, n = -0.8, 7
    dt = SHIFTED.time_grid(n).double().diff()
    factor = torch.prod(1 + c * dt) if method == "euler" else torch.prod(1 + c * dt + (c * dt) ** 2 / 2)
    z = torch.randn(2, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64).requires_grad_(True)
    with torch.enable_grad():
        out = flow_chain(lambda x, t: c * x, z, SHIFTED, num_steps=n, checkpoint=checkpoint, method=method)
        (grad,) = torch.autograd.grad(out.sum(), z)
    torch.testing.assert_close(out.detach(), z.detach() * factor, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, factor.expand_as(grad), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["euler", "heun2"])
def test_gradients_reach_z_T_and_checkpointing_changes_nothing(method):
    grads = []
    for ckpt in (True, False):
        z = torch.randn(2, 3, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
        with torch.enable_grad():
            out = flow_chain(_field, z, SHIFTED, num_steps=6, checkpoint=ckpt, method=method)
            grads.append((out.detach(), torch.autograd.grad(out.square().sum(), z)[0]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-6, atol=1e-7)
    assert grads[0][1].abs().sum() > 0


def test_chain_keeps_ddim_chain_arguments_but_refuses_noise():
    z = torch.zeros(1, 2)
    with pytest.raises(ConfigError, match="eta must be 0"):
        flow_chain(_field, z, UNIFORM, num_steps=3, eta=1.0, noises=[z, z])


def test_ddpm_samplers_refuse_a_flow_scheduler_and_vice_versa(ddpm_scheduler):
    z = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ConfigError, match="flow-matching backbone"):
        sample_ddim(lambda x, t: x, z, SHIFTED, num_steps=2)
    with pytest.raises(ConfigError, match="flow-matching backbone"):
        ddim_chain(lambda x, t: x, z, SHIFTED, num_steps=2)
    with pytest.raises(ConfigError, match="need a flow-matching backbone"):
        sample_flow(lambda x, t: x, z, ddpm_scheduler, num_steps=2)
    with pytest.raises(ConfigError, match="need a flow-matching backbone"):
        functools.partial(flow_chain, num_steps=2)(lambda x, t: x, z, ddpm_scheduler)


def test_scheduler_overrides_apply_to_a_fresh_copy():
    seen = []
    sample_flow(lambda x, t: seen.append(float(t)) or x, torch.zeros(1), UNIFORM, num_steps=3,
                scheduler_overrides={"timestep_shift": 0.3})
    assert seen == pytest.approx([0.0, 0.3 * 0.5 / (1 - 0.7 * 0.5)]) and UNIFORM.config.timestep_shift == 0.0


def test_build_time_step_check_takes_a_flow_scheduler(ddpm_scheduler):
    """``check_num_steps`` (run on every config before building) counts grid points for a flow scheduler, which
    has no training timesteps, and still checks the DDPM range for a DDPM scheduler."""
    from equidiff.diffusion.schedulers import check_num_steps

    flow = FlowMatchScheduler(timestep_shift=0.3)
    check_num_steps(flow, 2)
    check_num_steps(flow, 5000)  # a continuous-time model has no upper limit
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ConfigError, match="at least 2 points"):
            check_num_steps(flow, bad, name="method.num_steps")
    with pytest.raises(ConfigError, match="tau=6"):
        check_num_steps(flow, 5, tau=6, name="method.num_steps")
    with pytest.raises(ConfigError, match="trained with 1000 steps"):
        check_num_steps(ddpm_scheduler, 5000)
