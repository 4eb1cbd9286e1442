"""Samplers: reference equivalence with diffusers pipelines, per-sample randomness."""

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

from equidiff.diffusion import UNetBackbone, sample_ddim, sample_ddpm
from equidiff.diffusion.ddim import DDIMSteps
from equidiff.utils import generators_for, randn_per_sample


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_sample_ddim_equals_diffusers_ddim_pipeline(tiny_unet, ddpm_scheduler, eta):
    pipe = DDIMPipeline(unet=tiny_unet, scheduler=ddpm_scheduler)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(batch_size=3, generator=generators_for([5, 6, 7]), eta=eta, num_inference_steps=12,
               output_type="pt").images  # NCHW in [0, 1]

    backbone = UNetBackbone(tiny_unet, ddpm_scheduler)
    gens = generators_for([5, 6, 7])
    x_T = randn_per_sample(backbone.sample_shape, gens)
    with torch.no_grad():
        x_0 = sample_ddim(backbone, x_T, ddpm_scheduler, num_steps=12, eta=eta, generators=gens)
    assert torch.equal((x_0 / 2 + 0.5).clamp(0, 1), ref)


def test_sample_ddpm_equals_diffusers_ddpm_pipeline(tiny_unet):
    sched = DDPMScheduler(num_train_timesteps=1000)
    pipe = DDPMPipeline(unet=tiny_unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(batch_size=2, generator=generators_for([1, 2]), num_inference_steps=15, output_type="np").images

    backbone = UNetBackbone(tiny_unet, sched)
    gens = generators_for([1, 2])
    x_T = randn_per_sample(backbone.sample_shape, gens)
    with torch.no_grad():
        x_0 = sample_ddpm(backbone, x_T, sched, num_steps=15, generators=gens)
    ours = (x_0 / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert (abs(ours - ref)).max() == 0


@pytest.mark.parametrize("sampler", ["ddim_eta", "ddpm"])
def test_a_sample_depends_on_its_seed_only(tiny_unet, ddpm_scheduler, sampler):
    backbone = UNetBackbone(tiny_unet, ddpm_scheduler)

    def run(seeds):
        gens = generators_for(seeds)
        x_T = randn_per_sample(backbone.sample_shape, gens)
        with torch.no_grad():
            if sampler == "ddpm":
                return sample_ddpm(backbone, x_T, ddpm_scheduler, num_steps=8, generators=gens)
            return sample_ddim(backbone, x_T, ddpm_scheduler, num_steps=8, eta=1.0, generators=gens)

    batch = run([10, 11, 12, 13])
    alone = torch.cat([run([s]) for s in [10, 11, 12, 13]])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=0)
    assert not torch.allclose(batch[0], batch[1])


def test_stochastic_samplers_need_one_generator_per_sample(tiny_unet, ddpm_scheduler):
    backbone = UNetBackbone(tiny_unet, ddpm_scheduler)
    x_T = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="one generator per sample"):
        sample_ddim(backbone, x_T, ddpm_scheduler, num_steps=4, eta=0.5, generators=generators_for([1]))
    with pytest.raises(ValueError, match="one generator per sample"):
        sample_ddpm(backbone, x_T, ddpm_scheduler, num_steps=4, generators=None)


def test_samplers_leave_the_given_scheduler_untouched(tiny_unet, ddpm_scheduler):
    backbone = UNetBackbone(tiny_unet, ddpm_scheduler)
    before = dict(ddpm_scheduler.config)
    with torch.no_grad():
        sample_ddim(backbone, torch.randn(1, 1, 8, 8), ddpm_scheduler, num_steps=3)
    assert ddpm_scheduler.num_inference_steps is None
    assert dict(ddpm_scheduler.config) == before


def test_sampler_callback_sees_every_step(tiny_unet, ddpm_scheduler):
    backbone = UNetBackbone(tiny_unet, ddpm_scheduler)
    seen = []
    with torch.no_grad():
        sample_ddim(backbone, torch.randn(1, 1, 8, 8), ddpm_scheduler, num_steps=5,
                    callback=lambda i, t, x_t, x0_hat: seen.append((i, int(t), x0_hat.shape)))
    assert [s[0] for s in seen] == list(range(5))
    assert seen[0][1] > seen[-1][1]


@pytest.mark.parametrize("config", [{}, {"clip_sample": False}, {"thresholding": True, "clip_sample": False},
                                    {"set_alpha_to_one": False}, {"timestep_spacing": "trailing"},
                                    {"timestep_spacing": "linspace", "steps_offset": 1}])
@pytest.mark.parametrize("eta, clipped", [(0.0, False), (0.6, False), (0.6, True)])
def test_ddim_steps_equal_diffusers_ddim_step(config, eta, clipped):
    """DDIMSteps (numbers computed once, no host read in the loop) is DDIMScheduler.step bit for bit."""
    base = DDIMScheduler(num_train_timesteps=1000, **config)
    steps = DDIMSteps.build(base, 12, eta=eta, use_clipped_model_output=clipped)
    ref = DDIMScheduler.from_config(base.config)
    ref.set_timesteps(12)
    assert torch.equal(steps.timesteps, ref.timesteps)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 3, 8, 8, generator=g) * 2
    for i, t in enumerate(ref.timesteps):
        eps, z = torch.randn(2, 3, 8, 8, generator=g) * 1.5, torch.randn(2, 3, 8, 8, generator=g)
        expected = ref.step(eps, t, x_t, eta=eta, use_clipped_model_output=clipped,
                            variance_noise=z if eta > 0 else None)
        got, x0_hat = steps.step(i, eps, x_t, z)
        assert torch.equal(got, expected.prev_sample), int(t)
        assert torch.equal(x0_hat, expected.pred_original_sample)
        x_t = got


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_sample_ddim_reads_the_model_output_as_eps_whatever_the_prediction_type(tiny_unet, prediction_type):
    # the backbone converts v / x0 to eps (the one protocol); the sampler's step must not convert it again
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)
    ref = DDIMScheduler.from_config(sched.config)
    ref.set_timesteps(6)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x = x_T
    with torch.no_grad():
        for t in ref.timesteps:  # diffusers' loop on the raw network output, with its native step
            x = ref.step(tiny_unet(x, t).sample, t, x).prev_sample
        ours = sample_ddim(UNetBackbone(tiny_unet, sched), x_T, sched, num_steps=6)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)
