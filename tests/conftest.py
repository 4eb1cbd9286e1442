"""Shared test set-up: offline hubs and loggers, small thread counts, tiny-model fixtures."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the CLI runs that tests start in subprocesses load test callbacks (``+callbacks.x._target_=tests.helpers.X``):
# the console script's sys.path holds the venv's bin folder, not the repository, so put the repository first
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join([_REPO, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need a CUDA device: skipped without one (EQUIDIFF_TEST_DEVICE=cpu runs them on the CPU)."""
    if torch.cuda.is_available() or os.environ.get("EQUIDIFF_TEST_DEVICE") == "cpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def tiny_unet():
    """A tiny random 1-channel 8x8 UNet2DModel (with an attention level), seeded."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4,
    ).eval()


@pytest.fixture
def ddpm_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)


@pytest.fixture
def tiny_dit_parts():
    """A tiny class-conditional DiT (learned sigma) + tiny AutoencoderKL + DDIMScheduler."""
    return make_tiny_dit_parts()


def make_tiny_dit_parts():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8, num_layers=1,
        sample_size=4, patch_size=2, num_embeds_ada_norm=1000,  # the null class is 1000, as in DiT
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, sample_size=8,
    ).eval()
    return transformer, vae, DDIMScheduler(num_train_timesteps=1000)


def save_ddpm_pipeline(path, unet, scheduler):
    """Write a DDPMPipeline folder (model_index.json, unet/, scheduler/) like google/ddpm-cifar10-32."""
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A tiny 1-channel 8x8 DDPMPipeline folder, as `equidiff fit experiment=digits/ddpm` writes one."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4,
    )
    return save_ddpm_pipeline(tmp_path_factory.mktemp("models") / "tiny_ddpm", unet,
                              DDPMScheduler(num_train_timesteps=1000))


@pytest.fixture(scope="session")
def tiny_pipeline3_dir(tmp_path_factory):
    """A tiny 3-channel 32x32 DDPMPipeline folder (a stand-in for google/ddpm-cifar10-32)."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4,
    )
    return save_ddpm_pipeline(tmp_path_factory.mktemp("models") / "tiny_ddpm3", unet,
                              DDPMScheduler(num_train_timesteps=1000))


@pytest.fixture(scope="session")
def tiny_dit_dir(tmp_path_factory):
    """A tiny DiTPipeline folder (transformer/, vae/, scheduler/), the facebook/DiT-XL-2-256 layout."""
    from diffusers import DDIMScheduler, DiTPipeline

    transformer, vae, _ = make_tiny_dit_parts()
    path = tmp_path_factory.mktemp("models") / "tiny_dit"
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(num_train_timesteps=1000)).save_pretrained(
        str(path))
    return path


@pytest.fixture(scope="session")
def fidelity_weights_dir(tmp_path_factory):
    """Random-weight Inception-v3 (torch-fidelity layout) written where paths.weights_dir expects it."""
    from tests.metrics.fakes import write_fake_fidelity_weights

    return write_fake_fidelity_weights(tmp_path_factory.getbasetemp() / "fidelity_weights", vgg=False)


@pytest.fixture(scope="session")
def trained_digits_ddpm(tmp_path_factory):
    """A cache folder holding digits_ddpm, the digits DDPM briefly trained through the real config (200 steps,
    about 30 s): shared by the end-to-end digits tests of the methods (each adds its classifiers next to it)."""
    from equidiff.cli import run
    from tests.helpers import compose_cfg

    root = tmp_path_factory.mktemp("digits_models")
    cache = root / "cache"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(compose_cfg(["experiment=digits/ddpm", f"paths.output_dir={root}/ddpm", "trainer.max_steps=200",
                         "trainer.check_val_every_n_epoch=1000", f"paths.cache_dir={cache}", "trainer=cpu",
                         "logger=csv", "trainer.enable_progress_bar=false"]), "fit")
    finally:
        torch.set_num_threads(before)
    return cache
