"""Diffusion backbones (one model-function protocol) and samplers over diffusers schedulers."""

from equidiff.diffusion.backbones import (
    DiffusionBackbone,
    LatentDiTBackbone,
    UNetBackbone,
    load_dit,
    load_unet,
)
from equidiff.diffusion.chain import chain_timesteps, ddim_chain, ddpm_chain, draw_chain_noise, noise_to_step
from equidiff.diffusion.ddim import sample_ddim
from equidiff.diffusion.ddpm import ddpm_scheduler, ddpm_step, draw_ddpm_noise, sample_ddpm
from equidiff.diffusion.schedulers import SPACINGS, alpha_bar, fresh_scheduler, respaced_timesteps, space_timesteps

__all__ = [
    "DiffusionBackbone",
    "LatentDiTBackbone",
    "SPACINGS",
    "UNetBackbone",
    "alpha_bar",
    "chain_timesteps",
    "ddim_chain",
    "ddpm_chain",
    "ddpm_scheduler",
    "ddpm_step",
    "draw_chain_noise",
    "draw_ddpm_noise",
    "fresh_scheduler",
    "load_dit",
    "load_unet",
    "noise_to_step",
    "respaced_timesteps",
    "sample_ddim",
    "sample_ddpm",
    "space_timesteps",
]
