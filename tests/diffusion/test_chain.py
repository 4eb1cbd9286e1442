"""The differentiable chain: gradients reach z_T; checkpointing changes nothing but memory."""

import pytest
import torch

from equidiff.diffusion import (
    UNetBackbone,
    chain_timesteps,
    ddim_chain,
    draw_chain_noise,
    noise_to_step,
    sample_ddim,
)
from equidiff.utils import generators_for, randn_per_sample


@pytest.fixture
def backbone(tiny_unet, ddpm_scheduler):
    return UNetBackbone(tiny_unet, ddpm_scheduler)


def _grad(backbone, z_T, **kw):
    z_T = z_T.clone().requires_grad_(True)
    x_0 = ddim_chain(backbone, z_T, backbone.scheduler, **kw)
    loss = (x_0 * torch.linspace(-1, 1, x_0.numel()).reshape(x_0.shape)).sum()
    (g,) = torch.autograd.grad(loss, z_T)
    return x_0.detach(), g


def test_chain_equals_ddim_sampler(backbone):
    z_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = sample_ddim(backbone, z_T, backbone.scheduler, num_steps=10)
        ours = ddim_chain(backbone, z_T, backbone.scheduler, num_steps=10)
    assert torch.equal(ours, ref)


def test_gradients_reach_z_T_and_checkpointing_does_not_change_them(backbone):
    z_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x_plain, g_plain = _grad(backbone, z_T, num_steps=10, checkpoint=False)
    x_ckpt, g_ckpt = _grad(backbone, z_T, num_steps=10, checkpoint=True)
    assert g_plain.abs().sum() > 0 and torch.isfinite(g_plain).all()
    torch.testing.assert_close(x_ckpt, x_plain, rtol=0, atol=0)
    torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-5, atol=1e-7)


def test_gradient_matches_finite_differences(backbone):
    # a direction derivative of the loss along v equals (L(z + h v) - L(z - h v)) / 2h
    z_T = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    backbone = backbone.double()
    v = torch.randn_like(z_T)
    _, g = _grad(backbone, z_T, num_steps=4, checkpoint=True)
    w = torch.linspace(-1, 1, z_T.numel(), dtype=torch.float64).reshape(z_T.shape)
    h = 1e-4
    with torch.no_grad():
        lp = (ddim_chain(backbone, z_T + h * v, backbone.scheduler, num_steps=4) * w).sum()
        lm = (ddim_chain(backbone, z_T - h * v, backbone.scheduler, num_steps=4) * w).sum()
    torch.testing.assert_close((g * v).sum(), (lp - lm) / (2 * h), rtol=1e-4, atol=1e-6)


def test_stochastic_chain_with_predrawn_noise_equals_sampler_and_checkpoints(backbone):
    seeds = [3, 4]
    gens = generators_for(seeds)
    z_T = randn_per_sample(backbone.sample_shape, gens)
    with torch.no_grad():
        ref = sample_ddim(backbone, z_T, backbone.scheduler, num_steps=6, eta=1.0, generators=gens)
    gens = generators_for(seeds)
    z_T2 = randn_per_sample(backbone.sample_shape, gens)
    noises = draw_chain_noise(backbone.sample_shape, gens, 6)
    with torch.no_grad():
        ours = ddim_chain(backbone, z_T2, backbone.scheduler, num_steps=6, eta=1.0, noises=noises)
    assert torch.equal(ours, ref)
    _, g1 = _grad(backbone, z_T, num_steps=6, eta=1.0, noises=noises, checkpoint=False)
    _, g2 = _grad(backbone, z_T, num_steps=6, eta=1.0, noises=noises, checkpoint=True)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)


def test_partial_chain_from_tau(backbone):
    x_0 = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    eps = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    x_tau, tau = noise_to_step(x_0, backbone.scheduler, num_steps=20, start_index=14, noise=eps)
    assert int(tau) == int(chain_timesteps(backbone.scheduler, 20)[14])
    ab = backbone.scheduler.alphas_cumprod[tau]
    torch.testing.assert_close(x_tau, ab.sqrt() * x_0 + (1 - ab).sqrt() * eps)

    # gradients reach x_0 through noising + the 6 remaining steps
    x_0 = x_0.clone().requires_grad_(True)
    x_tau, _ = noise_to_step(x_0, backbone.scheduler, num_steps=20, start_index=14, noise=eps)
    out = ddim_chain(backbone, x_tau, backbone.scheduler, num_steps=20, start_index=14)
    (g,) = torch.autograd.grad(out.square().sum(), x_0)
    assert g.abs().sum() > 0

    # the partial chain equals the tail of the full chain: start it from the full chain's state
    # before step 14 and it ends where the full chain ends
    states = {}
    z_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = sample_ddim(backbone, z_T, backbone.scheduler, num_steps=20,
                           callback=lambda i, t, x, x0: states.__setitem__(i, x))
        tail = ddim_chain(backbone, states[13], backbone.scheduler, num_steps=20, start_index=14)
    assert torch.equal(tail, full)


@pytest.mark.parametrize("start", [-1, 20, 25])
def test_tau_beyond_the_chain_is_an_error(backbone, start):
    with pytest.raises(ValueError, match="start_index"):
        ddim_chain(backbone, torch.randn(1, 1, 8, 8), backbone.scheduler, num_steps=20, start_index=start)
    with pytest.raises(ValueError, match="start_index"):
        noise_to_step(torch.zeros(1, 1, 8, 8), backbone.scheduler, num_steps=20, start_index=start,
                      noise=torch.zeros(1, 1, 8, 8))


def test_stochastic_chain_without_noise_is_an_error(backbone):
    with pytest.raises(ValueError, match="draw_chain_noise"):
        ddim_chain(backbone, torch.randn(1, 1, 8, 8), backbone.scheduler, num_steps=4, eta=1.0)
