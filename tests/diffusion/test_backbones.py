"""Backbone adapters: one model-function protocol (eps), loading from save_pretrained folders."""

import functools

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiTPipeline

from equidiff.diffusion import LatentDiTBackbone, UNetBackbone, load_dit, load_unet, sample_ddim
from equidiff.errors import ConfigError
from equidiff.utils import generators_for, randn_per_sample
from tests.conftest import save_ddpm_pipeline


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_other_prediction_types_are_converted_to_eps(tiny_unet, prediction_type):
    # the scheduler's own x0 / eps formulas (DDIMScheduler.step) agree with our conversion
    sched = DDIMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)
    backbone = UNetBackbone(tiny_unet, sched)
    x_t, t = torch.randn(2, 1, 8, 8), torch.tensor(600)
    with torch.no_grad():
        eps = backbone(x_t, t)
        raw = tiny_unet(x_t, t).sample
    sched.set_timesteps(10)
    ab = sched.alphas_cumprod[t]
    if prediction_type == "sample":
        expected = (x_t - ab.sqrt() * raw) / (1 - ab).sqrt()
    else:
        expected = ab.sqrt() * raw + (1 - ab).sqrt() * x_t
    torch.testing.assert_close(eps, expected)
    # and an eps-scheduler step with our eps equals the native step of the raw output
    eps_sched = DDIMScheduler.from_config(sched.config, prediction_type="epsilon")
    eps_sched.set_timesteps(10)
    t_step = sched.timesteps[4]
    with torch.no_grad():
        eps = backbone(x_t, t_step)
        raw = tiny_unet(x_t, t_step).sample
    torch.testing.assert_close(eps_sched.step(eps, t_step, x_t).prev_sample,
                               sched.step(raw, t_step, x_t).prev_sample, rtol=1e-4, atol=1e-5)


def test_load_unet_from_a_pipeline_folder_and_a_bare_model_folder(tmp_path, tiny_unet, ddpm_scheduler):
    save_ddpm_pipeline(tmp_path / "pipe", tiny_unet, ddpm_scheduler)
    backbone = load_unet(str(tmp_path / "pipe"))
    assert backbone.sample_shape == (1, 8, 8) and backbone.image_shape == (1, 8, 8)
    assert isinstance(backbone.scheduler, DDPMScheduler)
    x, t = torch.randn(1, 1, 8, 8), torch.tensor(10)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x, t), tiny_unet(x, t).sample)

    tiny_unet.save_pretrained(tmp_path / "bare")
    with pytest.raises(ConfigError, match="without a scheduler"):
        load_unet(str(tmp_path / "bare"))
    assert load_unet(str(tmp_path / "bare"), scheduler=ddpm_scheduler).scheduler is ddpm_scheduler


def test_load_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*equidiff fit"):
        load_unet(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a diffusers folder"):
        load_unet(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE=1.*huggingface-cli download"):
        load_unet("google/not-a-cached-model")


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_latent_dit_sampling_equals_diffusers_dit_pipeline(tmp_path, tiny_dit_parts, guidance_scale):
    transformer, vae, sched = tiny_dit_parts
    DiTPipeline(transformer=transformer, vae=vae, scheduler=sched).save_pretrained(tmp_path / "dit")
    pipe = DiTPipeline.from_pretrained(tmp_path / "dit")
    pipe.set_progress_bar_config(disable=True)
    labels = [3, 7]
    ref = pipe(class_labels=labels, guidance_scale=guidance_scale, generator=generators_for([1, 2]),
               num_inference_steps=5, output_type="pt").images

    backbone = load_dit(str(tmp_path / "dit"), guidance_scale=guidance_scale)
    assert isinstance(backbone, LatentDiTBackbone) and backbone.is_latent
    assert backbone.sample_shape == (4, 4, 4) and backbone.image_shape == (3, 8, 8)
    assert backbone.scaling_factor == vae.config.scaling_factor
    gens = generators_for([1, 2])
    z_T = randn_per_sample(backbone.sample_shape, gens)
    model_fn = functools.partial(backbone, class_labels=torch.tensor(labels))
    with torch.no_grad():
        x = backbone.decode(sample_ddim(model_fn, z_T, backbone.scheduler, num_steps=5))
    torch.testing.assert_close((x / 2 + 0.5).clamp(0, 1), ref, rtol=1e-5, atol=1e-5)


def test_dit_needs_class_labels_and_encode_decode_round_trip_shapes(tiny_dit_parts):
    transformer, vae, sched = tiny_dit_parts
    backbone = LatentDiTBackbone(transformer, vae, sched)
    with pytest.raises(ValueError, match="class_labels"):
        backbone(torch.randn(1, 4, 4, 4), torch.tensor(10))
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        z = backbone.encode(x)
        assert z.shape == (2, 4, 4, 4)
        assert backbone.decode(z).shape == x.shape
