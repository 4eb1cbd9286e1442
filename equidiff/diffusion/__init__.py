"""Diffusion backbones (one model-function protocol) and samplers over diffusers schedulers."""

from equidiff.diffusion.backbones import (
    DiffusionBackbone,
    LatentDiTBackbone,
    UNetBackbone,
    load_dit,
    load_unet,
)
from equidiff.diffusion.chain import chain_timesteps, ddim_chain, draw_chain_noise, noise_to_step
from equidiff.diffusion.ddim import sample_ddim
from equidiff.diffusion.ddpm import sample_ddpm
from equidiff.diffusion.schedulers import alpha_bar, fresh_scheduler

__all__ = [
    "DiffusionBackbone",
    "LatentDiTBackbone",
    "UNetBackbone",
    "alpha_bar",
    "chain_timesteps",
    "ddim_chain",
    "draw_chain_noise",
    "fresh_scheduler",
    "load_dit",
    "load_unet",
    "noise_to_step",
    "sample_ddim",
    "sample_ddpm",
]
