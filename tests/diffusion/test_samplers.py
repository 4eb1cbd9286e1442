"""Samplers: reference equivalence with diffusers pipelines, per-sample randomness."""

import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler

from equidiff.diffusion import UNetBackbone, sample_ddim, sample_ddpm
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
