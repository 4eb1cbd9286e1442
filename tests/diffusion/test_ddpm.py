"""DDPM steps as guided-diffusion takes them: its respacing rule, the clipped x0 and the learned variance, checked
against guided-diffusion itself (the guided-diffusion-sdk package) and diffusers' DDPMScheduler."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from equidiff.diffusion import (
    UNetBackbone,
    ddpm_chain,
    ddpm_scheduler,
    ddpm_step,
    draw_ddpm_noise,
    respaced_timesteps,
    sample_ddpm,
    space_timesteps,
)
from equidiff.diffusion.adm import build_unet, scheduler_for
from equidiff.errors import ConfigError
from equidiff.utils import generators_for, randn_per_sample
from tests.diffusion.test_adm import TINY, reference_unet

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # torch.cuda.amp.custom_fwd deprecation inside guided_diffusion
    from guided_diffusion import respace
    from guided_diffusion.gaussian_diffusion import (
        GaussianDiffusion,
        LossType,
        ModelMeanType,
        ModelVarType,
        get_named_beta_schedule,
    )


# ----------------------------------------------------------------------------- respacing
def test_space_timesteps_follows_guided_diffusions_rule():
    # one section: k * (T - 1) / (N - 1) accumulated and rounded half to even (166.5 -> 166)
    assert space_timesteps(1000, "25")[:6] == [0, 42, 83, 125, 166, 208]
    assert space_timesteps(1000, "25")[-2:] == [957, 999]
    assert space_timesteps(500, "50")[:6] == [0, 10, 20, 31, 41, 51]
    assert space_timesteps(10, "4") == [0, 3, 6, 9]
    # sections: 300 steps in three sections of 100, taking 2, 3 and 4 points (strides 99, 49.5, 33)
    assert space_timesteps(300, "2,3,4") == [0, 99, 100, 150, 199, 200, 233, 266, 299]
    # uneven sections: 10 = 4 + 3 + 3; counts 1, 2, 3 -> [0], [4, 6], [7, 8, 9]
    assert space_timesteps(10, [1, 2, 3]) == [0, 4, 6, 7, 8, 9]
    # ddimN: the smallest fixed stride giving exactly N steps from 0
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    with pytest.raises(ConfigError, match="section of 10 steps"):
        space_timesteps(20, "11,1")
    with pytest.raises(ConfigError, match="no fixed stride"):
        space_timesteps(100, "ddim30")  # strides 3 and 4 give 34 and 25 steps
    with pytest.raises(ConfigError, match="step counts"):
        space_timesteps(100, "ten")


@pytest.mark.parametrize("counts", ["25", "50", "100", "250", "10,15,20", "1,2,3", "ddim25", "ddim50", "ddim100",
                                    [7, 0, 5]])
@pytest.mark.parametrize("num_timesteps", [1000, 500, 300])
def test_space_timesteps_equals_the_library(num_timesteps, counts):
    assert space_timesteps(num_timesteps, counts) == sorted(respace.space_timesteps(num_timesteps, counts))


def test_respaced_timesteps_per_spacing():
    sched = DDPMScheduler(num_train_timesteps=1000)
    ddim = DDIMScheduler.from_config(sched.config)
    ddim.set_timesteps(25)
    assert respaced_timesteps(sched, 25, "leading").tolist() == ddim.timesteps.tolist()  # the DDIM sampler's
    assert respaced_timesteps(sched, 25, "guided_diffusion").tolist()[-5:] == [166, 125, 83, 42, 0]
    assert respaced_timesteps(sched, 25, "guided_diffusion_ddim").tolist() == list(range(960, -1, -40))
    assert respaced_timesteps(sched, 25, "trailing").tolist()[-2:] == [79, 39]
    with pytest.raises(ConfigError, match="unknown timestep spacing"):
        respaced_timesteps(sched, 25, "uniform")
    with pytest.raises(ConfigError, match="num_steps"):
        respaced_timesteps(sched, 1001, "guided_diffusion")


# ----------------------------------------------------------------------------- the step, against diffusers
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large", "learned_range"])
@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_step_equals_diffusers_ddpm_scheduler_step(variance_type, clip):
    """The written-out step is DDPMScheduler.step bit for bit, given the noise that step draws (respaced chain)."""
    base = DDPMScheduler(num_train_timesteps=1000, variance_type=variance_type, clip_sample=clip)
    timesteps = respaced_timesteps(base, 25, "guided_diffusion")
    ours = ddpm_scheduler(base, timesteps)
    ref = DDPMScheduler.from_config(base.config)
    ref.set_timesteps(timesteps=timesteps.tolist())
    channels = 2 if variance_type == "learned_range" else 1
    x_t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2
    for t in timesteps[[0, 10, -2, -1]]:
        out = torch.randn(2, 3 * channels, 8, 8, generator=torch.Generator().manual_seed(int(t))) * 1.5
        expected = ref.step(out, t, x_t, generator=generators_for([1, 2]))
        z = randn_per_sample((3, 8, 8), generators_for([1, 2])) if t > 0 else None
        got, x0 = ddpm_step(ours, out, t, x_t, z)
        assert torch.equal(got, expected.prev_sample), int(t)
        assert torch.equal(x0, expected.pred_original_sample)


def test_ddpm_step_refuses_outputs_it_cannot_read():
    sched = ddpm_scheduler(DDPMScheduler(num_train_timesteps=10, variance_type="learned_range"), [9, 5, 0])
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="variance values"):
        ddpm_step(sched, x, torch.tensor(5), x, x)
    with pytest.raises(ValueError, match="channels"):
        ddpm_step(sched, torch.zeros(1, 4, 4, 4), torch.tensor(5), x, x)
    with pytest.raises(ValueError, match="needs its noise"):
        ddpm_step(sched, torch.zeros(1, 6, 4, 4), torch.tensor(5), x, None)


# ----------------------------------------------------------------------------- against guided-diffusion
@pytest.fixture(scope="module")
def tiny_adm():
    """A tiny learned-sigma guided-diffusion UNet (100 steps) and the same weights converted to a backbone."""
    ref = reference_unet(TINY, seed=3)
    with torch.no_grad():  # tame the random output layer so that x0 is clipped at some pixels, not at all
        ref.out[-1].weight.mul_(0.05)
        ref.out[-1].bias.mul_(0.05)
    backbone = UNetBackbone(build_unet(ref.state_dict(), TINY), scheduler_for(TINY))
    return ref, backbone


def _diffusion(use_timesteps=None):
    kw = dict(betas=get_named_beta_schedule("linear", TINY.diffusion_steps), model_mean_type=ModelMeanType.EPSILON,
              model_var_type=ModelVarType.LEARNED_RANGE, loss_type=LossType.MSE, rescale_timesteps=False)
    return GaussianDiffusion(**kw) if use_timesteps is None else respace.SpacedDiffusion(use_timesteps, **kw)


def _x(seed=0, batch=2):
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model, respacing", [("guided_diffusion_unet", None), ("guided_diffusion_unet", "10"),
                                             ("converted", "ddim20")])
def test_learned_variance_step_equals_guided_diffusion_p_sample(tiny_adm, respacing, model):
    """p_sample with learned sigma and clip_denoised=True, same noise: equal to 1e-5 (full and respaced chains).

    With guided-diffusion's own UNet, x0_hat carries the conversion's float error (about 1e-7) times
    1/sqrt(alpha_bar_t) (about 150 at the last of 100 steps); with the converted UNet on both sides the
    formulas alone differ by float32 rounding.
    """
    ref_unet, backbone = tiny_adm
    ref_model = ref_unet if model == "guided_diffusion_unet" else (lambda x, t: backbone.unet(x, t).sample)
    n = TINY.diffusion_steps
    kept = list(range(n)) if respacing is None else sorted(respace.space_timesteps(n, respacing))
    diffusion = _diffusion(None if respacing is None else kept)
    sched = ddpm_scheduler(backbone.scheduler, kept[::-1], overrides={"clip_sample": True})
    model_fn = functools.partial(backbone, with_variance=True)
    x = _x(1)
    clipped, unclipped, learned_vs_fixed = 0, 0, 0.0
    for index in (len(kept) - 1, len(kept) // 2, 1, 0):  # respaced index -> training timestep kept[index]
        t_ref = torch.full((2,), index, dtype=torch.long)
        t = torch.tensor(kept[index])
        with torch.no_grad():
            torch.manual_seed(index)
            expected = diffusion.p_sample(ref_model, x, t_ref, clip_denoised=True)
            torch.manual_seed(index)
            noise = torch.randn_like(x)  # the noise p_sample drew
            out = model_fn(x, t)
            got, x0 = ddpm_step(sched, out, t, x, noise)
            # the same step with the fixed posterior variance instead
            fixed = ddpm_step(ddpm_scheduler(backbone.scheduler, kept[::-1]), out[:, :3], t, x, noise)[0]
        amplification = float(backbone.scheduler.alphas_cumprod[t] ** -0.5) if model == "guided_diffusion_unet" else 1
        torch.testing.assert_close(x0, expected["pred_xstart"], atol=1e-6 * max(10, amplification), rtol=0)
        torch.testing.assert_close(got, expected["sample"], atol=1e-5, rtol=0)
        learned_vs_fixed = max(learned_vs_fixed, float((fixed - expected["sample"]).abs().max()))
        clipped += int((x0.abs() == 1).sum())
        unclipped += int((x0.abs() < 1).sum())
    assert clipped > 0 and unclipped > 0  # clipping bit at some pixels, not at all
    assert learned_vs_fixed > 1e-3  # the learned variance matters (beta~_t and beta_t meet at large t)


def test_ddpm_sampler_equals_guided_diffusion_p_sample_loop(tiny_adm):
    """sample_ddpm over guided-diffusion's respacing with the learned variance is SpacedDiffusion.p_sample_loop; at
    batch size 1 a generator seeded s draws the noises guided-diffusion draws after torch.manual_seed(s)."""
    ref_model, backbone = tiny_adm
    diffusion = _diffusion(respace.space_timesteps(TINY.diffusion_steps, "10"))
    gens = generators_for([7])
    x_T = randn_per_sample((3, 16, 16), gens)
    torch.manual_seed(7)
    torch.randn(1, 3, 16, 16)  # x_T, drawn above from the same stream
    with torch.no_grad():
        expected = diffusion.p_sample_loop(ref_model, (1, 3, 16, 16), noise=x_T, clip_denoised=True)
        got = sample_ddpm(functools.partial(backbone, with_variance=True), x_T, backbone.scheduler, num_steps=10,
                          generators=gens, spacing="guided_diffusion", scheduler_overrides={"clip_sample": True})
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_differentiable_ddpm_chain_equals_the_sampler_and_checkpoints(tiny_adm):
    _, backbone = tiny_adm
    model_fn = functools.partial(backbone, with_variance=True)
    timesteps = respaced_timesteps(backbone.scheduler, 10, "guided_diffusion")[7:]
    gens = generators_for([3])
    x = _x(2, batch=1)
    noises = draw_ddpm_noise((3, 16, 16), gens, timesteps)
    assert noises[-1] is None and all(z is not None for z in noises[:-1])
    with torch.no_grad():
        plain = ddpm_chain(model_fn, x, backbone.scheduler, timesteps=timesteps, noises=noises)
        sched = ddpm_scheduler(backbone.scheduler, timesteps)
        ref = x
        for t, z in zip(sched.timesteps, noises, strict=True):
            ref = ddpm_step(sched, model_fn(ref, t), t, ref, z)[0]
    assert torch.equal(plain, ref)
    grads = {}
    for ckpt in (True, False):
        xv = x.clone().requires_grad_(True)
        out = ddpm_chain(model_fn, xv, backbone.scheduler, timesteps=timesteps, noises=noises, checkpoint=ckpt)
        (grads[ckpt],) = torch.autograd.grad((out * out).sum(), xv)
    assert grads[True].abs().sum() > 0
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="draw_ddpm_noise"):
        ddpm_chain(model_fn, x, backbone.scheduler, timesteps=timesteps, noises=noises[:-2])


def test_only_learned_variance_backbones_return_it(tiny_adm, tiny_unet, ddpm_scheduler):
    _, backbone = tiny_adm
    x, t = _x(3), torch.tensor(50)
    with torch.no_grad():
        both = backbone(x, t, with_variance=True)
        assert backbone.learned_variance and both.shape == (2, 6, 16, 16)
        torch.testing.assert_close(both[:, :3], backbone(x, t), atol=0, rtol=0)
    plain = UNetBackbone(tiny_unet, ddpm_scheduler)
    assert not plain.learned_variance
    with pytest.raises(ConfigError, match="learns its variance"):
        plain(torch.zeros(1, 1, 8, 8), t, with_variance=True)
