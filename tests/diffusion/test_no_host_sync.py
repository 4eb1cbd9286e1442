"""The denoising loops read no tensor on the host (no device sync per step): samplers, chains, ACE's loops.

Each loop runs on the ``meta`` device under ``tests.host_sync.HostSyncWatch`` (see there): a host read of device
data, or a blocking copy between host and device, anywhere after the first model call fails the test with the
line that made it. The watch itself is checked on loops that do sync.
"""

from __future__ import annotations

import functools

import pytest
import torch
from diffusers import DDPMScheduler

from equidiff.diffusion import (
    LatentDiTBackbone,
    UNetBackbone,
    chain_timesteps,
    ddim_chain,
    ddpm_chain,
    draw_chain_noise,
    draw_ddpm_noise,
    sample_ddim,
    sample_ddpm,
)
from equidiff.utils import generators_for, randn_per_sample
from tests.conftest import make_tiny_dit_parts
from tests.host_sync import HostSyncError, HostSyncWatch

META = torch.device("meta")


@pytest.fixture
def backbone(tiny_unet, ddpm_scheduler):
    return UNetBackbone(tiny_unet, ddpm_scheduler).to(META)


def _x_T(shape, seeds):
    gens = generators_for(seeds)
    return randn_per_sample(shape, gens, device=META), gens


@pytest.mark.parametrize("overrides", [{}, {"clip_sample": False}, {"thresholding": True}])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sample_ddim_loop_reads_nothing_on_the_host(backbone, ddpm_scheduler, eta, overrides):
    x_T, gens = _x_T((1, 8, 8), [1, 2])
    with HostSyncWatch() as watch, torch.no_grad():
        out = sample_ddim(watch.arm_on_call(backbone), x_T, ddpm_scheduler, num_steps=4, eta=eta, generators=gens,
                          scheduler_overrides=overrides, use_clipped_model_output=bool(overrides))
    assert watch.found == [] and out.device == META and out.shape == x_T.shape


@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_sample_ddpm_loop_reads_nothing_on_the_host(backbone, variance):
    sched = DDPMScheduler(num_train_timesteps=1000, variance_type=variance)
    model_fn = backbone if variance == "fixed_small" else (
        lambda x, t: torch.cat([backbone(x, t), torch.tanh(x)], dim=1))  # eps and v (2C channels)
    x_T, gens = _x_T((1, 8, 8), [1, 2])
    with HostSyncWatch() as watch, torch.no_grad():
        sample_ddpm(watch.arm_on_call(model_fn), x_T, sched, num_steps=5, generators=gens,
                    spacing="guided_diffusion")
    assert watch.found == []


def test_differentiable_chains_read_nothing_on_the_host_forward_and_backward(backbone, ddpm_scheduler):
    gens = generators_for([1, 2])
    noises = draw_chain_noise((1, 8, 8), gens, 4, device=META)
    timesteps = chain_timesteps(ddpm_scheduler, 10, "guided_diffusion")[7:]
    ddpm_noises = draw_ddpm_noise((1, 8, 8), gens, timesteps, device=META)
    z = torch.empty(2, 1, 8, 8, device=META).requires_grad_(True)
    with torch.enable_grad():
        with HostSyncWatch() as watch:  # the DDIM chain, then its backward (checkpointed steps recomputed)
            x = ddim_chain(watch.arm_on_call(backbone), z, ddpm_scheduler, num_steps=4, eta=0.5, noises=noises)
            x.sum().backward()
        assert watch.found == [] and z.grad is not None
        with HostSyncWatch() as watch:  # the DDPM chain (ACE's filter), then its backward
            x = ddpm_chain(watch.arm_on_call(backbone), z, ddpm_scheduler, timesteps=timesteps, noises=ddpm_noises)
            x.sum().backward()
        assert watch.found == []


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_latent_dit_loop_reads_nothing_on_the_host(prediction_type):
    transformer, vae, sched = make_tiny_dit_parts()
    sched = type(sched).from_config(sched.config, prediction_type=prediction_type)
    bb = LatentDiTBackbone(transformer, vae, sched, guidance_scale=2.0).to(META)
    z_T, gens = _x_T((4, 4, 4), [1, 2])
    model_fn = functools.partial(bb, class_labels=torch.tensor([3, 7]).to(META))
    with HostSyncWatch() as watch, torch.no_grad():
        sample_ddim(watch.arm_on_call(model_fn), z_T, sched, num_steps=3, eta=1.0, generators=gens)
    assert watch.found == []


def test_ace_loops_read_nothing_on_the_host(backbone):
    from equidiff.explain.ace import pre_explanation, repaint

    torch.manual_seed(0)
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2)).to(META)
    x = torch.empty(2, 1, 8, 8, device=META)
    target = torch.tensor([0, 1]).to(META)
    mask = torch.empty(2, 1, 8, 8, dtype=torch.bool, device=META)
    chain = {"num_steps": 10, "tau": 3}
    bb = _ArmFirst(backbone)
    with HostSyncWatch() as watch:  # Algorithm 1: PGD iterations through the filter chain, forward and backward
        bb.watch = watch
        x_pe = pre_explanation(bb, classifier, x, target, generators=generators_for([1, 2]), iterations=2, **chain)
    assert watch.found == []
    with HostSyncWatch() as watch, torch.no_grad():  # Algorithm 2: the RePaint loop
        bb.watch = watch
        repaint(bb, x, x_pe, mask, generators=generators_for([1, 2]), **chain)
    assert watch.found == []


class _ArmFirst(torch.nn.Module):
    """A backbone whose first call arms the watch (ACE calls the backbone itself, not a model function we pass)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone, self.watch = backbone, None
        self.scheduler, self.learned_variance = backbone.scheduler, False

    def forward(self, x_t, t):
        self.watch.arm()
        return self.backbone(x_t, t)


# ----------------------------------------------------------------------------- the watch itself
@pytest.mark.parametrize("culprit", ["item", "int_t", "bool_any", "host_table", "nonzero"])
def test_the_watch_catches_a_loop_that_syncs(backbone, ddpm_scheduler, culprit):
    table = torch.linspace(0, 1, 1000)

    def model_fn(x, t):
        eps = backbone(x, t)
        if culprit == "item":
            eps = eps * eps.mean().item()
        elif culprit == "int_t":
            eps = eps * table[int(t)]
        elif culprit == "bool_any":
            if (eps > 0).any():
                eps = -eps
        elif culprit == "host_table":
            eps = eps * table.to(x.device)[t]
        elif culprit == "nonzero":
            eps = eps + (eps > 0).nonzero().shape[0]
        return eps

    x_T, gens = _x_T((1, 8, 8), [1])
    with pytest.raises((HostSyncError, NotImplementedError, RuntimeError)):
        with HostSyncWatch() as watch, torch.no_grad():
            sample_ddim(watch.arm_on_call(model_fn), x_T, ddpm_scheduler, num_steps=2)


def test_the_watch_names_the_line_and_allows_non_blocking_copies():
    table = torch.linspace(0, 1, 10)
    device_table = table.to(META)
    with pytest.raises(HostSyncError, match=r"host read .*test_no_host_sync.py"):
        with HostSyncWatch() as watch:
            watch.arm()
            bool(device_table[3] > 0)
    with pytest.raises(HostSyncError, match="blocking copy cpu -> meta"):
        with HostSyncWatch() as watch:
            watch.arm()
            table.to(META)
    with HostSyncWatch() as watch:  # allowed: host reads of host data, a non-blocking copy, anything before arming
        table.to(META)
        watch.arm()
        float(table[3])
        table.to(META, non_blocking=True)
    assert watch.found == []
