"""guided-diffusion (ADM) checkpoints converted to diffusers: reference equivalence against guided-diffusion's own
UNetModel (the guided-diffusion-sdk package, a packaging of openai/guided-diffusion) on tiny random models."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from equidiff.diffusion import load_unet
from equidiff.diffusion.adm import PRESETS, ADMFlags, ADMUNet2DModel, build_unet, main, scheduler_for, unet_config
from equidiff.errors import ConfigError

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # torch.cuda.amp.custom_fwd deprecation inside guided_diffusion
    from guided_diffusion.gaussian_diffusion import get_named_beta_schedule
    from guided_diffusion.unet import UNetModel

TINY = ADMFlags(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2,3", attention_resolutions="8,4",
                num_heads=2, learn_sigma=True, resblock_updown=True, use_scale_shift_norm=True, diffusion_steps=100)

VARIANTS = {
    # fixed head count over levels of 64 and 96 channels (DiME's CelebA model's case): ADMUNet2DModel
    "num_heads": TINY,
    # a fixed head width: plain UNet2DModel attention
    "head_channels": replace(TINY, num_head_channels=16),
    # strided-conv / nearest+conv resampling, additive time embedding, eps only, new attention order
    "conv_updown": replace(TINY, resblock_updown=False, use_scale_shift_norm=False, learn_sigma=False,
                           use_new_attention_order=True, num_res_blocks=2),
    # class-conditional (label_emb), attention at full resolution too
    "class_cond": replace(TINY, class_cond=True, num_classes=5, attention_resolutions="16,8"),
}


def reference_unet(flags: ADMFlags, seed: int = 0) -> UNetModel:
    """guided-diffusion's create_model(...) for these flags, every parameter random (its zero-init layers too)."""
    ds = tuple(flags.image_size // int(r) for r in flags.attention_resolutions.split(","))
    model = UNetModel(
        image_size=flags.image_size, in_channels=flags.in_channels, model_channels=flags.num_channels,
        out_channels=flags.in_channels * (2 if flags.learn_sigma else 1), num_res_blocks=flags.num_res_blocks,
        attention_resolutions=ds, dropout=0.0, channel_mult=flags.mults(),
        num_classes=flags.num_classes if flags.class_cond else None, use_checkpoint=False, use_fp16=False,
        num_heads=flags.num_heads, num_head_channels=flags.num_head_channels,
        num_heads_upsample=flags.num_heads_upsample, use_scale_shift_norm=flags.use_scale_shift_norm,
        resblock_updown=flags.resblock_updown, use_new_attention_order=flags.use_new_attention_order)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_converted_unet_equals_guided_diffusion(variant):
    flags = VARIANTS[variant]
    ref = reference_unet(flags)
    unet = build_unet(ref.state_dict(), flags)
    assert isinstance(unet, ADMUNet2DModel)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 16, 16, generator=gen)
    t = torch.tensor([0, 37, 99])
    y = torch.tensor([0, 4, 2]) if flags.class_cond else None
    with torch.no_grad():
        expected = ref(x, t, y=y) if flags.class_cond else ref(x, t)
        got = unet(x, t, class_labels=y).sample
    assert got.shape == expected.shape
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-4 * scale, (got - expected).abs().max()


def test_head_layout_matters():
    """The qkv split is not a no-op: reading a legacy-order checkpoint as new-order changes the output."""
    flags = VARIANTS["head_channels"]
    ref = reference_unet(flags)
    right = build_unet(ref.state_dict(), flags)
    wrong = build_unet(ref.state_dict(), replace(flags, use_new_attention_order=True))
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)), torch.tensor([5, 50])
    with torch.no_grad():
        expected = ref(x, t)
        assert (right(x, t).sample - expected).abs().max() <= 1e-4 * expected.abs().max()
        assert (wrong(x, t).sample - expected).abs().max() > 1e-2 * expected.abs().max()


def test_scheduler_matches_guided_diffusion_betas():
    for schedule, steps in (("linear", 500), ("linear", 1000), ("cosine", 100)):
        flags = replace(TINY, noise_schedule=schedule, diffusion_steps=steps)
        ours = scheduler_for(flags).betas.double().numpy()
        ref = get_named_beta_schedule(schedule, steps)
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)


def test_cli_writes_a_folder_that_load_unet_reads(tmp_path):
    flags = TINY
    ref = reference_unet(flags)
    ckpt = tmp_path / "ddpm.pt"
    torch.save(ref.state_dict(), ckpt)
    args = [str(ckpt), str(tmp_path / "ddpm"), "--image-size", "16", "--num-channels", "32", "--num-res-blocks", "1",
            "--channel-mult", "1,2,3", "--attention-resolutions", "8,4", "--num-heads", "2", "--learn-sigma", "true",
            "--resblock-updown", "true", "--diffusion-steps", "100"]
    assert main(args) == 0
    assert json.loads((tmp_path / "ddpm" / "unet" / "config.json").read_text())["_class_name"] == "ADMUNet2DModel"
    backbone = load_unet(str(tmp_path / "ddpm"))
    assert isinstance(backbone.unet, ADMUNet2DModel) and backbone.sample_shape == (3, 16, 16)
    assert backbone.scheduler.config.num_train_timesteps == 100
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)), torch.tensor([10, 90])
    with torch.no_grad():
        eps = backbone(x, t)
        expected = ref(x, t)[:, :3]  # learned sigma: the backbone keeps the eps half
    assert eps.shape == (2, 3, 16, 16)
    assert (eps - expected).abs().max() <= 1e-4 * expected.abs().max()
    # an existing folder is not overwritten without --overwrite
    assert main(args) == 2
    assert main([*args, "--overwrite"]) == 0


def test_presets_describe_the_released_architectures():
    """The presets build (config only: no weights) with the released models' shapes."""
    celeba = unet_config(PRESETS["celeba_dime"])
    assert celeba["block_out_channels"] == [128, 128, 256, 384, 512] and celeba["attention_num_heads"] == 4
    assert celeba["down_block_types"] == ["ResnetDownsampleBlock2D"] * 2 + ["AttnDownBlock2D"] * 3
    imagenet = unet_config(PRESETS["imagenet256_uncond"])
    assert imagenet["attention_head_dim"] == 64 and imagenet["attention_num_heads"] is None
    assert imagenet["down_block_types"].count("AttnDownBlock2D") == 3 and imagenet["out_channels"] == 6
    bdd = unet_config(PRESETS["bdd100k_ace"])
    assert "AttnDownBlock2D" not in bdd["down_block_types"]  # 16,8 at 256 px: attention only in the middle block
    assert scheduler_for(PRESETS["celeba_dime"]).config.num_train_timesteps == 500


def test_mismatched_flags_and_unsafe_files_are_clear_errors(tmp_path):
    ref = reference_unet(TINY)
    with pytest.raises(ConfigError, match="missing"):
        build_unet(ref.state_dict(), replace(TINY, num_res_blocks=2))
    with pytest.raises(ConfigError, match="class-cond"):
        build_unet(reference_unet(VARIANTS["class_cond"]).state_dict(), replace(VARIANTS["class_cond"],
                                                                                class_cond=False))
    with pytest.raises(ConfigError, match="do not fit|learn"):
        build_unet(ref.state_dict(), replace(TINY, learn_sigma=False))
    with pytest.raises(ConfigError, match="num_heads=5"):
        unet_config(replace(TINY, num_heads=5))
    with pytest.raises(ConfigError, match="channel_mult"):
        unet_config(replace(TINY, image_size=48, channel_mult=""))
    with pytest.raises(SystemExit):  # a misspelt boolean flag is refused, not read as False
        main([str(tmp_path / "x.pt"), str(tmp_path / "out"), "--learn-sigma", "ture"])
    # a checkpoint that carries a pickled callable is refused, and nothing is written
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": ref.state_dict(), "hook": print}, bad)
    assert main([str(bad), str(tmp_path / "out"), "--image-size", "16"]) == 2
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.pt"]
