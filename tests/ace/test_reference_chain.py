"""ACE's DDPM filter and inpainting against guided-diffusion itself (the guided-diffusion-sdk package): the reference's
steps written with guided-diffusion's SpacedDiffusion (q_sample, p_mean_variance with clip_denoised=True, learned
sigma) on a tiny learned-sigma ADM and the same weights converted for equidiff, with the same noises."""

from __future__ import annotations

import warnings

import pytest
import torch

from equidiff.diffusion import UNetBackbone
from equidiff.diffusion.adm import build_unet, scheduler_for
from equidiff.explain.ace import ace_mask, diffusion_filter, draw_filter_noise, filter_timesteps, repaint
from equidiff.utils.rng import generators_for, randn_per_sample
from tests.diffusion.test_adm import TINY, reference_unet

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from guided_diffusion.gaussian_diffusion import LossType, ModelMeanType, ModelVarType, get_named_beta_schedule
    from guided_diffusion.respace import SpacedDiffusion, space_timesteps

NUM_STEPS, TAU, SEEDS = 10, 3, [5, 6]


@pytest.fixture(scope="module")
def models():
    ref = reference_unet(TINY, seed=4)
    with torch.no_grad():  # tame the random output layer so that x0 is clipped at some pixels, not at all
        ref.out[-1].weight.mul_(0.05)
        ref.out[-1].bias.mul_(0.05)
    backbone = UNetBackbone(build_unet(ref.state_dict(), TINY), scheduler_for(TINY))
    # the reference's respaced diffusion (create_gaussian_diffusion with timestep_respacing="10", learn_sigma)
    diffusion = SpacedDiffusion(space_timesteps(TINY.diffusion_steps, str(NUM_STEPS)),
                                betas=get_named_beta_schedule("linear", TINY.diffusion_steps),
                                model_mean_type=ModelMeanType.EPSILON, model_var_type=ModelVarType.LEARNED_RANGE,
                                loss_type=LossType.MSE, rescale_timesteps=False)
    return ref, backbone, diffusion


def _x():
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _t(index):
    return torch.full((2,), index, dtype=torch.long)


def test_the_filter_and_its_gradient_equal_guided_diffusions_steps(models):
    ref, backbone, diffusion = models
    timesteps = filter_timesteps(backbone.scheduler, num_steps=NUM_STEPS, tau=TAU)
    assert timesteps.tolist() == [diffusion.timestep_map[i] for i in (2, 1, 0)] == [22, 11, 0]
    eps, noises = draw_filter_noise((3, 16, 16), generators_for(SEEDS), timesteps)
    weights = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def reference(x):  # JointClassifierDDPM's loop: q_sample to respaced index tau - 1, then p_mean_variance steps
        x = diffusion.q_sample(x, _t(TAU - 1), noise=eps)
        for idx, index in enumerate(range(TAU - 1, -1, -1)):
            out = diffusion.p_mean_variance(ref, x, _t(index), clip_denoised=True)
            x = out["mean"] + (torch.exp(0.5 * out["log_variance"]) * noises[idx] if index > 0 else 0)
        return x

    results = {}
    for name, fn in (("reference", reference), ("equidiff", lambda x: diffusion_filter(
            backbone, x, num_steps=NUM_STEPS, tau=TAU, eps=eps, noises=noises, checkpoint=False))):
        xv = _x().requires_grad_(True)
        out = fn(xv)
        (grad,) = torch.autograd.grad((out * weights).sum(), xv)
        results[name] = (out.detach(), grad)
    (ref_out, ref_grad), (out, grad) = results["reference"], results["equidiff"]
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5 * ref_grad.abs().max(), rtol=0)
    # the earlier equidiff variant (diffusers' leading spacing, unclipped x0, fixed variance) is far from it
    leading = filter_timesteps(backbone.scheduler, num_steps=NUM_STEPS, tau=TAU, spacing="leading")
    assert leading.tolist() == [20, 10, 0]
    with torch.no_grad():
        old = diffusion_filter(backbone, _x(), num_steps=NUM_STEPS, tau=TAU, eps=eps, noises=noises,
                               spacing="leading", clip_denoised=False, learned_variance=False)
    assert (old - ref_out).abs().max() > 1e-2


def test_the_inpainting_equals_guided_diffusions_steps_with_the_mask(models):
    ref, backbone, diffusion = models
    x = _x()
    pe = x.clone()
    pe[:, :, 4:8, 6:10] = -pe[:, :, 4:8, 6:10]  # a local edit: the mask covers part of the image
    _, _, mask = ace_mask(x, pe, dilation=3, threshold=0.15)
    assert 0 < mask.float().mean() < 0.5
    gens = generators_for(SEEDS)
    draw = lambda: randn_per_sample((3, 16, 16), gens)  # noqa: E731

    # main.filter_fn after the attack: the same draws in the same order (eps of pe; per step x_ts eps, then z)
    keep = (~mask).float()  # the reference's boolmask: dilated < u keeps the original
    with torch.no_grad():
        ce = diffusion.q_sample(pe, _t(TAU - 1), noise=draw())
        for index in range(TAU - 1, -1, -1):
            ce = ce * (1 - keep) + keep * diffusion.q_sample(x, _t(index), noise=draw())
            out = diffusion.p_mean_variance(ref, ce, _t(index), clip_denoised=True)
            ce = out["mean"] + (torch.exp(0.5 * out["log_variance"]) * draw() if index > 0 else 0)
        expected = (ce * (1 - keep) + keep * x).clamp(-1, 1)
        got = repaint(backbone, x, pe, mask, generators=generators_for(SEEDS), num_steps=NUM_STEPS, tau=TAU)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert torch.equal(got[~mask.expand_as(x)], x[~mask.expand_as(x)])
